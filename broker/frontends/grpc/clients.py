"""gRPC clients as the broker knows them: identity, liveness, Telemetry streams, sessions.

How this works
--------------
RocketMQ 5 clients have no connection of their own: every RPC, the Telemetry stream and
the heartbeats carry the client's id (``x-mq-client-id``), and that id ties them together.
:class:`GrpcClients` keeps one :class:`GrpcClient` per id, created by its first RPC, with
what its Settings said (type, consumer group, topics, language and version).

Towards the engine a client acts through :class:`GrpcSession` objects — the engine's
``Session`` protocol: a consumer client has one session, a producer one per topic it
publishes to, whose group is the topic (RocketMQ's proxy uses the topic as the producer
group of a gRPC producer). The engine answers a request through ``reply``/``error``,
which resolve the future of the RPC waiting for it (``call``). A check-back the engine
sends with ``request(Op.CHECK, ...)`` goes out as a ``RecoverOrphanedTransactionCommand`` on
the client's Telemetry stream; its answer is a later ``EndTransaction`` with source
SERVER_CHECK, which resolves the future (``answer_check``); the engine's own check timeout
turns silence into UNKNOWN.

A client is alive while its Telemetry stream is open, or, without a stream, while its RPCs
(heartbeats every 10 s) keep coming within ``client_timeout``. When it goes — its stream
closes, it says NotifyClientTermination, or it falls silent — its sessions are closed
for the engine and the leases the broker was renewing for it (push consumers' auto-renew)
are released: made visible again ``release_ms`` later, as the proxy does.

Outbound Telemetry commands wait in a small bounded queue per stream and are written by
the stream's own handler: a client that stops reading its stream (the Python push
consumer does, after the first Settings reply) never blocks the event loop; a command
that finds the queue full is dropped (a check-back then counts as not delivered).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from protocol import Op
from protocol.errors import BrokerUnavailableError, HalfMQError

if TYPE_CHECKING:
    from broker.engines.base import Engine

__all__ = ["GrpcClient", "GrpcClients", "GrpcSession", "RenewedLease", "TELEMETRY_QUEUE"]

log = logging.getLogger("halfmq.broker")

#: Outbound Telemetry commands waiting for one stream, at most.
TELEMETRY_QUEUE = 64
_conn_ids = itertools.count(1)


class GrpcSession:
    """One engine session of a gRPC client (see the module docstring)."""

    __slots__ = ("client", "conn_id", "client_id", "role", "group", "peer", "closed", "_pending", "_rid")

    def __init__(self, client: GrpcClient, role: str, group: str | None) -> None:
        self.client = client
        self.conn_id = f"g{next(_conn_ids)}"
        self.client_id: str | None = client.client_id
        self.role: str | None = role
        self.group = group
        self.peer = client.peer
        self.closed = False
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._rid = 0

    @property
    def writable(self) -> bool:
        """Always: a gRPC consumer pulls what it can take."""
        return not self.closed

    def output_room(self) -> int:
        """Large: pulls are bounded by their batch size, not by a socket buffer."""
        return 0 if self.closed else 1 << 40

    def call(self) -> tuple[int, asyncio.Future[Any]]:
        """A new request id and the future its answer resolves."""
        self._rid += 1
        fut = asyncio.get_running_loop().create_future()
        self._pending[self._rid] = fut
        return self._rid, fut

    def forget(self, rid: int) -> None:
        """Request ``rid`` will not be answered (refused before the engine took it)."""
        self._pending.pop(rid, None)

    def reply(self, rid: int, payload: Any) -> None:
        """The engine's answer to request ``rid``."""
        fut = self._pending.pop(rid, None)
        if fut is not None and not fut.done():
            fut.set_result(payload)

    def error(self, rid: int, exc: HalfMQError) -> None:
        """The engine's error for request ``rid``."""
        fut = self._pending.pop(rid, None)
        if fut is not None and not fut.done():
            fut.set_exception(exc)

    def deliver(self, items: list[list[Any]]) -> None:
        """Never called: gRPC consumers pull (no push subscription is made for them)."""
        log.error("unexpected push delivery to gRPC client %s", self.client_id)

    def request(self, op: int, payload: Any) -> asyncio.Future[Any]:
        """A check-back: sent on the client's Telemetry stream (see the module docstring)."""
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if op != Op.CHECK or self.closed:
            fut.set_exception(BrokerUnavailableError("no such request on a gRPC client"))
            return fut
        self.client.registry.send_check(self.client, payload["m"], fut)
        return fut

    def flush(self) -> None:
        """Nothing to flush: each answer resolves its RPC at once."""

    def close(self) -> None:
        """The session ends: pending requests fail."""
        self.closed = True
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(BrokerUnavailableError("client gone"))
        self._pending.clear()


