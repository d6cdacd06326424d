"""Delivering on the embedded engine: subscriptions, dispatch, acks, leases, group progress.

How this works
--------------
One ``GroupDelivery`` per consumer group (``broker.core.delivery``) decides which message
goes to which member; this shell gives it I/O. ``dispatch`` runs at most once per loop
iteration (``schedule_dispatch``) when something changed — new records stored, acks, a
member with room, a session that drains — and on a 50 ms tick that also expires leases and
releases due retries. Deliveries go out as one DELIVER frame per member per dispatch.

A member gets deliveries only while its connection reads: before each poll its byte
budget is set from the connection's unsent output (``Session.output_room``), so a client
that stops reading stops being leased to, whatever its prefetch.

**Durable acks.** Acks are written with the log's group commit: the offsets acked in a
loop iteration go, per group, into one ``RT_ACK`` record indexed in ``%ACK%``, in the same
append as that iteration's sends, and an ACK that asked for a reply (a barrier) is answered
once that append is durable. A failed delivery (RECONSUME_LATER, an expired lease) becomes
a retry or dead-letter record that the core returns, appended the same way; the core is
told when it is durable, and only then is the source offset done.

Group progress (committed offsets) is also saved to metadata every second and at
shutdown, with the end of ``%ACK%`` and of each group's DLQ at that moment; and before a
subscription with ``start="latest"`` that gives its group a new start is answered. After a crash a
group resumes from its saved offsets, skips what the ack records written since then say
was acked, and keeps only the newest retry record of each message (see
``GroupDelivery``): only deliveries that were in flight come again (C8).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from typing import TYPE_CHECKING, Any

from broker.core.delivery import GroupDelivery, PendingRecord
from broker.core.records import ACK_TOPIC, RT_ACK, build_wire, record_msg_id
from broker.engines.base import Session, Subscription
from protocol import DLQ_PREFIX, BadRequestError, BrokerUnavailableError
from storage import IndexTarget, NewRecord

if TYPE_CHECKING:
    from broker.engines.embedded.engine import EmbeddedEngine

__all__ = ["EmbeddedDelivering"]

log = logging.getLogger("halfmq.broker")


def _offsets_row(gd: GroupDelivery) -> list[list[Any]]:
    """A group's committed offsets as its metadata value ``off/<group>``."""
    return [[t, q, o] for (t, q), o in gd.committed_offsets().items()]


