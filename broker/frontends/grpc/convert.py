"""Messages between ``apache.rocketmq.v2.Message`` and halfmq's wire rows, checked as the proxy does.

How this works
--------------
**Sending.** ``send_row`` checks one produced message the way RocketMQ's proxy does — the
topic name, an empty or too large body, tag, keys, message group and property keys, the
message type against what the message carries, the delivery time against ``--max-delay``
— and turns it into the row the engine stores (``[body, tags, keys, properties,
born_ms]``, plus an option map ``{"group": ...}`` or ``{"at": epoch_ms}``). A refused
message raises ``GrpcError`` with the proxy's code and nothing is stored. The client's own
message id is not kept: the broker's id is answered and the client adopts it.

**Delivering.** ``delivered`` builds the message a consumer receives from a wire message
(``protocol.Message.to_wire`` layout) and its receipt handle. The client needs some fields
to be right or it fails in ways that are hard to see (the reference's gotchas):
``body_encoding`` is always IDENTITY (UNSPECIFIED makes the whole receive raise),
``delivery_attempt`` is reconsume times + 1 (missing, a push consumer retries its nack
every second forever), and ``body_digest`` is the CRC32 of the body (missing, one ERROR
log line per message).

Namespaces: halfmq names forbid the ``%`` RocketMQ uses to join a namespace and a name, so
a request with a non-empty namespace is refused with a clear message.
"""

from __future__ import annotations

import zlib
from typing import Any

from google.protobuf.duration_pb2 import Duration  # type: ignore[import-untyped]
from google.protobuf.timestamp_pb2 import Timestamp  # type: ignore[import-untyped]

from broker.frontends.grpc.codes import Code, GrpcError
from broker.frontends.grpc.stubs import pb
from protocol.names import DLQ_PREFIX, NAME_PATTERN

__all__ = [
    "MAX_PROPERTIES_SIZE",
    "delivered",
    "duration_ms",
    "resource_name",
    "send_row",
    "timestamp",
]

#: Bytes of user properties (keys and values) one message may carry, as the proxy.
MAX_PROPERTIES_SIZE = 16 * 1024
#: Without scheduling, delivery times further ahead than this are still called illegal
#: (a time in milliseconds given as seconds), the others unsupported.
FAR_FUTURE_MS = 86_400_000
#: Longest tag, key and message group, as the proxy.
MAX_TEXT = 256 * 2

_M = pb.MessageType


def resource_name(res: Any, what: str, *, dlq_ok: bool = False) -> str:
    """The name of a ``Resource`` (a topic or group); raises ``GrpcError`` for a bad name
    or a namespace."""
    if res.resource_namespace:
        raise GrpcError(Code.BAD_REQUEST, f"namespace {res.resource_namespace!r}: halfmq has no namespaces "
                        "(names cannot hold '%'); configure the client without one")
    name = res.name
    if dlq_ok and name.startswith(DLQ_PREFIX) and NAME_PATTERN.fullmatch(name[len(DLQ_PREFIX):]):
        return str(name)
    if NAME_PATTERN.fullmatch(name) is None:
        code = Code.ILLEGAL_TOPIC if what == "topic" else Code.ILLEGAL_CONSUMER_GROUP
        raise GrpcError(code, f"invalid {what} {name!r}: must match ^[A-Za-z0-9_-]{{1,127}}$"
                        + (" (names starting with % are reserved)" if name.startswith("%") else ""))
    return str(name)


def duration_ms(d: Any) -> int:
    """A ``Duration`` in milliseconds."""
    return int(d.seconds) * 1000 + int(d.nanos) // 1_000_000


