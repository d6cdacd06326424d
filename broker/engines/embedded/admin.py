"""The admin views and actions of the embedded engine (served by the admin HTTP API).

How this works
--------------
Read-only views are computed from what the engine already holds — the store's queue
indexes, the groups' cursors and leases, the transaction table — never from a second copy
kept for the admin API. Each returns JSON-able values. The actions (resend a dead letter,
resolve a transaction by hand) go through the same paths as the data plane: records
appended with the group commit, outcomes recorded once (T6).

Nothing here is on the hot path; views that walk queues are bounded by their ``limit``.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from broker.core.delivery import EXPIRED_LEVEL
from broker.core.lifecycle import TxState
from broker.core.records import (
    H_KEYS,
    H_QUEUE,
    H_TAGS,
    H_TOPIC,
    RETRY_PREFIX,
    RT_HALF,
    RT_MSG,
    RT_RETRY,
    build_wire,
    header_ext,
    parse_msg_id,
    record_msg_id,
    retry_topic,
    tag_hash,
    wire_json,
)
from broker.engines.embedded.settings import SETTINGS_PREFIX, MetadataSettings
from protocol import DLQ_PREFIX
from protocol.names import validate_group_ref
from storage import IndexTarget, NewRecord, Record

if TYPE_CHECKING:
    from broker.core.delivery import GroupDelivery
    from broker.engines.embedded.engine import EmbeddedEngine

__all__ = ["EmbeddedAdmin", "SETTINGS_PREFIX", "METRIC_GROUPS"]

#: Entries ``_locate`` reads, at most, looking for a message whose entry came later.
_LOCATE_SCAN = 100_000

#: Consumer groups reported by name in the metrics (the first ones by name).
METRIC_GROUPS = 200



class EmbeddedAdmin:
    """The admin views and actions of :class:`EmbeddedEngine` (see the module docstring)."""

    # -- views ----------------------------------------------------------------------------

    async def admin_stats(self: EmbeddedEngine) -> dict[str, Any]:
        """Store counters and messages sent."""
        assert self.store is not None
        return {"store": dict(self.store.stats), "sent": self.stats.get("sent", 0)}

    async def admin_topics(self: EmbeddedEngine) -> list[dict[str, Any]]:
        """Topics (``%DLQ%`` ones included) with their queues and message counts, and their
        scheduled messages: how many, and the next one's delivery time (epoch ms or None)."""
        store = self.store
        assert store is not None
        names = set(self.topics)
        names.update(t for t, _q in store.queues() if t.startswith(DLQ_PREFIX))
        scheduled = self.scheduled_by_topic()
        out = []
        for name in sorted(names):
            queues = []
            for q in range(self.queue_count(name)):
                start, end = store.queue_start(name, q), store.queue_end(name, q)
                queues.append({"queue_id": q, "min_offset": start, "max_offset": end, "messages": end - start})
            n, next_due = scheduled.get(name, (0, None))
            out.append({"topic": name, "queues": queues, "messages": sum(q["messages"] for q in queues),
                        "scheduled": n, "next_due": next_due})
        return out

    async def admin_create_topic(self: EmbeddedEngine, topic: str, queues: int | None) -> dict[str, Any]:
        """Create ``topic`` (a name a producer may send to, checked by the caller) with
        ``queues`` queues (None: ``--default-queues``), whether or not topics are
        auto-created, and store it before answering. A topic that exists is left as it is.
        Returns ``{"topic", "queues", "created"}``; raises ``LimitExceededError`` past
        ``--max-topics``."""
        have = self.topics.get(topic)
        if have is not None:
            return {"topic": topic, "queues": have, "created": False}
        n = self._add_topic(topic, queues or self.config.default_queues, " (admin API)")
        assert self.store is not None
        await self.store.metadata.put_topic(topic, n)
        return {"topic": topic, "queues": n, "created": True}

    async def admin_groups(self: EmbeddedEngine) -> list[dict[str, Any]]:
        """Per group: topics, members, delivered, acked, failed, expired, in flight,
        waiting retry, dead-lettered, lag."""
        store = self.store
        assert store is not None
        out = []
        for name, gd in sorted(self.groups.items()):
            dlq = DLQ_PREFIX + name
            out.append({
                "group": name,
                "topics": sorted(gd.topics()),
                "members": len(gd.members),
                "delivered": gd.stats["delivered"],
                "acked": gd.stats["acked"],
                "failed": gd.stats["failed"],
                "expired": gd.stats["expired"],
                "in_flight": len(gd.leases),
                "waiting_retry": gd.waiting_retry(),
                "dead_lettered": store.queue_end(dlq, 0) - store.queue_start(dlq, 0),
                "lag": gd.lag(),
            })
        return out

    async def admin_members(self: EmbeddedEngine, group: str) -> list[dict[str, Any]] | None:
        """The members of a group (push consumers and pending pull requests): client id,
        address, client library, topic, tags, leases held; None if there is no such group."""
        gd = self.groups.get(group)
        if gd is None:
            return None
        out = []
        for mid, m in sorted(gd.members.items()):
            s = self._member_of(mid)
            out.append({"member": mid, "kind": "pull" if m.receiver else "push",
                        "client_id": s.client_id if s else None, "address": s.peer if s else None,
                        "agent": getattr(s, "agent", None), "version": getattr(s, "protocol_version", None),
                        "topic": m.topic, "tags": sorted(m.tags) if m.tags else None,
                        "prefetch": m.prefetch, "leases": len(m.leases)})
        return out

    async def admin_dlq(self: EmbeddedEngine, group: str, limit: int = 1000) -> list[dict[str, Any]]:
        """The dead letters of ``group`` (at most ``limit``, oldest first): the message and
        when it was dead-lettered."""
        store = self.store
        assert store is not None
        validate_group_ref(group, "group")
        dlq = DLQ_PREFIX + group
        out = []
        for o, entry in store.read_queue(dlq, 0, store.queue_start(dlq, 0), limit):
            try:
                msg = store.read(entry.pos)
            except (KeyError, ValueError, OSError):
                continue  # the message record is gone (retention)
            body = wire_json(build_wire(msg, msg.header[H_TOPIC], 0, o, 0))
            body["dead_lettered_at"] = entry.store_time
            body["dlq_offset"] = o
            out.append(body)
        return out

    async def admin_transactions(self: EmbeddedEngine, state: TxState) -> list[dict[str, Any]]:
        """Half messages in ``state`` (committed / rolled back: the most recent 1,000)."""
        now = time.time()
        return [
            {
                "msg_id": hm.msg_id,
                "topic": hm.topic,
                "keys": list(hm.keys),
                "group": hm.group,
                "producer_id": hm.producer_id,
                "state": hm.state.name,
                "age": round(now - hm.prepared_at, 3),
                "checks": hm.checks,
                "next_check_at": hm.next_check_at if hm.state is TxState.PREPARED else None,
            }
            for hm in self.tx.list(state)
        ]

    def read_message(self: EmbeddedEngine, msg_id: str) -> Record:
        """The stored record of a message id; KeyError if there is none."""
        assert self.store is not None
        try:
            pos = parse_msg_id(msg_id)
            rec = self.store.read(pos)
        except (ValueError, KeyError, OSError) as exc:
            raise KeyError(msg_id) from exc
        if rec.rtype not in (RT_MSG, RT_HALF) or record_msg_id(rec) != msg_id:
            raise KeyError(msg_id)
        return rec

    async def admin_message(self: EmbeddedEngine, msg_id: str) -> dict[str, Any] | None:
        """The message, its transaction state if it was a half message, and its state in
        each group; None if there is no such message."""
        try:
            rec = self.read_message(msg_id)
        except KeyError:
            return None
        h = rec.header
        topic = h[H_TOPIC]
        qid, off = self._locate(topic, rec)
        if rec.rtype == RT_HALF and qid < 0:  # not (or not yet) visible: where it will go
            qid, off = h[H_QUEUE], -1
        body = wire_json(build_wire(rec, topic, qid, off, 0))
        sched = self.schedule_state(rec)
        if sched is not None:
            body["schedule"] = sched
        tx_state = self.tx.state_of(msg_id)
        if tx_state is not None:
            body["transaction"] = {"state": tx_state.name, "checks": self.tx.checks_of(msg_id)}
        body["groups"] = self._group_states(msg_id, rec)
        return body

    def _locate(self: EmbeddedEngine, topic: str, rec: Record) -> tuple[int, int]:
        """``(queue_id, queue_offset)`` of a stored message, or (-1, -1) if no queue holds
        it. Entries of a queue are in store-time order, so a binary search on the time the
        entry was written finds it among the few of that millisecond: the record's store
        time for a plain message; for a scheduled one its delivery time (or later); for a
        committed half message its commit time, or, once the transaction table has
        forgotten that, up to ``_LOCATE_SCAN`` entries from the half's store time."""
        store = self.store
        assert store is not None
        exact = True
        since = rec.store_time
        if rec.rtype == RT_MSG:
            due = (header_ext(rec.header) or {}).get("at")  # type: ignore[arg-type]
            if due is not None:
                since, exact = due, False
        elif rec.rtype == RT_HALF:
            hm = self.tx.get(record_msg_id(rec))
            if hm is not None and hm.resolved_at is not None:
                since = int(hm.resolved_at * 1000) - 1
            exact = False
        for q in range(self.queue_count(topic)):
            found = self._scan_for(topic, q, self._since(topic, q, since), rec.pos, since if exact else None)
            if found >= 0:
                return q, found
        return -1, -1

    def _scan_for(self: EmbeddedEngine, topic: str, q: int, off: int, pos: int, until: int | None) -> int:
        """The offset, from ``off`` on, of the entry pointing at ``pos``: up to the first entry
        written after ``until`` (ms), or without ``until`` up to ``_LOCATE_SCAN`` entries; -1."""
        store = self.store
        assert store is not None
        scanned = 0
        while scanned < _LOCATE_SCAN:
            chunk = store.read_queue(topic, q, off, 4096)
            if not chunk:
                return -1
            for o, entry in chunk:
                if until is not None and entry.store_time > until:
                    return -1
                if entry.pos == pos:
                    return o
            scanned += len(chunk)
            off = chunk[-1][0] + 1
        return -1

    def _done_in_origin_queue(self: EmbeddedEngine, gd: GroupDelivery, topic: str, rec: Record) -> bool:
        """Whether the group is past the message in its original queue (acked or filtered)."""
        qid, off = self._locate(topic, rec)
        cur = gd.cursors.get((topic, qid)) if qid >= 0 else None
        if cur is None:
            return False
        return off < cur.committed or (off < cur.next_offset and off not in cur.inflight)

    def _group_states(self: EmbeddedEngine, msg_id: str, rec: Record) -> dict[str, Any]:
        """The message's state in each group, from leases, retry queues, DLQ and cursors."""
        store = self.store
        assert store is not None
        topic = rec.header[H_TOPIC]
        states: dict[str, Any] = {}
        for name, gd in self.groups.items():
            if topic not in gd.topics():
                continue
            delays = gd.retry_delays
            st: dict[str, Any] = {"deliveries": 0, "state": "pending"}
            retries = []
            rt = RETRY_PREFIX + name
            for (t, q), cur in gd.cursors.items():
                if t != rt:
                    continue
                for off, r in self._scan_queue(t, q):
                    if r.header.get("id") == msg_id:
                        due = r.store_time / 1000.0 + (delays[q] if q < len(delays) else 0.0)
                        retries.append((r.header["rt"], due, off >= cur.next_offset, bool(r.header.get("resent"))))
            dlq = DLQ_PREFIX + name
            # dead-lettered, unless an operator sent it back since (its DLQ entry stays)
            dead = any(record_msg_id(r) == msg_id for _o, r in self._scan_queue(dlq, 0)) and \
                not any(r[3] for r in retries)
            leases = list(gd.lease_of(msg_id))
            st["deliveries"] = max([r[0] for r in retries], default=0) + (1 if (retries or leases or dead) else 0)
            if dead:
                st["state"] = "dead_lettered"
            elif leases:
                st["state"] = "in_flight"
                st["lease_deadline"] = leases[0].deadline
            elif any(r[2] for r in retries):
                st["state"] = "retrying"
                st["retry_at"] = min(r[1] for r in retries if r[2])
            else:
                done = self._done_in_origin_queue(gd, topic, rec)
                st["state"] = "acked" if done else "pending"
                if done and not st["deliveries"]:
                    st["deliveries"] = 1
            states[name] = st
        return states

    async def admin_find(self: EmbeddedEngine, topic: str, key: str, limit: int = 100) -> list[dict[str, Any]]:
        """Messages of ``topic`` carrying business key ``key`` (at most ``limit``)."""
        out: list[dict[str, Any]] = []
        for q in range(self.queue_count(topic)):
            for o, rec in self._scan_queue(topic, q):
                if key in rec.header[H_KEYS]:
                    out.append(wire_json(build_wire(rec, topic, q, o, 0)))
                    if len(out) >= limit:
                        return out
        return out

    def metrics_snapshot(self: EmbeddedEngine) -> dict[str, Any]:
        """Everything the Prometheus metrics report, read at once (no per-message cost:
        the counters are kept per batch, per request or per group)."""
        assert self.store is not None
        groups = {}
        for i, (name, gd) in enumerate(sorted(self.groups.items())):
            if i >= METRIC_GROUPS:
                break
            groups[name] = {**gd.stats, "lag": gd.lag(), "in_flight": len(gd.leases),
                            "retrying": gd.waiting_retry(), "members": len(gd.members),
                            "topic_names": sorted(gd.topics())}
        return {
            "topics": {t: tuple(c) for t, c in self.topic_counts.items()},
            "counters": dict(self.counters),
            "store": dict(self.store.stats),
            "histograms": {"fsync_seconds": self.store.fsync_seconds.cumulative(),
                           "fsync_seconds_sum": self.store.fsync_seconds.total,
                           "batch_records": self.store.batch_records.cumulative(),
                           "batch_records_sum": self.store.batch_records.total},
            "groups": groups,
            "transactions": self.tx.stats,
            "topics_total": len(self.topics),
            "groups_total": len(self.groups),
        }

    # -- actions --------------------------------------------------------------------------

    def resend_from_dlq(self: EmbeddedEngine, group: str, msg_id: str) -> asyncio.Future[Any]:
        """Send a dead-lettered message back to its original topic for ``group`` only.

        Raises ``KeyError`` if it is not in ``%DLQ%<group>``, ``InvalidNameError`` for a
        bad group name. The returned future resolves when the retry record is durable.
        """
        assert self.store is not None
        validate_group_ref(group, "group")
        dlq = DLQ_PREFIX + group
        found = next((rec for _o, rec in self._scan_queue(dlq, 0) if record_msg_id(rec) == msg_id), None)
        if found is None:
            raise KeyError(msg_id)
        h = found.header
        topic = h[H_TOPIC]
        level = EXPIRED_LEVEL  # no delay: read by the group whatever its own retry ladder
        rec = NewRecord(RT_RETRY, {"id": msg_id, "rp": found.pos, "rt": 0, "ot": topic,
                                   "oq": h[H_QUEUE] if len(h) > H_QUEUE else 0,
                                   "oo": -1, "g": group, "resent": True},
                        b"", IndexTarget(retry_topic(group), level, tag_hash(h[H_TAGS])))
        self._group(group)
        _, fut = self.store.append([rec])
        fut.add_done_callback(lambda f: self.schedule_dispatch())
        return fut

    async def admin_resend(self: EmbeddedEngine, group: str, msg_id: str) -> None:
        """:meth:`resend_from_dlq`, awaited until durable."""
        await self.resend_from_dlq(group, msg_id)

    async def admin_recall(self: EmbeddedEngine, msg_id: str) -> None:
        """Recall a scheduled message not yet due, awaited until durable (``MessageStateError``
        if it cannot be: unknown, not scheduled, or due)."""
        fut = self.recall_scheduled(msg_id)
        if fut is not None:
            await fut

    async def admin_resolve(self: EmbeddedEngine, msg_id: str, state: TxState) -> None:
        """Resolve a prepared transaction by hand (``TransactionStateError`` if it cannot be)."""
        fut = self.resolve_transaction(msg_id, state)
        if fut is not None:
            await fut

    # -- settings (see broker.engines.base and .settings) ------------------------------

    def _settings(self: EmbeddedEngine) -> MetadataSettings:
        assert self.store is not None
        return MetadataSettings(self.store.metadata)

    async def settings_get(self: EmbeddedEngine, key: str, default: Any = None) -> Any:
        """The value stored under ``key``, or ``default``."""
        return await self._settings().settings_get(key, default)

    async def settings_put(self: EmbeddedEngine, key: str, value: Any) -> None:
        """Store ``value`` under ``key`` (in the data directory's metadata)."""
        await self._settings().settings_put(key, value)

    async def settings_delete(self: EmbeddedEngine, key: str) -> None:
        """Remove ``key`` (no error if absent)."""
        await self._settings().settings_delete(key)

    async def settings_items(self: EmbeddedEngine, prefix: str) -> dict[str, Any]:
        """Every key starting with ``prefix``, with its value, in key order."""
        return await self._settings().settings_items(prefix)
