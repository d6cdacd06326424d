"""Delayed and scheduled messages, and RECALL, on the JetStream engine.

How this works
--------------
A scheduled message is stored once, at SEND, and made visible by the engine itself when
it is due, with the message scheduler of nats-server >= 2.12 (ADR-51: a stream with
``allow_msg_schedules``; a message with ``Nats-Schedule: @at <RFC 3339 time>`` and
``Nats-Schedule-Target: <subject>`` is held by the stream leader, which publishes a copy
to the target at that time and then removes the schedule message). The scheduler is turned
on for a topic's stream at its first scheduled or delayed message (``StreamSet.allow_schedules``),
not for every topic: with it on, a SIGSTOP of the stream leader past the election timeout
was measured to pause sends for the whole stop (12 s) instead of under 10 s.

- **SEND with ``at``**: the message record (body, ``ext.at``) goes to the parked subject
  ``hmq.<T>.p.<queue>`` (no group consumes it); its stream sequence ``S`` makes its
  message id as for any message. Then a tiny schedule record, the pointer ``[3, S, due]``,
  goes to ``hmq.<T>.s.<S>`` with ``@at due`` and the visible subject
  ``hmq.<T>.m.<queue>.<tag>`` as its target. The reply (``queue_offset`` -1) waits for
  both. When due, the engine publishes the pointer on the visible subject: consumers
  resolve it to the parked body exactly like a commit pointer (one get), the message id
  is the parked one, and the wire message carries ``{"at": due}``.
- **Delayed transactions**: a half message keeps ``ext.d`` (the delay, ms). Its COMMIT
  publishes the same kind of schedule for the half, due ``delay`` ms after the commit
  (``TxLedger.publish_pointer``), instead of the pointer; a rollback schedules nothing.
- **RECALL**: the message id names ``S``; the schedule on ``hmq.<T>.s.<S>`` is deleted
  (``STREAM.MSG.DELETE``), which the stream leader orders with the scheduler's own
  publish-and-remove: either the delete wins (recalled, never delivered) or the schedule
  fired first (the delete finds nothing: "already due"). An empty marker on
  ``hmq.<T>.x.<S>`` then records the recall (for a repeat and the admin view).

Why the engine's scheduler and not a schedule stream with a due-time consumer of our
own: the scheduler is replicated with the stream (it is rebuilt from the stored
schedule messages on every replica, so a leader change or ``kill -9`` loses nothing),
compares due times with ``<=`` against the leader's clock (never early), needs no
gateway to be alive at the due time, and a due message costs the engine one internal
publish instead of a consumer delivery, an ack and a publish by a gateway. What it
costs: the stream leader keeps an in-memory entry per pending schedule (not bounded
by the gateway), and its timer fires at most every 250 ms, so a message is typically
delivered up to ~300 ms after its time (README, "Cluster mode differences").
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from broker.engines.base import Session
from broker.engines.jetstream import naming
from broker.engines.jetstream.client import EngineAPIError, PubAck
from broker.engines.jetstream.parts import EngineParts
from broker.engines.jetstream.records import Kind, decode_record, encode_pointer
from broker.engines.jetstream.streams import TopicStream
from protocol.errors import BadRequestError, HalfMQError, MessageStateError

__all__ = ["JetStreamScheduling", "at_header", "schedule_item"]

#: A parked message must be due this long (s) before --retention would drop it.
_RETENTION_MARGIN = 300.0
#: Schedules read at most for one admin view of what comes next.
_VIEW_BUDGET = 2_000


def at_header(due_ms: int) -> str:
    """The ``Nats-Schedule`` value for epoch millisecond ``due_ms`` (exact, UTC)."""
    secs, ms = divmod(int(due_ms), 1000)
    return "@at " + time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{ms:03d}Z"


def schedule_item(topic: str, seq: int, queue: int, tags: str | None,
                  due_ms: int) -> tuple[str, bytes, dict[str, str]]:
    """The publish ``(subject, payload, headers)`` that makes record ``seq`` of ``topic``
    visible on its queue at ``due_ms``."""
    return (naming.schedule_subject(topic, seq), encode_pointer(seq, due_ms),
            {"Nats-Schedule": at_header(due_ms),
             "Nats-Schedule-Target": naming.message_subject(topic, queue, tags)})


def _iso(ms: int) -> str:
    return at_header(ms)[4:]


class JetStreamScheduling(EngineParts):
    """The scheduling part of :class:`JetStreamEngine` (see the module docstring)."""

    def _check_delays(self, msgs: list[list[Any]]) -> None:
        """Refuse (``BadRequestError``, nothing stored) a delivery time the topic stream
        would not keep the message for: a parked message ages out with ``--retention``."""
        limit = int((self.config.retention - _RETENTION_MARGIN) * 1000)
        now = int(time.time() * 1000)
        for row in msgs:
            opts = row[5] if len(row) > 5 else None
            if opts and (opts.get("at", now) - now > limit or opts.get("delay", 0) > limit):
                raise BadRequestError(
                    f"a delivery time more than {limit // 1000} s ahead is refused in cluster mode: "
                    f"the engine keeps messages --retention {self.config.retention:g} s "
                    "(keep --max-delay below it)")

    async def _schedule_parked(self, dues: list[tuple[int, str, int, str | None, int]],
                               acks: list[Any]) -> dict[int, BaseException]:
        """Publish the schedules of the parked messages stored as ``acks[i]`` for each
        ``(i, topic, queue, tags, due_ms)`` of ``dues``; returns the failures by ``i``."""
        items: list[tuple[str, bytes, dict[str, str] | None]] = []
        which: list[int] = []
        for i, topic, queue, tags, due in dues:
            ack = acks[i]
            if not isinstance(ack, PubAck):
                continue
            subject, payload, headers = schedule_item(topic, ack.seq, queue, tags, due)
            headers["Nats-Msg-Id"] = f"s:{topic}:{ack.seq}"
            items.append((subject, payload, headers))
            which.append(i)
        failed: dict[int, BaseException] = {}
        if items:
            results = await self.client.publish_many(items, deadline=self.send_deadline)
            for i, r in zip(which, results, strict=True):
                if not isinstance(r, PubAck):
                    failed[i] = r
        return failed

    def recall(self, s: Session, rid: int, msg_id: str,
               allowed: Callable[[str], None] | None = None) -> None:
        """Cancel the scheduled message ``msg_id`` if it is not yet due; reply
        ``{"state": "RECALLED"}`` once the engine has deleted its schedule (again for one
        already recalled), else ``MessageStateError`` (unknown, not scheduled, due), or
        what ``allowed(topic)`` raises for the message's topic (a front end's rights check)."""
        self._track(self._recall(s, rid, msg_id, allowed), "recall")

    async def admin_recall(self, msg_id: str) -> None:
        """The admin API's recall (see ``recall``); raises ``MessageStateError``."""
        await self.recall_scheduled(msg_id)

    async def _recall(self, s: Session, rid: int, msg_id: str,
                      allowed: Callable[[str], None] | None) -> None:
        from broker.engines.jetstream.engine import as_client_error

        try:
            await self.recall_scheduled(msg_id, allowed)
        except Exception as exc:
            if not s.closed:
                s.error(rid, exc if isinstance(exc, HalfMQError) else as_client_error(exc))
                s.flush()
            return
        if not s.closed:
            s.reply(rid, {"state": "RECALLED"})
            s.flush()

    async def recall_scheduled(self, msg_id: str, allowed: Callable[[str], None] | None = None) -> None:
        """Delete the schedule of ``msg_id``; raises ``MessageStateError`` (see ``recall``)."""
        found = await self.ledger.lookup(msg_id)
        if found is None:
            raise MessageStateError(f"no message {msg_id}")
        stream, seq, _queue, record, _stored_ms = found
        if allowed is not None:
            allowed(stream.topic)
        if record.kind is Kind.HALF:
            if record.ext.get("d"):
                raise MessageStateError(
                    f"message {msg_id} is a delayed transactional message: roll its transaction back "
                    "instead (a committed one cannot be recalled)")
            raise MessageStateError(f"message {msg_id} is a transactional message, not a scheduled one")
        due = record.ext.get("at")
        if due is None:
            raise MessageStateError(f"message {msg_id} was not scheduled (sent without delay or deliver_at)")
        too_late = MessageStateError(f"message {msg_id} was due at {_iso(due)}: already delivered, "
                                     "it cannot be recalled")
        sched = await self.client.get_last(stream.name, naming.schedule_subject(stream.topic, seq))
        if sched is None:
            if await self._recalled(stream.name, stream.topic, seq) or due > int(time.time() * 1000):
                return  # recalled before
            raise too_late
        try:
            await self.client.api(f"STREAM.MSG.DELETE.{stream.name}", {"seq": sched.seq, "no_erase": True})
        except EngineAPIError:  # the scheduler published it and removed the schedule first
            raise too_late from None
        await self.client.publish(naming.recall_subject(stream.topic, seq), b"",
                                  msg_id=f"x:{stream.topic}:{seq}")

    async def _recalled(self, stream: str, topic: str, seq: int) -> bool:
        return await self.client.get_last(stream, naming.recall_subject(topic, seq)) is not None

    async def _schedule_state(self, ts: TopicStream, seq: int, due: int) -> dict[str, Any]:
        """``{"deliver_at", "state"}`` of parked message ``seq``: scheduled, released or recalled."""
        if await self.client.get_last(ts.name, naming.schedule_subject(ts.topic, seq)) is not None:
            state = "scheduled"
        elif await self._recalled(ts.name, ts.topic, seq):
            state = "recalled"
        else:
            state = "released" if due <= int(time.time() * 1000) else "scheduled"
        return {"deliver_at": due, "state": state}

    async def _pending_schedules(self, ts: TopicStream, budget: int) -> tuple[int, list[tuple[int, int]]]:
        """How many schedules of ``ts`` are pending, and ``(due, seq)`` of up to ``budget`` of them."""
        info = await self.client.api(f"STREAM.INFO.{ts.name}", {"subjects_filter": f"hmq.{ts.topic}.s.*"})
        subjects = list(info["state"].get("subjects") or {})
        found = []
        for subject in subjects[:max(0, budget)]:
            last = await self.client.get_last(ts.name, subject)
            if last is not None:
                rec = decode_record(last.data)
                if rec.due_ms is not None:
                    found.append((rec.due_ms, rec.half_seq))
        return len(subjects), found

    # -- admin view ---------------------------------------------------------------------

    async def admin_scheduled(self, topic: str | None = None, limit: int = 100) -> dict[str, Any]:
        """Scheduled messages not yet due (of ``topic``, or all): how many per topic, and
        the next ``limit`` in due order (msg_id, topic, deliver_at, transactional). Reads at
        most ``_VIEW_BUDGET`` schedules; ``complete`` is False past that."""
        topics = [topic] if topic is not None else await self.streams.topics()
        counts: dict[str, int] = {}
        found: list[tuple[int, str, int]] = []  # (due, topic, seq)
        budget = _VIEW_BUDGET
        for t in topics:
            ts = await self.streams.ensure_topic_if_exists(t)
            if ts is None:
                continue
            n, pending = await self._pending_schedules(ts, budget)
            if n:
                counts[t] = n
            found += [(due, t, seq) for due, seq in pending]
            budget -= n
        found.sort()
        upcoming = []
        for due, t, seq in found[:limit]:
            ts = await self.streams.ensure_topic(t)
            stored = await self.client.get(ts.name, seq)
            upcoming.append({"msg_id": naming.encode_msg_id(ts.prefix, seq), "topic": t, "deliver_at": due,
                             "transactional": stored is not None and ".h." in stored.subject})
        return {"scheduled": sum(counts.values()), "topics": dict(sorted(counts.items())),
                "next": upcoming, "complete": budget >= 0}