class EmbeddedDelivering:
    """The delivery shell of :class:`EmbeddedEngine` (see the module docstring)."""

    def subscribe(self: EmbeddedEngine, s: Session, rid: int, sub: Subscription) -> None:
        """Make ``s`` a member of ``sub.group`` consuming ``sub.topic``; deliveries follow."""
        if s.conn_id in self._subscriptions:
            raise BadRequestError("this connection already has a subscription")
        self._check_group_room(sub.group)
        fifo = getattr(sub, "fifo", False)
        if fifo and not self._group_is_fifo(sub.group):
            if sub.group in self.groups:
                raise BadRequestError(f"group {sub.group!r} exists and is not FIFO: make it FIFO with "
                                      "the admin API (halfmq admin group-settings GROUP --fifo on)")
        if not sub.topic.startswith("%"):
            self._ensure_topic(sub.topic)
        if fifo and not self._group_is_fifo(sub.group):
            self._set_group_settings_now(sub.group, {"fifo": True})
        gd = self._group(sub.group)
        self._subscriptions[s.conn_id] = (sub.group, sub.topic)
        loop = asyncio.get_running_loop()
        if sub.start == "latest" and any((sub.topic, q) not in gd.cursors
                                         for q in range(self.queue_count(sub.topic))):
            # the group starts at the topic's end: that start is saved before the reply
            # (else a crash before the next checkpoint would start it again at a later end,
            # and the messages stored between the two would never reach the group)
            gd.ensure_topic(sub.topic, start="latest")
            save = loop.create_task(self._save_offsets_of(gd))  # (it reads every cursor made so far)
            self._saving_starts[sub.group] = save
            save.add_done_callback(lambda t, g=sub.group: self._start_saved(g, t))
        saving = self._saving_starts.get(sub.group)
        if saving is not None:  # (also a member joining while its group's start is being saved)
            join = loop.create_task(self._join_after(saving, s, rid, sub, gd))
            self._joining.add(join)
            join.add_done_callback(self._joining.discard)
            return
        self._join(s, rid, sub, gd)

    def _start_saved(self: EmbeddedEngine, group: str, save: asyncio.Task[None]) -> None:
        if self._saving_starts.get(group) is save:
            del self._saving_starts[group]
        if not save.cancelled() and save.exception() is not None:  # (each joiner reports it)
            log.error("saving the start of group %s failed: %r", group, save.exception())

    def _join(self: EmbeddedEngine, s: Session, rid: int, sub: Subscription, gd: GroupDelivery) -> None:
        gd.subscribe(s.conn_id, sub.topic, tags=sub.tags, prefetch=sub.prefetch,
                     max_reconsume_times=sub.max_reconsume_times, start=sub.start)
        self._consumers[s.conn_id] = s
        log.info("consumer %r (%s) subscribed: group %s, topic %s, tags %r, start %s, prefetch %d",
                 s.client_id, s.peer, sub.group, sub.topic, sub.tags, sub.start, sub.prefetch)
        s.reply(rid, {})
        self.schedule_dispatch()

    async def _join_after(self: EmbeddedEngine, save: asyncio.Task[None], s: Session, rid: int,
                          sub: Subscription, gd: GroupDelivery) -> None:
        """Let ``s`` join once ``save`` (its group's new start) is durable."""
        try:
            await asyncio.shield(save)
        except Exception as exc:  # noqa: BLE001 - the client gets it (logged once, above)
            if self._subscriptions.get(s.conn_id) == (sub.group, sub.topic):
                del self._subscriptions[s.conn_id]
            s.error(rid, BrokerUnavailableError(f"the group's start could not be saved: {exc}"))
            return
        if not s.closed and self._subscriptions.get(s.conn_id) == (sub.group, sub.topic):
            self._join(s, rid, sub, gd)

    async def _save_offsets_of(self: EmbeddedEngine, gd: GroupDelivery) -> None:
        assert self.store is not None
        value = _offsets_row(gd)
        await self.store.metadata.put(f"off/{gd.group}", value)
        self._last_saved[gd.group] = value

    def unsubscribe(self: EmbeddedEngine, s: Session, rid: int) -> None:
        """No new deliveries to ``s``; its leases stay until acked or expired."""
        sub = self._subscriptions.get(s.conn_id)
        if sub is not None:
            self._group(sub[0]).unsubscribe(s.conn_id)
        s.reply(rid, {})

    def ack(self: EmbeddedEngine, s: Session, rid: int, acks: list[tuple[int, bool]]) -> None:
        """Results of deliveries; failed ones become retry / dead-letter records."""
        sub = self._subscriptions.get(s.conn_id)
        if sub is None:
            raise BadRequestError("ACK without a subscription")
        gd = self.groups[sub[0]]
        now = time.time()
        if self.trace:
            self._trace_acks(gd, acks, now)
        pending = gd.ack_many(s.conn_id, acks, now)
        if gd.acked:
            self._acked_groups.add(gd)
        if pending:
            self._append_pending(gd, pending)
        # the reply (a barrier) waits for this iteration's append: every ack and retry of
        # this connection until now is then durable
        self._queue_records([], (s, rid, {}) if rid else None)
        self.schedule_dispatch()

    def session_writable(self: EmbeddedEngine, s: Session) -> None:
        """``s`` drained its output: deliveries may resume."""
        self.schedule_dispatch()

    def _append_pending(self: EmbeddedEngine, gd: GroupDelivery, pending: list[PendingRecord]) -> None:
        """Append the retry / dead-letter records of failed deliveries; once durable, their
        source offsets are done."""

        def done(exc: BaseException | None) -> None:
            if exc is None:
                for pr in pending:
                    gd.durable(pr)
                self._acked_groups.add(gd)  # their sources are done: logged with the next acks
                self._schedule_flush()
            self.schedule_dispatch()

        self._queue_records([pr.record for pr in pending], done)

    def _ack_records(self: EmbeddedEngine) -> list[NewRecord]:
        """One ``RT_ACK`` record per group with acks since the last call."""
        records = []
        for gd in self._acked_groups:
            acked = gd.take_acked()
            if acked:
                records.append(NewRecord(RT_ACK, {"g": gd.group, "a": acked}, b"", IndexTarget(ACK_TOPIC, 0)))
        self._acked_groups.clear()
        return records

    def schedule_dispatch(self: EmbeddedEngine) -> None:
        """Run ``dispatch`` soon (once per loop iteration however often it is asked)."""
        if not self._dispatch_scheduled and not self._stopping:
            self._dispatch_scheduled = True
            asyncio.get_running_loop().call_soon(self.dispatch)

    def dispatch(self: EmbeddedEngine, flush: bool = False) -> None:
        """Lease what can be delivered to every group's members with room; with ``flush``,
        write the deliveries now instead of at the end of the loop iteration."""
        self._dispatch_scheduled = False
        now = time.time()
        consumers = self._consumers
        receivers = self._receivers
        more = False
        for gd in self.groups.values():
            if not gd.members:
                continue
            for mid, m in gd.members.items():
                c = receivers[mid][0] if m.receiver and mid in receivers else consumers.get(mid)
                m.budget = c.output_room() if c is not None else 0
            try:
                out, _wake = gd.poll(now, build_wire)
            except Exception:
                log.exception("delivery poll failed for group %s", gd.group)
                continue
            if out and self.trace:
                self._trace_delivered(gd, out, now)
            if gd.more:  # it read its share of entries for this iteration: go on in the next
                more = True
            if not out:
                continue
            if len(gd.members) == 1:  # one member (the usual case): all its own, in order
                per_conn: dict[str, list[Any]] = {out[0][0]: [[token, wire] for _m, token, wire in out]}
            else:
                per_conn = defaultdict(list)
                for member_id, token, wire in out:
                    per_conn[member_id].append([token, wire])
            for member_id, items in per_conn.items():
                if member_id in receivers:
                    self._answer_receiver(gd, member_id, items)
                    continue
                c = consumers.get(member_id)
                if c is not None:
                    c.deliver(items)
                    if flush:
                        c.flush()
        if more:
            self.schedule_dispatch()

    async def _tick_loop(self: EmbeddedEngine) -> None:
        """Expire leases and release due retries; cheap when idle."""
        while True:
            await asyncio.sleep(0.05)
            now = time.time()
            for gd in list(self.groups.values()):
                expired = gd.expire(now)
                if expired:
                    if self.trace:
                        self._trace_expired(gd, expired, now)
                    self._append_pending(gd, expired)
            self.dispatch()
            if self._trace_buf:  # --trace events with nothing else to ride with
                self._schedule_flush()

    async def _load_offsets(self: EmbeddedEngine) -> None:
        """Saved group progress, then what the log holds since: acks and dead letters."""
        store = self.store
        assert store is not None
        md = store.metadata
        for key, value in (await md.items("off/")).items():
            group = key[4:]
            self._saved_offsets[group] = {(t, q): o for t, q, o in value}
        ack_from = await md.get("ackoff", 0)
        dlq_from: dict[str, int] = await md.get("dlqoff", {})
        n = 0
        for _o, rec in self._scan_queue(ACK_TOPIC, 0, ack_from):
            group = rec.header["g"]
            if group:
                self._replay_acks.setdefault(group, []).extend(rec.header["a"])
                n += len(rec.header["a"])
        groups = set(self._saved_offsets) | set(self._replay_acks)
        for group in groups:
            # dead letters since: their pending retries are not delivered again (the entry's
            # time is the dead-letter record's; it points at the message record)
            dead = self._replay_dead.setdefault(group, {})
            dlq = DLQ_PREFIX + group
            start = max(dlq_from.get(group, 0), store.queue_start(dlq, 0))
            for _o, entry in self._scan_entries(dlq, 0, start, store.queue_end(dlq, 0)):
                try:
                    msg_id = record_msg_id(store.read(entry.pos))
                except (KeyError, ValueError):
                    continue  # the message record is gone (retention)
                dead[msg_id] = max(dead.get(msg_id, 0), entry.store_time)
        if n:
            log.info("recovered %d acks written since the last saved group progress", n)

    async def _checkpoint_loop(self: EmbeddedEngine) -> None:
        while True:
            await asyncio.sleep(1.0)
            try:
                await self._persist_offsets()
            except Exception:
                log.exception("checkpoint failed")

    async def _persist_offsets(self: EmbeddedEngine) -> None:
        """Save every group's committed offsets, with the ends of ``%ACK%`` and of each
        group's DLQ now: after a crash only what the log holds from there is replayed."""
        store = self.store
        assert store is not None
        # read the ends first: anything acked or dead-lettered later lies at or after them
        items: dict[str, Any] = {"ackoff": store.queue_end(ACK_TOPIC, 0),
                                 "dlqoff": {g: store.queue_end(DLQ_PREFIX + g, 0) for g in self.groups}}
        for name, gd in self.groups.items():
            value = _offsets_row(gd)
            if self._last_saved.get(name) != value:
                items[f"off/{name}"] = value
                self._last_saved[name] = value
        marks = (items["ackoff"], items["dlqoff"])
        if len(items) > 2 or marks != self._last_marks:
            await store.metadata.put_many(items)
            self._last_marks = marks