def timestamp(ms: int) -> Timestamp:
    """A ``Timestamp`` from epoch milliseconds."""
    return Timestamp(seconds=ms // 1000, nanos=(ms % 1000) * 1_000_000)


def _text(value: str, what: str, code: int) -> str:
    if not value.strip():
        raise GrpcError(code, f"{what} must not be blank")
    if len(value) > MAX_TEXT:
        raise GrpcError(code, f"{what} is longer than {MAX_TEXT} characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise GrpcError(code, f"{what} {value!r} holds a control character")
    return value


def send_row(msg: Any, *, now_ms: int, max_body: int, max_delay_ms: int | None) -> tuple[str, list[Any], bool]:
    """``(topic, row, half)`` for one produced message; ``max_delay_ms`` None means the
    engine cannot schedule messages. Raises ``GrpcError`` with the proxy's code."""
    topic = resource_name(msg.topic, "topic")
    sp = msg.system_properties
    body = msg.body
    if sp.body_encoding == pb.Encoding.GZIP:
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            body = d.decompress(body, max_body + 1)
        except zlib.error as exc:
            raise GrpcError(Code.MESSAGE_CORRUPTED, f"body is not valid gzip: {exc}") from None
    if not body:
        raise GrpcError(Code.MESSAGE_BODY_EMPTY, "message body is empty")
    if len(body) > max_body:
        raise GrpcError(Code.MESSAGE_BODY_TOO_LARGE,
                        f"body of {len(body)} bytes exceeds --max-message-size {max_body}")
    tag = None
    if sp.HasField("tag"):
        tag = _text(sp.tag, "tag", Code.ILLEGAL_MESSAGE_TAG)
        if "|" in tag:
            raise GrpcError(Code.ILLEGAL_MESSAGE_TAG, f"tag {tag!r} must not contain '|'")
    keys = [_text(k, "key", Code.ILLEGAL_MESSAGE_KEY) for k in sp.keys]
    props: dict[str, str] = {}
    size = 0
    for k, v in msg.user_properties.items():
        _text(k, "property key", Code.ILLEGAL_MESSAGE_PROPERTY_KEY)
        size += len(k) + len(v)
        props[k] = v
    if size > MAX_PROPERTIES_SIZE:
        raise GrpcError(Code.MESSAGE_PROPERTIES_TOO_LARGE,
                        f"user properties of {size} bytes exceed {MAX_PROPERTIES_SIZE}")
    mtype = sp.message_type
    group = _text(sp.message_group, "message group", Code.ILLEGAL_MESSAGE_GROUP) if sp.HasField("message_group") else None
    at = None
    if sp.HasField("delivery_timestamp"):
        at = sp.delivery_timestamp.seconds * 1000 + sp.delivery_timestamp.nanos // 1_000_000
    if sp.HasField("lite_topic") or sp.HasField("priority") or mtype in (_M.LITE, _M.PRIORITY):
        raise GrpcError(Code.UNSUPPORTED, "lite topics and priority messages are not supported by halfmq")
    half = mtype == _M.TRANSACTION
    if half and (group is not None or at is not None):
        raise GrpcError(Code.MESSAGE_PROPERTY_CONFLICT_WITH_TYPE,
                        "a transactional message cannot carry a message group or a delivery time")
    if mtype == _M.FIFO and group is None:
        raise GrpcError(Code.MESSAGE_PROPERTY_CONFLICT_WITH_TYPE, "a FIFO message needs a message group")
    if mtype == _M.DELAY and at is None:
        raise GrpcError(Code.MESSAGE_PROPERTY_CONFLICT_WITH_TYPE, "a DELAY message needs a delivery timestamp")
    if mtype == _M.NORMAL and (group is not None or at is not None):
        raise GrpcError(Code.MESSAGE_PROPERTY_CONFLICT_WITH_TYPE,
                        "a NORMAL message cannot carry a message group or a delivery time")
    born = sp.born_timestamp.seconds * 1000 + sp.born_timestamp.nanos // 1_000_000 if sp.HasField("born_timestamp") else now_ms
    row: list[Any] = [bytes(body), tag, keys, props, int(born)]
    if group is not None:
        row.append({"group": group})
    elif at is not None:
        limit = max_delay_ms if max_delay_ms is not None else FAR_FUTURE_MS
        if at - now_ms > limit:
            raise GrpcError(Code.ILLEGAL_DELIVERY_TIME,
                            f"delivery time {at} ms is more than {limit} ms ahead (--max-delay); "
                            "delivery_timestamp is in seconds: a milliseconds value lands far in the future")
        if max_delay_ms is None:
            raise GrpcError(Code.UNSUPPORTED, "delayed messages are not supported by this broker")
        if at > now_ms:
            row.append({"at": at})
    return topic, row, half


_DIGEST = pb.DigestType.CRC32
_IDENTITY = pb.Encoding.IDENTITY


def delivered(wire: list[Any], handle: str | None, invisible_ms: int, store_host: str) -> Any:
    """The ``Message`` a consumer receives for a wire message leased under ``handle``
    (None: a check-back's message, not leased)."""
    msg_id, topic, body, tags, keys, props, born, store, qid, off, reconsume = wire[:11]
    extras = wire[11] if len(wire) > 11 else None
    group = at = None
    if extras:
        group = extras.get("g")
        at = extras.get("at")
    mtype = _M.FIFO if group is not None else (_M.DELAY if at is not None else _M.NORMAL)
    sp = pb.SystemProperties(
        keys=keys,
        message_id=msg_id,
        body_digest=pb.Digest(type=_DIGEST, checksum=f"{zlib.crc32(body) & 0xFFFFFFFF:08X}"),
        body_encoding=_IDENTITY,
        message_type=mtype,
        born_timestamp=timestamp(born),
        store_timestamp=timestamp(store),
        store_host=store_host,
        queue_id=qid,
        queue_offset=max(off, 0),
        delivery_attempt=reconsume + 1,
    )
    if handle is not None:
        sp.receipt_handle = handle
        sp.invisible_duration.CopyFrom(Duration(seconds=invisible_ms // 1000, nanos=(invisible_ms % 1000) * 1_000_000))
    if tags is not None:
        sp.tag = tags
    if group is not None:
        sp.message_group = group
    if at is not None:
        sp.delivery_timestamp.CopyFrom(timestamp(at))
    if topic.startswith(DLQ_PREFIX):
        sp.dead_letter_queue.topic = props.get("ORIGIN_TOPIC", "")
        sp.dead_letter_queue.message_id = msg_id
    return pb.Message(topic=pb.Resource(name=topic), user_properties=props, system_properties=sp, body=body)
