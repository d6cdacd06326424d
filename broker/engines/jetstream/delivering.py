"""Deliveries of the JetStream engine: SUBSCRIBE, deliveries with prefetch, ACK.

How this works
--------------
Members of one group on one topic, on this gateway, share one ``_Pump``: a task that
fetches from the group's durable consumer (``groups.Groups.subscribe``) at most the
members' free room — ``prefetch`` minus their unacked deliveries, writable members only
(C10) — resolves each record to the wire message (a commit pointer costs one get of its
half) and hands it to a member with room, round robin, with a token of that member's
connection. Other gateways' members fetch from the same consumer: the engine gives each
message to one fetch at a time (C2). A pump with nothing to do waits on an event set by
an ack, a member arriving or a session draining its output.

A delivery is an engine lease of ``--ack-timeout`` (the consumer's ack wait). ACK:

- success → an engine ack;
- failure with ``attempt < max_reconsume_times`` → NAK with ``retry_delays[attempt]`` (the
  group's own ladder if its settings have one)
  (the last one repeats): the engine redelivers it then, counted (C3, held across gateway
  and engine restarts);
- failure of the last allowed attempt → a copy to ``%DLQ%<group>`` and a terminate (C4).

Each of these is a request the consumer's leader answers, sent side by side, and a
delivery ends only once its own answer came (a confirmed later ack would not do: a leader
that changed between two acks may have lost the earlier one). An acked delivery stops
counting against ``prefetch`` at once, but its token stays valid until then: one the
engine did not confirm (no consumer leader during a fail-over) is tried again by the
gateway every second for up to the ack wait, and an ACK request (``rid``) answers
``BrokerUnavailableError``, so the client may send the same ACK again. An ACK request
first waits for the connection's earlier ACKs and tries their unconfirmed results again:
its reply still means every ack so far is in the engine.

A lease that expires (the member died or is slow) comes back from the engine with the
count raised (C5); one that arrives past ``max_reconsume_times`` is dead-lettered instead
of delivered. A lease is kept while the gateway itself is slow to resolve a fetched
delivery (a commit pointer's body read stalled by an engine fail-over): an in-progress
signal every third of the ack wait. A member that leaves keeps nothing: its leases expire
in the engine.
ACKs of one loop iteration are processed by one task (no task per ack).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from broker.engines.base import Session, Subscription
from broker.engines.jetstream.groups import (
    ACK,
    CONFIRM_TIMEOUT,
    TERM,
    ConsumerHandle,
    Delivery,
    GroupSpec,
    nak_action,
)
from broker.engines.jetstream.parts import EngineParts
from broker.engines.jetstream.records import Kind
from protocol.errors import BadRequestError, BrokerUnavailableError, HalfMQError

__all__ = ["JetStreamDelivering"]

log = logging.getLogger("halfmq.engine")

_FETCH_MAX = 256
_FETCH_WAIT = 2.0
_SETTLE_RETRY = 1.0  # seconds between tries of settles the engine did not confirm


class _Member:
    __slots__ = ("session", "prefetch", "leases", "next_token", "active", "unconfirmed", "settling",
                 "retry_armed")

    def __init__(self, session: Session, prefetch: int) -> None:
        self.session = session
        self.prefetch = prefetch
        self.leases: dict[int, Delivery] = {}
        # settles the engine did not confirm: token -> (ok, first failure (monotonic), delivery);
        # they no longer count against prefetch, their tokens stay valid
        self.unconfirmed: dict[int, tuple[bool, float, Delivery]] = {}
        self.settling: set[asyncio.Future[Any]] = set()  # ACK frames being confirmed
        self.retry_armed = False
        self.next_token = 1
        self.active = True

    def room(self) -> int:
        s = self.session
        if not self.active or s.closed or not s.writable:
            return 0
        return self.prefetch - len(self.leases)


class _Pump:
    __slots__ = ("spec", "handle", "members", "wake", "task", "waiting", "rr", "ask_fifo", "setup", "lanes",
                 "delays")

    def __init__(self, spec: GroupSpec, ask_fifo: bool = False) -> None:
        self.spec = spec
        self.ask_fifo = ask_fifo  # the first subscription asked for a FIFO group
        self.setup: asyncio.Future[None] | None = None  # the consumer(s) being made ready
        self.lanes: list[tuple[ConsumerHandle, asyncio.Task[Any]]] = []  # a FIFO group's queues
        self.delays: tuple[float, ...] | None = None  # the group's own retry delays, if set
        self.handle: ConsumerHandle | None = None
        self.members: dict[str, _Member] = {}
        self.wake = asyncio.Event()
        self.task: asyncio.Task[Any] | None = None
        self.waiting: deque[tuple[Delivery, list[Any]]] = deque()  # fetched, no room left
        self.rr = 0

    def room(self) -> int:
        return sum(max(0, m.room()) for m in self.members.values())

    def pick(self) -> _Member | None:
        members = list(self.members.values())
        for i in range(len(members)):
            m = members[(self.rr + i) % len(members)]
            if m.room() > 0:
                self.rr = (self.rr + i + 1) % len(members)
                return m
        return None


class JetStreamDelivering(EngineParts):
    """The delivery part of :class:`JetStreamEngine` (see the module docstring)."""

    if TYPE_CHECKING:  # provided by ``fifo``
        async def _setup_pump(self, pump: _Pump) -> None: ...

    def _init_delivering(self) -> None:
        self._pumps: dict[tuple[str, str], _Pump] = {}
        self._member_of: dict[str, _Pump] = {}
        self._acks: list[tuple[Session, int, list[tuple[int, bool]]]] = []
        self._acks_scheduled = False

    def subscribe(self, s: Session, rid: int, sub: Subscription) -> None:
        """Make ``s`` a member of ``sub.group`` on ``sub.topic``; reply once the group's
        consumer exists (so ``start="latest"`` counts from before the reply)."""
        if s.conn_id in self._member_of:
            raise BadRequestError("this connection already has a subscription")
        key = (sub.group, sub.topic)
        pump = self._pumps.get(key)
        if pump is None:
            spec = GroupSpec(sub.group, sub.topic, tags=sub.tags or "*", start=sub.start,
                             ack_wait=self.config.ack_timeout,
                             max_reconsume_times=sub.max_reconsume_times)
            pump = self._pumps[key] = _Pump(spec, bool(getattr(sub, "fifo", False)))
        pump.members[s.conn_id] = _Member(s, sub.prefetch)
        self._member_of[s.conn_id] = pump
        self._track(self._join(pump, s, rid, bool(getattr(sub, "fifo", False))),
                    f"subscribe {sub.group}/{sub.topic}")

    async def _join(self, pump: _Pump, s: Session, rid: int, fifo: bool) -> None:
        try:
            if pump.setup is None:
                pump.setup = asyncio.ensure_future(self._setup_pump(pump))
            await asyncio.shield(pump.setup)
            if fifo and not pump.lanes:
                raise BadRequestError(f"group {pump.spec.group!r} exists and is not FIFO: make it FIFO "
                                      "with the admin API (halfmq admin group-settings GROUP --fifo on)")
        except Exception as exc:
            setup = pump.setup
            if setup is not None and setup.done() and (setup.cancelled() or setup.exception()):
                pump.setup = None  # the next member tries again
            from broker.engines.jetstream.engine import as_client_error

            pump.members.pop(s.conn_id, None)
            self._member_of.pop(s.conn_id, None)
            if not s.closed:
                s.error(rid, as_client_error(exc))
                s.flush()
            return
        if not s.closed:
            s.reply(rid, {})
            s.flush()
        if pump.task is None and pump.members and not pump.lanes:
            pump.task = asyncio.get_running_loop().create_task(self._pump_loop(pump))
        pump.wake.set()

    def unsubscribe(self, s: Session, rid: int) -> None:
        """No new deliveries to ``s``; its leases stay until acked or expired."""
        pump = self._member_of.get(s.conn_id)
        if pump is not None and s.conn_id in pump.members:
            pump.members[s.conn_id].active = False
        s.reply(rid, {})

    def session_writable(self, s: Session) -> None:
        """``s`` drained its output: deliveries may resume."""
        pump = self._member_of.get(s.conn_id)
        if pump is not None:
            pump.wake.set()

    def _member_gone(self, s: Session) -> None:
        pump = self._member_of.pop(s.conn_id, None)
        if pump is None:
            return
        pump.members.pop(s.conn_id, None)  # its leases expire in the engine (C5)
        if not pump.members:
            self._pumps.pop((pump.spec.group, pump.spec.topic), None)
            self._track(self._close_pump(pump), "close pump")
        else:
            pump.wake.set()

    async def _close_pump(self, pump: _Pump) -> None:
        tasks = ([pump.task] if pump.task is not None else []) + [t for _h, t in pump.lanes]
        if tasks:
            for t in tasks:
                t.cancel()
            pump.wake.set()
            await asyncio.wait(tasks, timeout=5.0)
        for h, _t in pump.lanes:
            await h.close()
        for d, _wire in pump.waiting:  # fetched, never delivered: give them back now
            await d.msg.nak()
        if pump.handle is not None:
            await pump.handle.close()

    async def _close_delivering(self) -> None:
        for pump in list(self._pumps.values()):
            await self._close_pump(pump)
        self._pumps.clear()

    # -- the pump -----------------------------------------------------------------------

    async def _pump_loop(self, pump: _Pump) -> None:
        handle = pump.handle
        assert handle is not None
        while pump.members and not self._stopping:
            try:
                self._hand_out(pump)
                room = pump.room() - len(pump.waiting)
                if room <= 0:
                    pump.wake.clear()
                    await pump.wake.wait()
                    continue
                fetched = await handle.fetch(min(room, _FETCH_MAX), timeout=_FETCH_WAIT)
                # pointers (commits, due schedules) each need a read of their body: read those
                # of one fetch side by side, not one round trip after the other
                live = [d for d in fetched if d.attempt <= pump.spec.max_reconsume_times]
                read = await self._resolve_keeping_leases(
                    pump, [d for d in live if d.record.kind is Kind.POINTER], live)
                for d in fetched:
                    if d.attempt > pump.spec.max_reconsume_times:  # lease expired past the limit
                        wire = await d.resolve()
                        if wire is not None:
                            await d.dead_letter(wire)
                        else:
                            await d.terminate()
                        continue
                    wire = read[id(d)] if id(d) in read else await d.resolve()
                    if wire is None:  # a pointer whose half is gone (retention)
                        await d.terminate()
                        continue
                    pump.waiting.append((d, wire))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the engine is failing over: wait, then go on
                log.warning("deliveries of %s/%s paused: %r", pump.spec.group, pump.spec.topic, exc)
                await asyncio.sleep(0.5)

    async def _resolve_keeping_leases(self, pump: _Pump, pointers: list[Delivery],
                                      keep: list[Delivery]) -> dict[int, Any]:
        """The wire messages of ``pointers`` (by ``id``), read side by side. While the reads
        take long (a read sent to a stopped replica waits for its timeout) the leases of
        ``keep`` (the whole fetch) are kept, an in-progress signal every third of the ack
        wait: a delivery handed out after its lease ran out would be live twice (the engine
        gives it again meanwhile), and a member failing the stale copy would get it back at
        once, not after its retry delay."""
        if not pointers:
            return {}
        reads = asyncio.ensure_future(asyncio.gather(*(d.resolve() for d in pointers)))
        try:
            while not (await asyncio.wait([reads], timeout=pump.spec.ack_wait / 3))[0]:
                for d in keep:
                    with contextlib.suppress(Exception):  # (a lost signal: the lease may lapse)
                        await d.extend()
        except BaseException:
            reads.cancel()
            raise
        return dict(zip(map(id, pointers), reads.result(), strict=True))

    def _hand_out(self, pump: _Pump) -> None:
        """Give waiting deliveries to members with room, one DELIVER per member."""
        out: dict[str, list[list[Any]]] = {}
        while pump.waiting:
            m = pump.pick()
            if m is None:
                break
            d, wire = pump.waiting.popleft()
            token = m.next_token
            m.next_token += 1
            m.leases[token] = d
            out.setdefault(m.session.conn_id, []).append([token, wire])
        for conn_id, items in out.items():
            s = pump.members[conn_id].session
            s.deliver(items)
            s.flush()

    # -- acks ---------------------------------------------------------------------------

    def ack(self, s: Session, rid: int, acks: list[tuple[int, bool]]) -> None:
        """Results of deliveries; reply (if ``rid``) once the engine has them."""
        if s.conn_id not in self._member_of:
            raise BadRequestError("ACK without a subscription")
        self._acks.append((s, rid, acks))
        if not self._acks_scheduled:
            self._acks_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_acks)

    def _flush_acks(self) -> None:
        batch, self._acks = self._acks, []
        self._acks_scheduled = False
        if batch:
            self._track(self._settle(batch), "ack")

    async def _settle(self, batch: list[tuple[Session, int, list[tuple[int, bool]]]]) -> None:
        await asyncio.gather(*(self._settle_acks(s, rid, acks) for s, rid, acks in batch))

    async def _settle_acks(self, s: Session, rid: int, acks: list[tuple[int, bool]]) -> None:
        """One ACK frame: each delivery ends once the engine confirmed its ack, NAK or dead
        letter (side by side). It stops counting against ``prefetch`` at once (the client is
        done with it), but its token stays valid until then: one not confirmed is tried
        again by the gateway every second for up to the ack wait, and fails a request
        (``rid``) with the engine's error, so the same ACK may be sent again. A request also
        waits for this member's earlier acks and tries its unconfirmed ones again: its reply
        covers all of them."""
        pump = self._member_of.get(s.conn_id)
        member = pump.members.get(s.conn_id) if pump is not None else None
        if pump is None or member is None:
            if rid and not s.closed:
                s.reply(rid, {})  # (no leases left: they expire in the engine)
                s.flush()
            return
        me = asyncio.current_task()
        assert me is not None
        work: dict[int, tuple[bool, Delivery]] = {}
        for token, ok in acks:
            d = member.leases.pop(token, None)
            if d is None and token in member.unconfirmed:
                d = member.unconfirmed[token][2]
            if d is not None:  # (else: unknown or settled token, nothing to do)
                work[token] = (ok, d)
        pump.wake.set()
        member.settling.add(me)
        try:
            if rid:
                earlier = [f for f in member.settling if f is not me and not f.done()]
                if earlier:
                    await asyncio.wait(earlier)
                for token, (ok, _since, d) in member.unconfirmed.items():
                    work.setdefault(token, (ok, d))
            error = await self._confirm_all(pump, member, work)
        finally:
            member.settling.discard(me)
        if rid and not s.closed:
            if error is None:
                s.reply(rid, {})
            else:
                s.error(rid, error)
            s.flush()

    async def _confirm_all(self, pump: _Pump, member: _Member,
                           work: dict[int, tuple[bool, Delivery]]) -> HalfMQError | None:
        """Settle ``work`` (token -> (ok, delivery)) of ``member``; the first error, or None."""
        answers = await asyncio.gather(*(self._confirm_one(pump, d, ok) for ok, d in work.values()),
                                       return_exceptions=True)
        error: HalfMQError | None = None
        now = time.monotonic()
        for (token, (ok, d)), answer in zip(work.items(), answers, strict=True):
            if answer is None:
                member.unconfirmed.pop(token, None)
                continue
            if isinstance(answer, asyncio.CancelledError):
                raise answer
            since = member.unconfirmed[token][1] if token in member.unconfirmed else now
            if now - since >= pump.spec.ack_wait:  # the engine has given it out again by now
                member.unconfirmed.pop(token, None)
                log.warning("delivery %d of %s/%s: the engine never confirmed its %s (%r); it is "
                            "delivered again", token, pump.spec.group, pump.spec.topic,
                            "ack" if ok else "nack", answer)
            else:
                member.unconfirmed[token] = (ok, since, d)
            if error is None:
                error = _unconfirmed_error("ack" if ok else "nack", answer)
        if member.unconfirmed and not member.retry_armed:
            member.retry_armed = True
            asyncio.get_running_loop().call_later(_SETTLE_RETRY, self._retry_unconfirmed, member)
        return error

    def _retry_unconfirmed(self, member: _Member) -> None:
        member.retry_armed = False
        s = member.session
        if self._stopping or s.closed or self._member_of.get(s.conn_id) is None or not member.unconfirmed:
            return
        self._acks.append((s, 0, [(t, ok) for t, (ok, _since, _d) in member.unconfirmed.items()]))
        if not self._acks_scheduled:
            self._acks_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_acks)

    async def _confirm_one(self, pump: _Pump, d: Delivery, ok: bool) -> None:
        """Ack (``ok``), NAK with the retry delay of its attempt, or — its last attempt
        failed — a copy in the group's DLQ and a TERM; returns once the engine confirmed it."""
        if ok:
            await d.confirm(ACK)
        elif d.attempt < pump.spec.max_reconsume_times:
            delays = pump.delays or self.config.retry_delays
            await d.confirm(nak_action(delays[min(d.attempt, len(delays) - 1)] if delays else 0.0))
        else:
            wire = await d.resolve()
            if wire is not None:
                await d.handle.groups.publish_dead(pump.spec.group, wire, deadline=CONFIRM_TIMEOUT)
            await d.confirm(TERM)


def _unconfirmed_error(action: str, exc: BaseException) -> HalfMQError:
    """The answer to an ack the engine did not confirm (its delivery and token stay)."""
    if isinstance(exc, HalfMQError):
        return exc
    return BrokerUnavailableError(f"the engine did not confirm the {action} ({type(exc).__name__}: {exc}); "
                                  "the delivery is unchanged: send the same ACK again")
