"""Helpers for tests that speak ``MessagingService`` with raw stubs (no client library)."""

from __future__ import annotations

from typing import Any

from google.protobuf.duration_pb2 import Duration

from broker.frontends.grpc.stubs import pb, svc

__all__ = ["md", "settings", "send_req", "receive_req", "collect", "pb", "svc"]


def md(client_id: str = "raw@1", **extra: str) -> tuple[tuple[str, str], ...]:
    """Call metadata naming a client id."""
    return (("x-mq-client-id", client_id), *extra.items())


def settings(kind: str, *, group: str = "", topics: tuple[str, ...] = ()) -> Any:
    """A Telemetry Settings command as the Python client writes it."""
    st = pb.Settings(client_type=getattr(pb.ClientType, kind), request_timeout=Duration(seconds=3))
    st.user_agent.language = pb.Language.PYTHON
    st.user_agent.version = "5.1.2"
    if kind == "PRODUCER":
        st.publishing.topics.extend(pb.Resource(name=t) for t in topics)
        st.publishing.max_body_size = 128 << 20
    else:
        st.subscription.group.name = group
        for t in topics:
            st.subscription.subscriptions.add(topic=pb.Resource(name=t),
                                              expression=pb.FilterExpression(type=pb.FilterType.TAG, expression="*"))
    return svc.TelemetryCommand(settings=st)


def send_req(topic: str, body: bytes, *, mtype: str = "NORMAL", **sysprops: Any) -> Any:
    """A SendMessageRequest with one message."""
    m = pb.Message(topic=pb.Resource(name=topic), body=body)
    sp = m.system_properties
    sp.message_id = "01" + "0" * 32
    sp.message_type = getattr(pb.MessageType, mtype)
    sp.body_encoding = pb.Encoding.IDENTITY
    sp.born_timestamp.seconds = 1
    for k, v in sysprops.items():
        if k == "delivery_seconds":
            sp.delivery_timestamp.seconds = v
        else:
            setattr(sp, k, v)
    return svc.SendMessageRequest(messages=[m])


def receive_req(group: str, topic: str, *, queue: int = -1, batch: int = 32, invisible_s: int | None = 10,
                auto_renew: bool = False, poll_s: float = 1.0, tags: str = "*", sql: bool = False) -> Any:
    r = svc.ReceiveMessageRequest(
        group=pb.Resource(name=group), batch_size=batch, auto_renew=auto_renew,
        message_queue=pb.MessageQueue(topic=pb.Resource(name=topic), id=queue),
        filter_expression=pb.FilterExpression(type=pb.FilterType.SQL if sql else pb.FilterType.TAG, expression=tags),
        long_polling_timeout=Duration(seconds=int(poll_s), nanos=int((poll_s % 1) * 1e9)))
    if invisible_s is not None:
        r.invisible_duration.seconds = invisible_s
    return r


async def collect(call: Any) -> tuple[Any, list[Any], list[Any]]:
    """Read a ReceiveMessage stream: (last status, messages, delivery timestamps)."""
    status, messages, stamps = None, [], []
    async for r in call:
        kind = r.WhichOneof("content")
        if kind == "status":
            status = r.status
        elif kind == "message":
            messages.append(r.message)
        else:
            stamps.append(r.delivery_timestamp)
    return status, messages, stamps