@dataclass(slots=True)
class RenewedLease:
    """A push consumer's lease that the broker renews while the client lives."""

    group: str
    client: GrpcClient
    deadline: float  # when the engine's lease ends unless renewed (broker wall clock)
    renew_until: float  # no renewal past this (the cap)


@dataclass(eq=False)
class GrpcClient:
    """One RocketMQ client process instance, by its client id."""

    registry: GrpcClients
    client_id: str
    peer: str
    client_type: int = 0
    group: str | None = None
    topics: set[str] = field(default_factory=set)
    language: str = ""
    version: str = ""
    last_seen: float = 0.0
    streams: list[asyncio.Queue[Any]] = field(default_factory=list)
    consumer: GrpcSession | None = None
    producers: dict[str, GrpcSession] = field(default_factory=dict)
    gone: bool = False
    user: str | None = None  # who its requests act as (when users exist)
    access: Any = None  # that user's rights (broker.security.state.SessionAccess)

    def consumer_session(self, group: str) -> GrpcSession:
        """The client's consumer session (for ``group``), opened on first use."""
        s = self.consumer
        if s is None or s.group != group:
            if s is not None:
                self.registry.close_session(s)
            s = self.consumer = GrpcSession(self, "consumer", group)
            self.registry.engine.session_opened(s)
        return s

    def producer_session(self, topic: str) -> GrpcSession:
        """The client's producer session for ``topic`` (its group is the topic), opened
        and announced to the engine (for check-backs) on first use."""
        s = self.producers.get(topic)
        if s is None:
            if len(self.producers) >= 1024:  # bounded: the oldest goes
                self.registry.close_session(self.producers.pop(next(iter(self.producers))))
            s = self.producers[topic] = GrpcSession(self, "producer", topic)
            self.registry.engine.session_opened(s)
            self.registry.engine.producer_hello(s)
        return s


