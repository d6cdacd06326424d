"""Delivering on the embedded engine: subscriptions, dispatch, acks, leases, group progress.

How this works
--------------
One ``GroupDelivery`` per consumer group (``broker.core.delivery``) decides which message
goes to which member; this shell gives it I/O. ``dispatch`` runs at most once per loop
iteration (``schedule_dispatch``) when something changed — new records stored, acks, a
member with room, a session that drains — and on a 50 ms tick that also expires leases and
releases due retries. Deliveries go out as one DELIVER frame per member per dispatch.

A failed delivery (RECONSUME_LATER, an expired lease) becomes a retry or dead-letter
record that the core returns; the shell appends it and tells the core when it is durable,
and only then is the source offset done.

Group progress (committed offsets) is persisted to metadata every second and at
shutdown; after a crash a group resumes from them, so only the last window's acks may be
redelivered (C8).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from typing import TYPE_CHECKING, Any

from broker.core.delivery import GroupDelivery
from broker.core.records import build_wire
from broker.engines.base import Session, Subscription
from protocol import BadRequestError

if TYPE_CHECKING:
    from broker.engines.embedded.engine import EmbeddedEngine

__all__ = ["EmbeddedDelivering"]

log = logging.getLogger("halfmq.broker")


class EmbeddedDelivering:
    """The delivery shell of :class:`EmbeddedEngine` (see the module docstring)."""

    def subscribe(self: EmbeddedEngine, s: Session, rid: int, sub: Subscription) -> None:
        """Make ``s`` a member of ``sub.group`` consuming ``sub.topic``; deliveries follow."""
        if s.conn_id in self._subscriptions:
            raise BadRequestError("this connection already has a subscription")
        if not sub.topic.startswith("%"):
            self._ensure_topic(sub.topic)
        gd = self._group(sub.group)
        gd.subscribe(s.conn_id, sub.topic, tags=sub.tags, prefetch=sub.prefetch,
                     max_reconsume_times=sub.max_reconsume_times, start=sub.start)
        self._subscriptions[s.conn_id] = (sub.group, sub.topic)
        self._consumers[s.conn_id] = s
        log.info("consumer %s (%s) subscribed: group %s, topic %s, tags %s, start %s, prefetch %d",
                 s.client_id, s.peer, sub.group, sub.topic, sub.tags, sub.start, sub.prefetch)
        s.reply(rid, {})
        self.schedule_dispatch()

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
        pending = []
        for token, ok in acks:
            r = gd.ack(s.conn_id, token, ok, now)
            if r is not None:
                pending.append(r)
        if pending:
            fut = self._append_pending(gd, pending)
            if rid:
                fut.add_done_callback(lambda f: s.reply(rid, {}))
        else:
            s.reply(rid, {})
        self.schedule_dispatch()

    def session_writable(self: EmbeddedEngine, s: Session) -> None:
        """``s`` drained its output: deliveries may resume."""
        self.schedule_dispatch()

    def _append_pending(self: EmbeddedEngine, gd: GroupDelivery, pending: list[Any]) -> asyncio.Future[Any]:
        assert self.store is not None
        _, fut = self.store.append([pr.record for pr in pending])

        def done(f: asyncio.Future[Any]) -> None:
            if f.exception() is None:
                for pr in pending:
                    gd.record_durable(pr.qkey, pr.offset)
            self.schedule_dispatch()

        fut.add_done_callback(done)
        return fut

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
        for gd in self.groups.values():
            if not gd.members:
                continue
            try:
                out, _wake = gd.poll(now, build_wire)
            except Exception:
                log.exception("delivery poll failed for group %s", gd.group)
                continue
            if not out:
                continue
            per_conn: dict[str, list[Any]] = defaultdict(list)
            for member_id, token, wire in out:
                per_conn[member_id].append([token, wire])
            for member_id, items in per_conn.items():
                c = consumers.get(member_id)
                if c is not None:
                    c.deliver(items)
                    if flush:
                        c.flush()

    async def _tick_loop(self: EmbeddedEngine) -> None:
        """Expire leases and release due retries; cheap when idle."""
        while True:
            await asyncio.sleep(0.05)
            now = time.time()
            for gd in list(self.groups.values()):
                expired = gd.expire(now)
                if expired:
                    self._append_pending(gd, expired)
            self.dispatch()

    async def _load_offsets(self: EmbeddedEngine) -> None:
        assert self.store is not None
        for key, value in (await self.store.metadata.items("off/")).items():
            group = key[4:]
            self._saved_offsets[group] = {(t, q): o for t, q, o in value}

    async def _checkpoint_loop(self: EmbeddedEngine) -> None:
        while True:
            await asyncio.sleep(1.0)
            try:
                await self._persist_offsets()
            except Exception:
                log.exception("checkpoint failed")

    async def _persist_offsets(self: EmbeddedEngine) -> None:
        assert self.store is not None
        items = {}
        for name, gd in self.groups.items():
            offs = gd.committed_offsets()
            value = [[t, q, o] for (t, q), o in offs.items()]
            if self._last_saved.get(name) != value:
                items[f"off/{name}"] = value
                self._last_saved[name] = value
        if items:
            await self.store.metadata.put_many(items)

