"""``apache.rocketmq.v2.MessagingService`` on halfmq: each RPC a thin translation onto the engine.

How this works
--------------
Every RPC finds its client by ``x-mq-client-id`` (:mod:`.clients`), checks the request
(names, sizes, types — :mod:`.convert`), makes one engine call through one of the
client's sessions and waits for the engine's answer on that session's future. Errors are
answered as RocketMQ's proxy does, in the response's ``status`` (:mod:`.codes`): gRPC's own
status stays OK. The mapping:

=============================  ===========================================================
QueryRoute                     ``engine.route``: one MessageQueue per queue, broker id 0,
                               the advertised endpoints, every message type accepted
Heartbeat                      liveness of the client id
Telemetry                      Settings answered with the server's values merged in;
                               check-backs pushed as RecoverOrphanedTransactionCommand
SendMessage                    ``engine.send`` (``half`` for TRANSACTION; options for a
                               message group or a delivery time)
EndTransaction                 ``engine.end_tx``; from a check-back it also answers the
                               engine's pending CHECK (UNSPECIFIED = UNKNOWN)
QueryAssignment                one assignment (queue -1: "any queue"), one per queue for a
                               FIFO group
ReceiveMessage                 ``engine.receive`` (a long poll): every queue of the topic,
                               whatever queue the request names; push consumers' leases
                               are renewed by the broker (``auto_renew``)
AckMessage                     ``engine.settle`` ack
ChangeInvisibleDuration        ``engine.settle`` cid (the new receipt handle is answered)
ForwardMessageToDeadLetter...  ``engine.settle`` dlq
NotifyClientTermination        the client is gone: sessions closed, renewed leases released
RecallMessage                  ``engine.recall`` (when the engine schedules messages)
PullMessage, offsets, lite     NOT_IMPLEMENTED
=============================  ===========================================================
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, Protocol

from google.protobuf.duration_pb2 import Duration  # type: ignore[import-untyped]

from broker.frontends.grpc.clients import GrpcClient, GrpcClients, GrpcSession
from broker.frontends.grpc.codes import Code, GrpcError, ok, status, status_of
from broker.frontends.grpc.convert import delivered, duration_ms, resource_name, send_row, timestamp
from broker.frontends.grpc.stubs import grpc_pb, pb, svc
from broker.frontends.native.checks import SEND_MESSAGE_OVERHEAD
from protocol.errors import HalfMQError, StaleReceiptError

if TYPE_CHECKING:
    from broker.config import BrokerConfig
    from broker.engines.base import Engine
    from broker.frontends.grpc.auth import Authenticator, UserAccess

__all__ = ["MessagingService", "SendBudget", "ServiceTuning"]

log = logging.getLogger("halfmq.broker")

_M = pb.MessageType
_ACCEPT = [_M.NORMAL, _M.FIFO, _M.TRANSACTION]
_CHECK_STATES = {pb.TransactionResolution.COMMIT: "COMMIT", pb.TransactionResolution.ROLLBACK: "ROLLBACK"}
#: Invisible durations a consumer may ask for (ms): as the native RECEIVE.
_INVISIBLE_MS = (100, 12 * 3600 * 1000)
#: Default number of attempts of a message for a push consumer (halfmq's default
#: max_reconsume_times 16, plus the first).
_DEFAULT_MAX_ATTEMPTS = 17


class ServiceTuning:
    """Timings of the service (defaults as RocketMQ's proxy; tests shorten them).

    ``long_polling``: seconds a receive waits for messages (told to push consumers);
    ``renew_slice``: seconds a push consumer's lease runs before the broker renews it;
    ``renew_ahead``: renew that long before the lease ends; ``renew_period``: how often
    renewals run; ``renew_max``: no lease is renewed for longer than this;
    ``client_timeout``: a client without a stream is gone after that long without an RPC;
    ``release``: seconds after which the leases of a vanished client become visible again.
    """

    def __init__(self, *, long_polling: float = 20.0, renew_slice: float = 60.0, renew_ahead: float = 10.0,
                 renew_period: float = 5.0, renew_max: float = 3 * 3600.0, client_timeout: float = 30.0,
                 release: float = 1.0) -> None:
        self.long_polling = long_polling
        self.renew_slice = renew_slice
        self.renew_ahead = renew_ahead
        self.renew_period = renew_period
        self.renew_max = renew_max
        self.client_timeout = client_timeout
        self.release = release


def _answers(response: Callable[..., Any]) -> Callable[..., Any]:
    """Answer any error of a unary RPC as ``response(status=...)``."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        async def run(self: MessagingService, request: Any, context: Any) -> Any:
            try:
                return await fn(self, request, context)
            except HalfMQError as exc:
                return response(status=status_of(exc))
            except Exception as exc:  # a bug must not take the broker down
                log.exception("gRPC %s failed", fn.__name__)
                return response(status=status_of(exc))
        return run

    return wrap


def _check_tags(expr: Any) -> str:
    if expr.type == pb.FilterType.SQL:
        raise GrpcError(Code.ILLEGAL_FILTER_EXPRESSION, "SQL92 filters are not supported by halfmq: use TAG")
    return expr.expression or "*"


class SendBudget(Protocol):
    """Where the weight of sends not yet stored is counted (``--max-inflight-total``)."""

    def take(self, weight: int) -> bool:
        """Count ``weight`` bytes; False if they do not fit (nothing counted)."""

    def give_back(self, weight: int) -> None:
        """Take ``weight`` bytes counted by ``take`` out again."""


class MessagingService(grpc_pb.MessagingServiceServicer):  # type: ignore[misc, name-defined]
    """The RocketMQ 5 service over one engine (see the module docstring)."""

    def __init__(self, engine: Engine, config: BrokerConfig, *, tuning: ServiceTuning | None = None,
                 authenticator: Authenticator | None = None, access: UserAccess | None = None,
                 budget: SendBudget | None = None) -> None:
        self.engine = engine
        self.budget = budget
        self.config = config
        self.tuning = tuning or ServiceTuning()
        self.authenticator = authenticator
        self.access = access
        self.clients = GrpcClients(engine, self.tuning, max_clients=config.max_connections)
        self.clients.check_message = self._check_command
        self.schedules = hasattr(engine, "recall") and hasattr(config, "max_delay")
        self.max_delay_ms = int(config.max_delay * 1000) if self.schedules else None  # type: ignore[attr-defined]
        self.accept = _ACCEPT + ([_M.DELAY] if self.schedules else [])
        self.advertised: Any = None  # Endpoints of --advertise, set by the front end
        self.store_host = ""

    # -- plumbing -----------------------------------------------------------------------

    def _client(self, context: Any) -> GrpcClient:
        md = {k: v for k, v in context.invocation_metadata() or ()}
        client_id = md.get("x-mq-client-id")
        if not client_id or len(client_id) > 256:
            raise GrpcError(Code.CLIENT_ID_REQUIRED, "the x-mq-client-id header is required")
        if self.authenticator is not None:
            self.authenticator.check(md)
        user = self.access.principal(md) if self.access is not None else None
        peer = context.peer() or "?"
        c = self.clients.get(client_id, peer.split(":", 1)[1] if peer.startswith("ipv") else peer)
        if self.access is not None:
            if c.access is None or c.user != user:
                c.user, c.access = user, self.access.session(user)
            self.access.check(c.access, "active")
        return c

    def _allowed(self, c: GrpcClient, what: str, *args: Any) -> None:
        """Raise ``AuthError`` unless the client's user may do ``what`` (see UserAccess)."""
        if self.access is not None:
            self.access.check(c.access, what, *args)

    @staticmethod
    async def _wait(s: GrpcSession, rid: int, fut: asyncio.Future[Any]) -> Any:
        try:
            return await fut
        finally:
            s.forget(rid)

    def _check_command(self, wire: list[Any]) -> Any:
        msg = delivered(wire, None, 0, self.store_host)
        msg.system_properties.message_type = _M.TRANSACTION
        return svc.TelemetryCommand(recover_orphaned_transaction_command=svc.RecoverOrphanedTransactionCommand(
            message=msg, transaction_id=wire[0]))

    # -- routes, liveness, settings -----------------------------------------------------

    @_answers(svc.QueryRouteResponse)
    async def QueryRoute(self, request: Any, context: Any) -> Any:
        self._client(context)
        topic = resource_name(request.topic, "topic", dlq_ok=True)
        n = self.engine.route(topic)
        endpoints = self.advertised if self.advertised is not None else request.endpoints
        if not endpoints.addresses:
            raise GrpcError(Code.ILLEGAL_ACCESS_POINT, "the request names no endpoints")
        broker = pb.Broker(name="halfmq", id=0, endpoints=endpoints)
        res = pb.Resource(name=topic)
        queues = [pb.MessageQueue(topic=res, id=i, permission=pb.Permission.READ_WRITE, broker=broker,
                                  accept_message_types=self.accept) for i in range(n)]
        return svc.QueryRouteResponse(status=ok(), message_queues=queues)

    @_answers(svc.HeartbeatResponse)
    async def Heartbeat(self, request: Any, context: Any) -> Any:
        c = self._client(context)
        if request.client_type:
            c.client_type = request.client_type
        if request.HasField("group") and request.group.name:
            c.group = resource_name(request.group, "group")
        return svc.HeartbeatResponse(status=ok())

    async def _settings_reply(self, c: GrpcClient, settings: Any) -> Any:
        c.client_type = settings.client_type or c.client_type
        c.language = pb.Language.Name(settings.user_agent.language) if settings.user_agent.language in pb.Language.values() else ""
        c.version = settings.user_agent.version
        out = pb.Settings()
        out.CopyFrom(settings)
        out.metric.CopyFrom(pb.Metric(on=False))
        if settings.HasField("publishing"):
            for t in settings.publishing.topics:
                try:
                    topic = resource_name(t, "topic")
                except GrpcError:
                    continue
                c.topics.add(topic)
                c.producer_session(topic)  # check-backs may reach it before its first send
            out.publishing.max_body_size = self.config.max_message_size
            out.publishing.validate_message_type = True
            out.backoff_policy.CopyFrom(pb.RetryPolicy(
                max_attempts=3, exponential_backoff=pb.ExponentialBackoff(
                    initial=Duration(nanos=10_000_000), max=Duration(seconds=1), multiplier=2.0)))
        elif settings.HasField("subscription"):
            group = resource_name(settings.subscription.group, "group")
            c.group = group
            c.topics = {e.topic.name for e in settings.subscription.subscriptions}
            st = await self.engine.admin_group_settings(group)  # type: ignore[attr-defined]
            delays = st.get("retry_delays") or self.config.retry_delays
            sub = out.subscription
            sub.fifo = bool(st.get("fifo"))
            sub.receive_batch_size = 32
            sub.long_polling_timeout.CopyFrom(_duration(self.tuning.long_polling))
            out.backoff_policy.CopyFrom(pb.RetryPolicy(
                max_attempts=int(st.get("max_attempts") or _DEFAULT_MAX_ATTEMPTS),
                # the client reads whole seconds only: a sub-second delay would become 0
                customized_backoff=pb.CustomizedBackoff(next=[_duration(math.ceil(d)) for d in delays])))
        return svc.TelemetryCommand(status=ok(), settings=out)

    async def Telemetry(self, request_iterator: Any, context: Any) -> None:
        try:
            c = self._client(context)
        except HalfMQError as exc:
            await context.write(svc.TelemetryCommand(status=status_of(exc)))
            return
        q = self.clients.attach(c)

        async def read() -> None:
            try:
                async for cmd in request_iterator:
                    c.last_seen = time.monotonic()
                    if cmd.HasField("settings"):
                        try:
                            reply = await self._settings_reply(c, cmd.settings)
                        except HalfMQError as exc:
                            reply = svc.TelemetryCommand(status=status_of(exc))
                        try:
                            q.put_nowait(reply)
                        except asyncio.QueueFull:
                            pass
            except Exception as exc:  # the stream broke
                log.debug("Telemetry stream of %s: %r", c.client_id, exc)
            finally:
                try:
                    q.put_nowait(None)
                except asyncio.QueueFull:
                    pass

        reader = asyncio.ensure_future(read())
        try:
            while True:
                item = await q.get()
                if item is None:
                    break
                await context.write(item)
        finally:
            reader.cancel()
            self.clients.detach(c, q)

    @_answers(svc.NotifyClientTerminationResponse)
    async def NotifyClientTermination(self, request: Any, context: Any) -> Any:
        c = self._client(context)
        self.clients.remove(c, "it terminated")
        return svc.NotifyClientTerminationResponse(status=ok())

    # -- producing -----------------------------------------------------------------------

    @_answers(svc.SendMessageResponse)
    async def SendMessage(self, request: Any, context: Any) -> Any:
        c = self._client(context)
        if not request.messages:
            raise GrpcError(Code.BAD_REQUEST, "no message to send")
        now_ms = int(time.time() * 1000)
        rows = []
        topic = ""
        half = False
        for i, m in enumerate(request.messages):
            t, row, h = send_row(m, now_ms=now_ms, max_body=self.config.max_message_size,
                                 max_delay_ms=self.max_delay_ms)
            if i and (t != topic or h != half):
                raise GrpcError(Code.BAD_REQUEST, "the messages of one SendMessage must share their topic and type")
            topic, half = t, h
            rows.append(row)
        # a gRPC producer's group is its topic (the proxy's convention)
        self._allowed(c, "send", topic, topic if half else None, half)
        # each message weighs its body and what the broker holds for it until stored, as on
        # the native port; past the broker's budget the client is told to retry
        weight = SEND_MESSAGE_OVERHEAD * len(rows) + sum(len(row[0]) for row in rows)
        budget = self.budget
        if budget is not None and not budget.take(weight):
            raise GrpcError(Code.TOO_MANY_REQUESTS, f"the sends not yet stored weigh more than the broker's "
                                                    f"--max-inflight-total: {weight} bytes more refused, retry later")
        try:
            s = c.producer_session(topic)
            c.topics.add(topic)
            rid, fut = s.call()
            try:
                self.engine.send(s, rid, topic, rows, half)
            except BaseException:
                s.forget(rid)
                raise
            r = await self._wait(s, rid, fut)
        finally:
            if budget is not None:
                budget.give_back(weight)
        prefix = r["p"]
        entries = []
        for (pos, _qid, off), row in zip(r["r"], rows, strict=True):
            msg_id = f"{prefix}{pos:016X}"
            scheduled = len(row) > 5 and "at" in row[5]
            entries.append(svc.SendResultEntry(status=ok(), message_id=msg_id, transaction_id=msg_id if half else "",
                                               offset=max(off, 0), recall_handle=msg_id if scheduled else ""))
        return svc.SendMessageResponse(status=ok(), entries=entries)

    @_answers(svc.EndTransactionResponse)
    async def EndTransaction(self, request: Any, context: Any) -> Any:
        c = self._client(context)
        tx_id = request.transaction_id or request.message_id
        if not tx_id.strip():
            raise GrpcError(Code.INVALID_TRANSACTION_ID, "transaction id is blank")
        topic = resource_name(request.topic, "topic")
        outcome = _CHECK_STATES.get(request.resolution)
        from_check = request.source == pb.TransactionSource.SOURCE_SERVER_CHECK
        if outcome is None:  # UNSPECIFIED (or out of range): UNKNOWN, checked again later
            if from_check:
                self.clients.answer_check(tx_id, "UNKNOWN")
            return svc.EndTransactionResponse(status=ok())
        s = c.producer_session(topic)
        rid, fut = s.call()
        try:
            self.engine.end_tx(s, rid, [(tx_id, outcome)], True)
        except BaseException:
            s.forget(rid)
            raise
        finally:
            if from_check:
                self.clients.answer_check(tx_id, outcome)
        await self._wait(s, rid, fut)
        return svc.EndTransactionResponse(status=ok())

    @_answers(svc.RecallMessageResponse)
    async def RecallMessage(self, request: Any, context: Any) -> Any:
        c = self._client(context)
        topic = resource_name(request.topic, "topic")
        if not self.schedules:
            raise GrpcError(Code.UNSUPPORTED, "this broker does not schedule messages: nothing to recall")
        handle = request.recall_handle
        if not handle:
            raise GrpcError(Code.BAD_REQUEST, "recall handle is blank")
        self._allowed(c, "recall")
        s = c.producer_session(topic)
        rid, fut = s.call()
        try:
            allowed = None if self.access is None else (
                lambda t: self._allowed(c, "send", t, None, False))  # the message's own topic
            self.engine.recall(s, rid, handle, allowed)
        except BaseException:
            s.forget(rid)
            raise
        await self._wait(s, rid, fut)
        return svc.RecallMessageResponse(status=ok(), message_id=handle)

    # -- consuming -----------------------------------------------------------------------

    @_answers(svc.QueryAssignmentResponse)
    async def QueryAssignment(self, request: Any, context: Any) -> Any:
        self._client(context)
        topic = resource_name(request.topic, "topic", dlq_ok=True)
        group = resource_name(request.group, "group")
        n = self.engine.route(topic)
        st = await self.engine.admin_group_settings(group)  # type: ignore[attr-defined]
        endpoints = self.advertised if self.advertised is not None else request.endpoints
        broker = pb.Broker(name="halfmq", id=0, endpoints=endpoints)
        ids = range(n) if st.get("fifo") else (-1,)
        res = pb.Resource(name=topic)
        return svc.QueryAssignmentResponse(status=ok(), assignments=[
            pb.Assignment(message_queue=pb.MessageQueue(topic=res, id=i, permission=pb.Permission.READ_WRITE,
                                                        broker=broker, accept_message_types=self.accept))
            for i in ids])

    async def ReceiveMessage(self, request: Any, context: Any) -> AsyncIterator[Any]:
        try:
            c = self._client(context)
            group = resource_name(request.group, "group")
            topic = resource_name(request.message_queue.topic, "topic", dlq_ok=True)
            self._allowed(c, "subscribe", topic, group)
            tags = _check_tags(request.filter_expression)
            n = max(1, min(request.batch_size or 32, self.config.max_prefetch))
            auto = request.auto_renew
            if auto:
                invisible = int(self.tuning.renew_slice * 1000)
            else:
                if not request.HasField("invisible_duration"):
                    raise GrpcError(Code.ILLEGAL_INVISIBLE_TIME, "invisible_duration is required without auto_renew")
                invisible = duration_ms(request.invisible_duration)
                if not _INVISIBLE_MS[0] <= invisible <= _INVISIBLE_MS[1]:
                    raise GrpcError(Code.ILLEGAL_INVISIBLE_TIME,
                                    f"invisible duration {invisible} ms is outside {_INVISIBLE_MS[0]} ms .. 12 h")
            wait = self.tuning.long_polling
            if request.HasField("long_polling_timeout"):
                wait = duration_ms(request.long_polling_timeout) / 1000.0
            left = context.time_remaining()
            if left is not None:
                wait = min(wait, left - min(1.0, left / 4))
            wait_ms = max(0, min(int(wait * 1000), 60_000))
            s = c.consumer_session(group)
            rid, fut = s.call()
            try:
                self.engine.receive(s, rid, group=group, topic=topic, tags=tags, max_messages=n,
                                    invisible_ms=invisible, wait_ms=wait_ms)
            except BaseException:
                s.forget(rid)
                raise
            try:
                r = await fut
            except asyncio.CancelledError:
                self.engine.cancel_receive(s, rid)
                raise
            finally:
                s.forget(rid)
        except HalfMQError as exc:
            yield svc.ReceiveMessageResponse(status=status_of(exc))
            return
        items = r["m"]
        if not items:
            yield svc.ReceiveMessageResponse(status=status(Code.MESSAGE_NOT_FOUND, "no new message"))
            yield svc.ReceiveMessageResponse(delivery_timestamp=timestamp(int(time.time() * 1000)))
            return
        if auto:
            now = time.time()
            for handle, _wire in items:
                self.clients.renew_later(c, group, handle, now + invisible / 1000.0, now + self.tuning.renew_max)
        sent = 0
        try:
            yield svc.ReceiveMessageResponse(status=ok())
            for handle, wire in items:
                yield svc.ReceiveMessageResponse(message=delivered(wire, handle, invisible, self.store_host))
                sent += 1
            yield svc.ReceiveMessageResponse(delivery_timestamp=timestamp(int(time.time() * 1000)))
        finally:
            if sent < len(items):  # the client went before taking them: visible again soon
                lost = [[h, "cid", self.clients.release_ms] for h, _w in items[sent:]]
                for h, _x, _y in lost:
                    self.clients.settled(h)
                self.engine.settle(s, 0, group, lost)

    async def _settle(self, c: GrpcClient, group: str, items: list[list[Any]]) -> list[Any]:
        self._allowed(c, "settle", group)
        s = c.consumer_session(group) if c.consumer is None or c.consumer.group == group else GrpcSession(c, "consumer", group)
        rid, fut = s.call()
        try:
            self.engine.settle(s, rid, group, items)
        except BaseException:
            s.forget(rid)
            raise
        return list((await self._wait(s, rid, fut))["r"])

    @_answers(svc.AckMessageResponse)
    async def AckMessage(self, request: Any, context: Any) -> Any:
        c = self._client(context)
        group = resource_name(request.group, "group")
        resource_name(request.topic, "topic", dlq_ok=True)
        if not request.entries:
            raise GrpcError(Code.BAD_REQUEST, "no entry to ack")
        for e in request.entries:
            self.clients.settled(e.receipt_handle)
        results = await self._settle(c, group, [[e.receipt_handle, "ack", 0] for e in request.entries])
        entries = []
        for e, res in zip(request.entries, results, strict=True):
            st = ok() if res is True else status_of(_item_error(res))
            entries.append(svc.AckMessageResultEntry(message_id=e.message_id, receipt_handle=e.receipt_handle, status=st))
        codes = {e.status.code for e in entries}
        top = entries[0].status if len(codes) == 1 else status(Code.MULTIPLE_RESULTS, "some entries failed")
        return svc.AckMessageResponse(status=top, entries=entries)

    @_answers(svc.ChangeInvisibleDurationResponse)
    async def ChangeInvisibleDuration(self, request: Any, context: Any) -> Any:
        c = self._client(context)
        group = resource_name(request.group, "group")
        resource_name(request.topic, "topic", dlq_ok=True)
        ms = duration_ms(request.invisible_duration)
        if not 0 <= ms <= _INVISIBLE_MS[1]:
            raise GrpcError(Code.ILLEGAL_INVISIBLE_TIME, f"invisible duration {ms} ms is outside 0 .. 12 h")
        self.clients.settled(request.receipt_handle)
        (res,) = await self._settle(c, group, [[request.receipt_handle, "cid", ms]])
        if not isinstance(res, str):
            raise _item_error(res)
        return svc.ChangeInvisibleDurationResponse(status=ok(), receipt_handle=res)

    @_answers(svc.ForwardMessageToDeadLetterQueueResponse)
    async def ForwardMessageToDeadLetterQueue(self, request: Any, context: Any) -> Any:
        c = self._client(context)
        group = resource_name(request.group, "group")
        resource_name(request.topic, "topic", dlq_ok=True)
        self.clients.settled(request.receipt_handle)
        (res,) = await self._settle(c, group, [[request.receipt_handle, "dlq", 0]])
        if res is not True:
            raise _item_error(res)
        return svc.ForwardMessageToDeadLetterQueueResponse(status=ok())

    # -- not implemented -----------------------------------------------------------------

    async def PullMessage(self, request: Any, context: Any) -> AsyncIterator[Any]:
        yield svc.PullMessageResponse(status=_not_implemented("PullMessage"))

    async def UpdateOffset(self, request: Any, context: Any) -> Any:
        return svc.UpdateOffsetResponse(status=_not_implemented("UpdateOffset"))

    async def GetOffset(self, request: Any, context: Any) -> Any:
        return svc.GetOffsetResponse(status=_not_implemented("GetOffset"))

    async def QueryOffset(self, request: Any, context: Any) -> Any:
        return svc.QueryOffsetResponse(status=_not_implemented("QueryOffset"))

    async def SyncLiteSubscription(self, request: Any, context: Any) -> Any:
        return svc.SyncLiteSubscriptionResponse(status=_not_implemented("SyncLiteSubscription"))

    # -- broker-side timers ------------------------------------------------------------

    def renew_due(self) -> None:
        """Renew the leases of live push consumers that end within ``renew_ahead``."""
        now = time.time()
        slice_ms = int(self.tuning.renew_slice * 1000)
        for c, groups in self.clients.due_renewals(now, self.tuning.renew_ahead).items():
            for group, handles in groups.items():
                s = c.consumer if c.consumer is not None and c.consumer.group == group else GrpcSession(c, "consumer", group)
                rid, fut = s.call()
                self.engine.settle(s, rid, group, [[h, "renew", slice_ms] for h in handles])
                fut.add_done_callback(functools.partial(self._renewed, handles, now + slice_ms / 1000.0))

    def _renewed(self, handles: list[str], deadline: float, fut: asyncio.Future[Any]) -> None:
        if fut.cancelled() or fut.exception() is not None:
            return
        for h, res in zip(handles, fut.result()["r"], strict=False):
            lease = self.clients.renewed.get(h)
            if lease is None:
                continue
            if res is True:
                lease.deadline = deadline
            else:  # acked, expired or changed meanwhile
                self.clients.settled(h)


def _duration(seconds: float) -> Duration:
    whole = int(seconds)
    return Duration(seconds=whole, nanos=int(round((seconds - whole) * 1e9)))


def _not_implemented(what: str) -> Any:
    return status(Code.NOT_IMPLEMENTED, f"{what} is not implemented by halfmq")


def _item_error(res: Any) -> HalfMQError:
    """The error of one settle item (``[code, message]``)."""
    from protocol.errors import error_from_code

    if isinstance(res, list) and len(res) == 2:
        return error_from_code(int(res[0]), str(res[1]))
    return StaleReceiptError(f"unexpected settle result {res!r}")