class GrpcClients:
    """Every known gRPC client (see the module docstring)."""

    def __init__(self, engine: Engine, tuning: Any, *, max_clients: int = 10000) -> None:
        self.engine = engine
        self.tuning = tuning  # a ServiceTuning: client_timeout, release
        self.max_clients = max_clients
        self.by_id: dict[str, GrpcClient] = {}
        #: receipt handle -> lease renewed by the broker (push consumers)
        self.renewed: dict[str, RenewedLease] = {}
        #: msg id -> check-back futures waiting for an EndTransaction(SOURCE_SERVER_CHECK)
        self.checks: dict[str, asyncio.Future[Any]] = {}
        self.check_message: Any = None  # set by the service: wire message -> RecoverOrphaned... command

    def get(self, client_id: str, peer: str) -> GrpcClient:
        """The client ``client_id``, created if new; its last RPC is now."""
        c = self.by_id.get(client_id)
        if c is None:
            if len(self.by_id) >= self.max_clients:
                self.sweep(time.monotonic())
                if len(self.by_id) >= self.max_clients:
                    from protocol.errors import LimitExceededError
                    raise LimitExceededError(f"too many gRPC clients: the broker serves at most {self.max_clients} "
                                             "(--max-connections)")
            c = self.by_id[client_id] = GrpcClient(self, client_id, peer)
            log.info("gRPC client %r connected from %s", client_id, peer)
        c.last_seen = time.monotonic()
        return c

    # -- Telemetry ------------------------------------------------------------------------

    def attach(self, c: GrpcClient) -> asyncio.Queue[Any]:
        """A Telemetry stream of ``c`` opened: the queue its handler writes from."""
        q: asyncio.Queue[Any] = asyncio.Queue(TELEMETRY_QUEUE)
        c.streams.append(q)
        return q

    def detach(self, c: GrpcClient, q: asyncio.Queue[Any]) -> None:
        """A Telemetry stream of ``c`` closed; with none left the client is gone."""
        if q in c.streams:
            c.streams.remove(q)
        if not c.streams and not c.gone:
            self.remove(c, "its Telemetry stream closed")

    def send_check(self, c: GrpcClient, wire: list[Any], fut: asyncio.Future[Any]) -> None:
        """Push a check-back of the half message ``wire`` to ``c``; ``fut`` resolves with
        ``{"state": ...}`` when an EndTransaction(SOURCE_SERVER_CHECK) answers it."""
        if not c.streams or c.gone:
            fut.set_exception(BrokerUnavailableError("the producer has no Telemetry stream"))
            return
        try:
            c.streams[-1].put_nowait(self.check_message(wire))
        except asyncio.QueueFull:
            fut.set_exception(BrokerUnavailableError("the producer does not read its Telemetry stream"))
            return
        msg_id = wire[0]
        old = self.checks.get(msg_id)
        if old is not None and not old.done():
            old.set_exception(BrokerUnavailableError("superseded by a newer check-back"))
        self.checks[msg_id] = fut
        fut.add_done_callback(functools.partial(self._check_done, msg_id))

    def _check_done(self, msg_id: str, fut: asyncio.Future[Any]) -> None:
        if self.checks.get(msg_id) is fut:
            del self.checks[msg_id]

    def answer_check(self, msg_id: str, state: str) -> None:
        """An EndTransaction(SOURCE_SERVER_CHECK) for ``msg_id``: COMMIT, ROLLBACK or UNKNOWN."""
        fut = self.checks.pop(msg_id, None)
        if fut is not None and not fut.done():
            fut.set_result({"state": state})

    # -- leases the broker renews -----------------------------------------------------------

    def renew_later(self, c: GrpcClient, group: str, handle: str, deadline: float, cap: float) -> None:
        """Renew the lease ``handle`` while ``c`` lives, up to ``cap`` (wall clock)."""
        self.renewed[handle] = RenewedLease(group, c, deadline, cap)

    def settled(self, handle: str) -> None:
        """The lease ``handle`` was acked, changed or dead-lettered: no more renewals."""
        self.renewed.pop(handle, None)

    def due_renewals(self, now: float, ahead: float) -> dict[GrpcClient, dict[str, list[str]]]:
        """Leases of live clients ending within ``ahead`` seconds, by client and group;
        those past their cap are dropped (they expire normally)."""
        out: dict[GrpcClient, dict[str, list[str]]] = {}
        for handle, lease in list(self.renewed.items()):
            if lease.deadline - now > ahead:
                continue
            if lease.client.gone or now >= lease.renew_until:
                del self.renewed[handle]
                continue
            out.setdefault(lease.client, {}).setdefault(lease.group, []).append(handle)
        return out

    # -- going away -----------------------------------------------------------------------

    @property
    def release_ms(self) -> int:
        """Milliseconds after which the leases of a vanished client are visible again."""
        return int(self.tuning.release * 1000)

    def sweep(self, now: float) -> None:
        """Remove clients without a Telemetry stream that fell silent for ``client_timeout``."""
        timeout = self.tuning.client_timeout
        for c in list(self.by_id.values()):
            if not c.streams and now - c.last_seen > timeout:
                self.remove(c, f"no heartbeat for {timeout:g} s")

    def remove(self, c: GrpcClient, why: str) -> None:
        """``c`` is gone: close its sessions and release the leases renewed for it."""
        if c.gone:
            return
        c.gone = True
        if self.by_id.get(c.client_id) is c:
            del self.by_id[c.client_id]
        mine = [(h, lease) for h, lease in self.renewed.items() if lease.client is c]
        by_group: dict[str, list[list[Any]]] = {}
        for h, lease in mine:
            del self.renewed[h]
            by_group.setdefault(lease.group, []).append([h, "cid", self.release_ms])
        if by_group:
            s = c.consumer if c.consumer is not None else GrpcSession(c, "consumer", None)
            for group, items in by_group.items():
                self.engine.settle(s, 0, group, items)
        if c.consumer is not None:
            self.close_session(c.consumer)
            c.consumer = None
        for s in c.producers.values():
            self.close_session(s)
        c.producers.clear()
        for q in c.streams:
            try:
                q.put_nowait(None)  # ends the stream's handler
            except asyncio.QueueFull:
                pass
        log.info("gRPC client %r gone (%s)%s", c.client_id, why,
                 f"; {len(mine)} leases released" if mine else "")

    def close_session(self, s: GrpcSession) -> None:
        """Close one session for the engine."""
        if not s.closed:
            s.close()
            self.engine.session_closed(s)

    def close_all(self) -> None:
        """The broker stops: every client goes (leases are not released: the engine stops)."""
        for c in list(self.by_id.values()):
            self.renewed = {h: lease for h, lease in self.renewed.items() if lease.client is not c}
            self.remove(c, "broker stopping")
