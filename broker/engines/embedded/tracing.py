"""Message trace on the embedded engine: the life of one message, in order.

How this works
--------------
Most of a message's life is in the log already, and the trace reads it back from there:
the message record (stored: time, topic, keys, producer group and client id of a half
message), its schedule (``at`` in the header, released or recalled), its transaction
outcome in ``%OP%`` (with who decided it: the producer, a check-back after N checks, an
operator), each retry record (the attempt that failed and when the next one is due —
``after: lease ended`` for a lease that expired or was nacked by a pull consumer — or a
resend by an operator) and dead letter of each group. Those are found by a binary search
on entry times from the message's store time on, each queue read for at most
``_SCAN_CAP`` entries.

What the log does not hold is who sent a plain message and each delivery attempt. With
``--trace`` (off by default, as in RocketMQ) the engine collects them as compact events,
one per batch rather than per message: ``["s", client_id, address, [pos, ...]]`` per SEND,
``["D", group, client_id, address, ms, [msg_id, ...], [attempt, ...]]`` per member of one
dispatch, ``["O", group, outcome, ms, [msg_id, ...]]`` per outcome of one ACK or SETTLE
request or expiry sweep (logs written before this form hold one ``["d", msg_id, group,
client_id, address, attempt, ms]`` per delivery and one ``["o", msg_id, group, outcome,
ms]`` per outcome; the view reads both). They go into ``_trace_buf`` and ride in the next append as
``RT_TRACE`` records indexed in ``%TRACE%`` (one per loop iteration, or one per 2,048
events; no append of their own; the 50 ms tick writes leftovers). With tracing off each
hook is one boolean check per batch (a SEND flush, a dispatch of a group, an ACK or SETTLE
request, an expiry sweep), nothing per message. Events still in the buffer when the broker stops are lost:
a trace is a diagnosis aid, not part of the delivery guarantee.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from broker.core.delivery import EXPIRED_LEVEL
from broker.core.records import (
    H_BORN,
    H_KEYS,
    H_PCLIENT,
    H_PGROUP,
    H_QUEUE,
    H_TAGS,
    H_TOPIC,
    OP_TOPIC,
    RETRY_PREFIX,
    RT_HALF,
    RT_TRACE,
    TRACE_TOPIC,
    header_ext,
    tx_ops,
)
from broker.engines.embedded.transactions import BY_NAMES, CODE_OUTCOMES
from protocol import DLQ_PREFIX
from storage import IndexTarget, NewRecord

if TYPE_CHECKING:
    from broker.core.delivery import GroupDelivery, PendingRecord
    from broker.engines.base import Session
    from broker.engines.embedded.engine import EmbeddedEngine

__all__ = ["EmbeddedTracing"]

#: Entries read at most per queue when looking for one message's records.
_SCAN_CAP = 20_000

#: Messages named per ``RT_TRACE`` record, at most (~40 bytes each): an event counts one
#: per message id or record position it names, and one event names at most this many.
_EVENTS_PER_RECORD = 2048


def _weight(ev: list[Any]) -> int:
    """How many messages one buffered event names (see ``_EVENTS_PER_RECORD``)."""
    kind = ev[0]
    if kind == "D":
        return len(ev[5])
    if kind == "O":
        return len(ev[4])
    if kind == "s":
        return len(ev[3])
    return 1


#: Order of events in the same millisecond. A resend comes before the delivery it causes
#: (and its ack or failure), which can fall in the resend's millisecond; the dead letter it
#: answers comes first by an operator's request, in an earlier millisecond.
_ORDER = {"stored": 0, "scheduled": 1, "committed": 2, "rolled_back": 2, "abandoned": 2, "released": 3,
          "resent": 3, "delivered": 4, "acked": 5, "failed": 5, "expired": 5, "retry": 6, "dead_lettered": 6}


def sort_events(events: list[dict[str, Any]]) -> None:
    """Order a message's trace events in place: by time (ms), those of one millisecond by
    ``_ORDER``, events without a time last."""
    events.sort(key=lambda e: (e["at"] is None, e["at"] or 0, _ORDER.get(e["event"], 9)))


class EmbeddedTracing:
    """The ``--trace`` hooks and the trace view of :class:`EmbeddedEngine`."""

    # -- hooks (each called behind one ``if self.trace``) --------------------------------

    def _trace_records(self: EmbeddedEngine) -> list[NewRecord]:
        """The buffered events as records naming at most about ``_EVENTS_PER_RECORD``
        messages each (so a record stays small whatever a loop iteration delivered); the
        caller appends them with its batch."""
        buf = self._trace_buf
        self._trace_buf = []  # type: ignore[var-annotated]
        records = []
        part: list[list[Any]] = []
        weight = 0
        for ev in buf:
            w = _weight(ev)
            if part and weight + w > _EVENTS_PER_RECORD:
                records.append(NewRecord(RT_TRACE, {"e": part}, b"", IndexTarget(TRACE_TOPIC, 0)))
                part, weight = [], 0
            part.append(ev)
            weight += w
        if part:
            records.append(NewRecord(RT_TRACE, {"e": part}, b"", IndexTarget(TRACE_TOPIC, 0)))
        return records

    def _trace_sent(self: EmbeddedEngine, entries: list[tuple[Any, ...]], stored: list[Any]) -> None:
        """Who sent the messages of one append: client id, address, record positions."""
        out = []
        for s, _rid, _half, _topic, first, qids, _msgs in entries:
            if s is not None and qids:
                out.append(["s", s.client_id, s.peer, [st.pos for st in stored[first : first + len(qids)]]])
        self._trace_buf.extend(out)

    def _member_of(self: EmbeddedEngine, member_id: str) -> Session | None:
        receiver = self._receivers.get(member_id)
        return receiver[0] if receiver is not None else self._consumers.get(member_id)

    def _trace_delivered(self: EmbeddedEngine, gd: GroupDelivery, out: list[Any], now: float) -> None:
        """One ``D`` event per member of one dispatch: its message ids and their attempts."""
        ms = int(now * 1000)
        per_member: dict[str, tuple[list[str], list[int]]] = {}
        for member_id, _token, wire in out:
            ids = per_member.get(member_id)
            if ids is None:
                ids = per_member[member_id] = ([], [])
            ids[0].append(wire[0])
            ids[1].append(wire[10] + 1)
        buf = self._trace_buf
        step = _EVENTS_PER_RECORD
        for member_id, (msg_ids, attempts) in per_member.items():
            s = self._member_of(member_id)
            who = (s.client_id, s.peer) if s else (member_id, "?")
            for i in range(0, len(msg_ids), step):
                buf.append(["D", gd.group, *who, ms, msg_ids[i : i + step], attempts[i : i + step]])

    def _trace_outcomes(self: EmbeddedEngine, group: str, outcome: str, msg_ids: list[str], now: float) -> None:
        """``O`` events: one outcome of a group's messages, at one time."""
        ms = int(now * 1000)
        step = _EVENTS_PER_RECORD
        for i in range(0, len(msg_ids), step):
            self._trace_buf.append(["O", group, outcome, ms, msg_ids[i : i + step]])

    def _trace_acks(self: EmbeddedEngine, gd: GroupDelivery, acks: list[Any], now: float) -> None:
        get = gd.leases.get
        acked: list[str] = []
        failed: list[str] = []
        for token, ok in acks:
            d = get(token)
            if d is not None:
                (acked if ok else failed).append(d.msg_id)
        self._trace_outcomes(gd.group, "acked", acked, now)
        self._trace_outcomes(gd.group, "failed", failed, now)

    def _trace_settles(self: EmbeddedEngine, gd: GroupDelivery, items: list[Any], now: float) -> None:
        acked: list[str] = []
        failed: list[str] = []
        for item in items:
            try:
                handle, action, _ms = item
                d = gd.leases.by_handle(handle)
            except Exception:  # a malformed or stale item: the settle itself answers it
                continue
            if action == "ack":
                acked.append(d.msg_id)
            elif action in ("nack", "dlq"):
                failed.append(d.msg_id)
                if action == "nack":  # its lease now runs out: that is not an expiry of its own
                    self._trace_nacked.add((gd.group, d.msg_id))
        self._trace_outcomes(gd.group, "acked", acked, now)
        self._trace_outcomes(gd.group, "failed", failed, now)

    def _trace_expired(self: EmbeddedEngine, gd: GroupDelivery, expired: list[PendingRecord], now: float) -> None:
        nacked = self._trace_nacked
        msg_ids = []
        for pr in expired:
            msg_id = pr.record.header["id"]  # type: ignore[call-overload]
            if (gd.group, msg_id) in nacked:
                nacked.discard((gd.group, msg_id))
            else:
                msg_ids.append(msg_id)
        self._trace_outcomes(gd.group, "expired", msg_ids, now)

    # -- the view -----------------------------------------------------------------------

    def _since(self: EmbeddedEngine, topic: str, q: int, since_ms: int) -> int:
        """The first offset of a queue whose entry was written at or after ``since_ms``."""
        store = self.store
        assert store is not None
        lo, hi = store.queue_start(topic, q), store.queue_end(topic, q)
        while lo < hi:
            mid = (lo + hi) // 2
            entries = store.read_queue(topic, q, mid, 1)
            if entries and entries[0][1].store_time < since_ms:
                lo = mid + 1
            else:
                hi = mid
        return lo

    def _records_since(self: EmbeddedEngine, topic: str, q: int, since_ms: int) -> Any:
        """``(offset, record)`` of a queue from ``since_ms`` on, at most ``_SCAN_CAP``."""
        n = 0
        for o, rec in self._scan_queue(topic, q, self._since(topic, q, since_ms)):
            yield o, rec
            n += 1
            if n >= _SCAN_CAP:
                return

    async def admin_trace(self: EmbeddedEngine, msg_id: str) -> dict[str, Any] | None:
        """The life of one message in time order (see the module docstring); None if there
        is no such message. Each event: ``at`` (epoch ms), ``event`` and its details."""
        try:
            rec = self.read_message(msg_id)
        except KeyError:
            return None
        summary = await self.admin_message(msg_id)
        assert summary is not None
        h = rec.header
        t0 = rec.store_time
        half = rec.rtype == RT_HALF
        ext = header_ext(h) or {}  # type: ignore[arg-type]
        stored: dict[str, Any] = {"at": t0, "event": "stored", "topic": h[H_TOPIC], "kind": "half" if half else "message",
                                  "queue": summary.get("queue_id"), "keys": list(h[H_KEYS]), "tags": h[H_TAGS],
                                  "born": h[H_BORN], "size": len(rec.body)}
        if half:
            stored.update(producer_group=h[H_PGROUP], producer_id=h[H_PCLIENT], queue=h[H_QUEUE])
        events = [stored]
        if ext.get("at") is not None:
            events.append({"at": t0, "event": "scheduled", "deliver_at": ext["at"]})
            sched = summary.get("schedule") or {}
            if sched.get("state") == "released":
                events.append({"at": ext["at"], "event": "released"})
            elif sched.get("state") == "recalled":
                events.append({"at": None, "event": "recalled"})
        if ext.get("d"):
            events.append({"at": t0, "event": "scheduled", "delay_ms": ext["d"], "from": "commit"})
        if half:
            decided = next(((op_rec.store_time, code, by, checks)
                            for _o, op_rec in self._records_since(OP_TOPIC, 0, t0)
                            for op_id, code, _hp, by, checks in tx_ops(op_rec.header) if op_id == msg_id), None)
            if decided is not None:
                at, code, by, checks = decided
                events.append({"at": at, "event": CODE_OUTCOMES[code].name.lower(),
                               "by": BY_NAMES.get(by, "unknown"), "checks": checks})
        events += self._log_deliveries(msg_id, rec.pos, t0)
        if self.trace or self.store.queue_end(TRACE_TOPIC, 0) > 0:  # type: ignore[union-attr]
            events += self._traced(msg_id, rec.pos, t0, stored)
        sort_events(events)
        return {"msg_id": msg_id, "topic": h[H_TOPIC], "keys": list(h[H_KEYS]), "trace": self.trace,
                "events": events, "groups": summary.get("groups", {}),
                "transaction": summary.get("transaction"), "schedule": summary.get("schedule")}

    def _log_deliveries(self: EmbeddedEngine, msg_id: str, pos: int, t0: int) -> list[dict[str, Any]]:
        """Retries, resends and dead letters of ``msg_id`` in every group, from the log."""
        store = self.store
        assert store is not None
        events: list[dict[str, Any]] = []
        for name, gd in sorted(self.groups.items()):
            rt = RETRY_PREFIX + name
            delays = gd.retry_delays
            for q in [*range(len(delays)), EXPIRED_LEVEL]:
                for _o, r in self._records_since(rt, q, t0):
                    if r.header.get("id") != msg_id:
                        continue
                    if r.header.get("resent"):
                        events.append({"at": r.store_time, "event": "resent", "group": name, "by": "operator"})
                        continue
                    delay = delays[q] if q < len(delays) else 0.0
                    events.append({"at": r.store_time, "event": "retry", "group": name, "attempt": r.header["rt"] + 1,
                                   "due": r.store_time + int(delay * 1000),
                                   "after": "lease ended" if q == EXPIRED_LEVEL else "failed"})
            # a DLQ entry points at the message record itself; attempts: the retries before it
            dlq = DLQ_PREFIX + name
            first = self._since(dlq, 0, t0)
            for _o, entry in self._scan_entries(dlq, 0, first, min(store.queue_end(dlq, 0), first + _SCAN_CAP)):
                if entry.pos == pos:
                    retries = [e for e in events if e["group"] == name and e["at"] <= entry.store_time]
                    since = [e for e in retries if e["event"] == "resent"]
                    tries = [e for e in retries if e["event"] == "retry" and (not since or e["at"] >= since[-1]["at"])]
                    events.append({"at": entry.store_time, "event": "dead_lettered", "group": name,
                                   "attempts": len(tries) + 1})
        return events

    def _traced(self: EmbeddedEngine, msg_id: str, pos: int, t0: int, stored: dict[str, Any]) -> list[dict[str, Any]]:
        """Events of ``--trace`` for ``msg_id``: who sent it, each attempt and its outcome."""
        events: list[dict[str, Any]] = []
        for _o, r in self._records_since(TRACE_TOPIC, 0, t0):
            for ev in r.header.get("e", ()):
                kind = ev[0]
                if kind == "s" and pos in ev[3]:
                    stored.update(client_id=ev[1], address=ev[2])
                elif kind == "D" and msg_id in ev[5]:  # (a message is in one dispatch once)
                    events.append({"at": ev[4], "event": "delivered", "group": ev[1], "client_id": ev[2],
                                   "address": ev[3], "attempt": ev[6][ev[5].index(msg_id)]})
                elif kind == "O" and msg_id in ev[4]:
                    events.append({"at": ev[3], "event": ev[2], "group": ev[1]})
                elif kind == "d" and ev[1] == msg_id:  # the per-message form of older logs
                    events.append({"at": ev[6], "event": "delivered", "group": ev[2], "client_id": ev[3],
                                   "address": ev[4], "attempt": ev[5]})
                elif kind == "o" and ev[1] == msg_id:
                    events.append({"at": ev[4], "event": ev[3], "group": ev[2]})
        return events

