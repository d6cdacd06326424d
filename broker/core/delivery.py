"""Delivery core: which message goes to which member of a consumer group, leases, retries, DLQ.

How this works
--------------
One ``GroupDelivery`` per consumer group. It does no I/O of its own: it reads queue
indexes and records through a ``QueueReader`` (the store in the broker, a dict in tests),
takes the current time as an argument, and *returns* what the shell must do — deliveries
to send and records to append.

- **Cursors.** For every queue the group consumes (the topic's queues and the group's
  retry queues) a ``QueueCursor`` keeps ``next_offset`` (the next entry to read) and the
  set of offsets still in flight. The group's committed offset for that queue is the
  lowest offset in flight, or ``next_offset`` when none is: everything below it is done.
  Every offset done above it is reported through ``take_acked`` so the shell can log it
  durably (acks, and sources of durable retry and dead-letter records); after a crash the
  group restarts from its saved committed offsets and skips what the log says was done
  (``replay_acked``), so only deliveries in flight come again (C8).
- **Members.** Push consumers subscribe (``subscribe``) and get up to ``prefetch`` leases
  each; a pull request (``add_receiver``) is a one-shot member asking for up to N messages,
  each leased for its own *invisible duration*. ``poll`` hands the next entries to members
  with room, round-robin, so a message is leased to one member at a time (C2), and never
  more bytes than a member's ``budget`` (what its connection can take now).
- **Leases** (``broker.core.leases``). A push delivery's deadline is ``ack_timeout``, a
  pulled one's its invisible duration; ``settle`` acks, nacks or moves a lease by receipt
  handle, from any connection of the group. ``ack(ok=False)``, a nack that runs out, or a
  lease that expires (``expire``) is a failed attempt: the core returns a retry record for
  ``%RETRY%<group>`` (or, when the delivery was the last allowed, a dead-letter record for
  ``%DLQ%<group>``) and the offset stays in flight until the shell reports the record
  durable (``durable``).
- **Retry queues.** ``%RETRY%<group>`` has one queue per delay level: queue ``n`` holds
  retries after the ``n``-th failure and waits ``retry_delays[n]``; queue
  ``EXPIRED_LEVEL`` holds expired leases and waits nothing (the lease already waited).
  Within a queue entries are in store order and share one delay, so the head is always
  the next one due: no timer per message, and retries survive a restart because they are
  ordinary log records. After a restart only the newest retry record of a message counts.
- **FIFO** (``broker.core.fifo``): in a FIFO group the messages of one message group go
  out one at a time, in queue order; a failing one holds its group through its retries.
- **Dead letters.** The DLQ record's index entry points at the original message record,
  so the body is not copied; it is delivered from ``%DLQ%<group>`` with property
  ``ORIGIN_TOPIC``.

Per-group settings (FIFO, max attempts, retry delays) can be given at construction and
changed with ``configure``; otherwise each subscription's ``max_reconsume_times`` applies.

``GroupDelivery`` is assembled from two parts: this module (members, cursors, ``poll``,
recovery after a restart) and :mod:`broker.core.outcomes` (acks, nacks, settles,
expiries and the retry and dead-letter records they make), over the state both share
(:mod:`broker.core.group_state`: the data types, and the group's attributes declared once).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from broker.core.fifo import LOOKAHEAD, FifoOrder
from broker.core.group_state import (
    DEFAULT_MAX_RECONSUME,
    EXPIRED_LEVEL,
    Member,
    MessageBuilder,
    PendingRecord,
    QueueCursor,
    QueueReader,
)
from broker.core.leases import Delivery, LeaseTable, StaleHandleError
from broker.core.lifecycle import DeliveryState
from broker.core.outcomes import DeliveryOutcomes
from broker.core.records import (
    H_TAGS,
    header_ext,
    parse_tags,
    retry_topic,
    tag_hash,
)
from storage import Record

__all__ = [
    "QueueReader",
    "Delivery",
    "GroupDelivery",
    "PendingRecord",
    "StaleHandleError",
    "EXPIRED_LEVEL",
    "DEFAULT_MAX_RECONSUME",
]

#: Queue entries one ``poll`` reads at most (filtered and skipped ones included); past it
#: ``more`` is set and the shell polls again in the next loop iteration, so a tag filter
#: over a long backlog never holds the event loop.
SCAN_PER_POLL = 4096


_LEASED = DeliveryState.LEASED  # (a new Delivery's state and version are passed by position: faster)
_heappush = heapq.heappush


def _mgroup(rec: Record) -> str | None:
    ext = header_ext(rec.header) if type(rec.header) is list else None  # type: ignore[arg-type]
    return ext.get("g") if ext else None


class GroupDelivery(DeliveryOutcomes):
    """Delivery state of one consumer group (see the module docstring)."""

    def __init__(
        self,
        group: str,
        reader: QueueReader,
        *,
        queue_counts: Callable[[str], int],
        retry_delays: tuple[float, ...],
        ack_timeout: float,
        offsets: dict[tuple[str, int], int] | None = None,
        acked: Iterable[tuple[str, int, int]] = (),
        dead: Mapping[str, int] | None = None,
        fifo: bool = False,
        max_reconsume_times: int | None = None,
        max_leases: int = 65536,
    ) -> None:
        self.group = group
        self.reader = reader
        self.queue_counts = queue_counts
        self.retry_delays = tuple(retry_delays)
        self.ack_timeout = ack_timeout
        self.retry_topic = retry_topic(group)
        self.max_reconsume_times = max_reconsume_times
        #: live leases of the group at most (push and pull members together): memory bound
        self.max_leases = max_leases
        self.fifo: FifoOrder | None = FifoOrder() if fifo else None
        self.cursors: dict[tuple[str, int], QueueCursor] = {}
        self._saved = dict(offsets or {})
        self.members: dict[str, Member] = {}
        self.leases = LeaseTable()
        self._tokens = itertools.count(1)
        self._rr = 0
        self.tags: frozenset[str] | None = None
        self._tag_hashes: frozenset[int] | None = None
        self.stats = {"delivered": 0, "acked": 0, "failed": 0, "expired": 0, "dead_lettered": 0}
        self._skip: dict[tuple[str, int], set[int]] = {}
        #: offsets done since the last ``take_acked`` (the shell logs them durably)
        self.acked: list[list[Any]] = []
        #: set by ``poll`` when it stopped at ``SCAN_PER_POLL`` with entries left to read
        self.more = False
        self._scan = SCAN_PER_POLL
        self._retry_levels: list[int] = []
        self._ensure_levels()
        for (t, q) in self._saved:
            if t == self.retry_topic and (t, q) not in self.cursors:
                self._retry_levels.append(q)
                self._cursor((t, q))
        self.replay_acked(acked)
        self._recover_pending_retries(dead or {})

    def _ensure_levels(self) -> None:
        """A cursor for every retry level of the current delays (and the expired level; the
        level just past the delays held expired leases in older stores)."""
        n = len(self.retry_delays)
        for level in [*range(n + 1), EXPIRED_LEVEL]:
            if (self.retry_topic, level) not in self.cursors:
                self._retry_levels.append(level)
                self._cursor((self.retry_topic, level), start="earliest")
        self._retry_levels.sort()

    def _level_delay(self, level: int) -> float:
        return self.retry_delays[level] if level < len(self.retry_delays) else 0.0

    def _recover_pending_retries(self, dead: Mapping[str, int]) -> None:
        """After a restart, from the retry records not yet redelivered:

        - a message with a retry record is not read again from its original queue, even
          when the committed offset of that queue was saved before the retry was written;
        - of a message's retry records only the newest is kept: each failure wrote one,
          and the older ones were done when the next was durable;
        - none is kept for a message dead-lettered at or after it (``dead``: msg_id ->
          store time in ms of its newest dead-letter entry);
        - in a FIFO group, a message whose newest retry is still pending holds its group.
        """
        rt = self.retry_topic
        newest: dict[str, tuple[int, int, int, int]] = {}  # msg_id -> (pos, level, offset, msg pos)
        for level in self._retry_levels:
            cur = self.cursors[(rt, level)]
            off = cur.next_offset
            end = self.reader.queue_end(rt, level)
            while off < end:
                entries = self.reader.read_queue(rt, level, off, 1024)
                if not entries:
                    break
                for o, entry in entries:
                    off = o + 1
                    # (an acked one, already skipped, still supersedes the older ones)
                    h = self.reader.read(entry.pos).header
                    if h.get("oo", -1) >= 0:
                        self._skip.setdefault((h["ot"], h["oq"]), set()).add(h["oo"])
                    msg_id = h["id"]
                    died = dead.get(msg_id)
                    if died is not None and died >= entry.store_time:
                        cur.skip.add(o)
                        continue
                    prev = newest.get(msg_id)
                    if prev is None or prev[0] < entry.pos:
                        newest[msg_id] = (entry.pos, level, o, h["rp"])
                        if prev is not None:
                            self.cursors[(rt, prev[1])].skip.add(prev[2])
                    else:
                        cur.skip.add(o)
        if self.fifo is not None:
            for _pos, level, o, msg_pos in newest.values():
                if o not in self.cursors[(rt, level)].skip:
                    mg = _mgroup(self.reader.read(msg_pos))
                    if mg is not None:
                        self.fifo.block(mg)

    def replay_acked(self, acked: Iterable[tuple[str, int, int]]) -> None:
        """After a restart: offsets done after the saved committed offsets (from the
        durable ack records) are not delivered again."""
        for topic, qid, off in acked:
            cur = self.cursors.get((topic, qid))
            if cur is None:
                self._skip.setdefault((topic, qid), set()).add(off)
            elif off >= cur.next_offset:
                cur.skip.add(off)

    def take_acked(self) -> list[list[Any]]:
        """The ``[topic, queue, offset]`` of every offset done since the last call."""
        acked, self.acked = self.acked, []
        return acked

    def configure(self, *, fifo: bool | None = None, max_reconsume_times: int | None = -1,
                  retry_delays: tuple[float, ...] | None = None) -> None:
        """Change the group's settings (``-1``: leave as is; ``None`` max: per subscription).
        FIFO order applies to deliveries made after the change."""
        if fifo is not None and fifo != (self.fifo is not None):
            self.fifo = FifoOrder() if fifo else None
        if max_reconsume_times != -1:
            self.max_reconsume_times = max_reconsume_times
        if retry_delays is not None:
            self.retry_delays = tuple(retry_delays)
            self._ensure_levels()

    # -- membership -------------------------------------------------------------------

    @property
    def known(self) -> bool:
        """True once the group has stored offsets (so its start position is decided)."""
        return bool(self._saved) or any(k[0] != self.retry_topic for k in self.cursors)

    def subscribe(
        self,
        member_id: str,
        topic: str,
        *,
        tags: str | None,
        prefetch: int,
        max_reconsume_times: int,
        start: str = "earliest",
    ) -> None:
        """Add a member consuming ``topic``; a new group starts per ``start`` (C7)."""
        self.members[member_id] = Member(
            member_id, topic, parse_tags(tags), max(1, prefetch), max(0, max_reconsume_times)
        )
        self._set_tags(tags)
        self.ensure_topic(topic, start=start)

    def add_receiver(self, member_id: str, topic: str, *, tags: str | None, max_messages: int,
                     invisible: float) -> None:
        """A pull request: a one-shot member for up to ``max_messages`` messages, each
        leased for ``invisible`` seconds. Remove it with ``member_gone`` once answered."""
        self.members[member_id] = Member(
            member_id, topic, parse_tags(tags), max(1, max_messages), DEFAULT_MAX_RECONSUME,
            receiver=True, invisible=invisible,
        )
        self._set_tags(tags)
        self.ensure_topic(topic)

    def _set_tags(self, expr: str | None) -> None:
        self.tags = parse_tags(expr)
        self._tag_hashes = None if self.tags is None else frozenset(tag_hash(t) for t in self.tags)

    def ensure_topic(self, topic: str, *, start: str = "earliest") -> None:
        """Make sure every queue of ``topic`` has a cursor (topics may grow)."""
        for qid in range(self.queue_counts(topic)):
            self._cursor((topic, qid), start=start)

    def _cursor(self, qkey: tuple[str, int], *, start: str = "earliest") -> QueueCursor:
        cur = self.cursors.get(qkey)
        if cur is None:
            saved = self._saved.get(qkey)
            if saved is not None:
                off = max(saved, self.reader.queue_start(*qkey))
            elif start == "latest":
                off = self.reader.queue_end(*qkey)
            else:
                off = self.reader.queue_start(*qkey)
            cur = self.cursors[qkey] = QueueCursor(off)
            skip = self._skip.pop(qkey, None)
            if skip:
                cur.skip = {o for o in skip if o >= off}
        return cur

    def unsubscribe(self, member_id: str) -> None:
        """Stop new deliveries to a member; its leases stay until acked or expired."""
        m = self.members.get(member_id)
        if m is not None:
            m.active = False

    def member_gone(self, member_id: str) -> None:
        """The member's connection closed (or a pull request was answered): no more
        deliveries to it; its leases expire normally (C5)."""
        m = self.members.pop(member_id, None)
        if m is not None:
            m.active = False

    def topics(self) -> set[str]:
        """Topics this group consumes (from its cursors)."""
        return {k[0] for k in self.cursors if k[0] != self.retry_topic}

    # -- delivering -------------------------------------------------------------------

    def poll(self, now: float, build: MessageBuilder) -> tuple[list[tuple[str, int, list[Any]]], float | None]:
        """Lease due messages to members with room.

        Returns ``(deliveries, wake_at)``: ``deliveries`` are ``(member_id, token, wire)``;
        ``wake_at`` is when the next retry becomes due (None if none is waiting).
        """
        out: list[tuple[str, int, list[Any]]] = []
        self.more = False
        self._scan = SCAN_PER_POLL
        members = [m for m in self.members.values() if m.active and len(m.leases) < m.prefetch and m.budget > 0]
        if not members or len(self.leases) >= self.max_leases:
            return out, None
        by_topic: dict[str, list[Member]] = {}
        for m in members:
            by_topic.setdefault(m.topic, []).append(m)
        if self.fifo is not None and self.fifo.ready:
            self._poll_ready(now, by_topic, build, out)
        wake_at = self._poll_retries(now, by_topic, build, out)
        for topic, tmembers in by_topic.items():
            self._poll_topic(topic, now, tmembers, build, out)
        self.stats["delivered"] += len(out)  # (one lease each)
        return out, wake_at

    def _pick(self, members: list[Member]) -> Member | None:
        if len(self.leases) >= self.max_leases:
            return None
        n = len(members)
        if n == 1:
            m = members[0]
            return m if len(m.leases) < m.prefetch and m.budget > 0 else None
        for i in range(n):
            m = members[(self._rr + i) % n]
            if len(m.leases) < m.prefetch and m.budget > 0:
                self._rr = (self._rr + i + 1) % max(n, 1)
                return m
        return None

    def _room(self, members: list[Member]) -> int:
        room = sum(m.prefetch - len(m.leases) for m in members if m.budget > 0)
        return min(room, self.max_leases - len(self.leases))

    def _poll_topic(self, topic: str, now: float, members: list[Member], build: MessageBuilder, out: list) -> None:
        nq = self.queue_counts(topic)
        reader = self.reader
        tags = self.tags
        fifo = self.fifo
        room = self._room(members)
        # one member (the usual case): while room > 0 it has prefetch room and the group
        # is under max_leases (room counts both down with every lease), so only its byte
        # budget is left to check
        single = members[0] if len(members) == 1 else None
        advanced = True
        while room > 0 and advanced:
            advanced = False
            for qid in range(nq):
                if room <= 0:
                    return
                if self._scan <= 0:
                    self.more = True  # the rest in the next iteration
                    return
                qkey = (topic, qid)  # one tuple for the leases of this queue (ack_many compares it by identity)
                cur = self._cursor(qkey)
                if cur.next_offset >= reader.queue_end(topic, qid):
                    continue
                per_queue = max(1, min(room, 256, self._scan) // nq)
                if fifo is not None:
                    ahead = LOOKAHEAD - (cur.next_offset - cur.committed)
                    if ahead <= 0:
                        continue  # held groups wait: read no further (bounded memory)
                    per_queue = min(per_queue, ahead)
                recs, last = self._read(topic, qid, cur.next_offset, per_queue)
                if last is None:
                    # the records of these entries are gone (retention): step over them
                    entries = reader.read_queue(topic, qid, cur.next_offset, per_queue)
                    if entries:
                        cur.next_offset = entries[-1][0] + 1
                        advanced = True
                    continue
                advanced = True
                self._scan -= last + 1 - cur.next_offset
                for off, rec in recs:
                    if cur.skip and off in cur.skip:
                        cur.skip.discard(off)
                        cur.next_offset = off + 1
                        continue  # done before a restart, or its retry record is pending
                    if tags is not None and rec.header[H_TAGS] not in tags:
                        cur.next_offset = off + 1
                        continue  # filtered out: done for this group (C6)
                    mg = None
                    if fifo is not None:
                        mg = _mgroup(rec)
                        if mg is not None and fifo.is_blocked(mg):
                            fifo.park(mg, (topic, qid), off)  # its turn comes after the holder
                            cur.inflight.add(off)
                            cur.next_offset = off + 1
                            continue
                    if single is not None:
                        m = single if single.budget > 0 else None
                    else:
                        m = self._pick(members)
                    if m is None:
                        return  # every member's byte budget is spent
                    cur.next_offset = off + 1
                    out.append(self._lease(m, qkey, off, rec, now, 0, topic, qid, off, build, topic, mg, cur))
                    room -= 1 if m.budget > 0 else 1 + m.prefetch - len(m.leases)
                    if room <= 0:
                        return
                cur.next_offset = max(cur.next_offset, last + 1)  # past the entries filtered out unread

    def _read(self, topic: str, qid: int, offset: int, n: int) -> tuple[list[tuple[int, Record]], int | None]:
        """Up to ``n`` entries from ``offset``: the records worth looking at, and the last
        offset read (None: nothing readable). With a tag filter the index entries' tag
        hashes are compared first and only the records whose hash matches are read."""
        hashes = self._tag_hashes
        if hashes is None:
            recs = self.reader.read_queue_records(topic, qid, offset, n)
            return recs, (recs[-1][0] if recs else None)
        entries = self.reader.read_queue(topic, qid, offset, n)
        if not entries:
            return [], None
        read = self.reader.read
        out = []
        for o, entry in entries:
            if entry.tag_hash in hashes:
                try:
                    out.append((o, read(entry.pos)))
                except (KeyError, ValueError):
                    pass  # gone (retention)
        return out, entries[-1][0]

    def _poll_ready(self, now: float, by_topic: dict[str, list[Member]], build: MessageBuilder, out: list) -> None:
        """FIFO: deliver the messages whose group's holder finished, in order."""
        assert self.fifo is not None
        ready = self.fifo.ready
        while ready:
            qkey, off, mg = ready[0]
            tmembers = by_topic.get(qkey[0])
            m = self._pick(tmembers) if tmembers else None
            if m is None:
                return
            ready.popleft()
            recs = self.reader.read_queue_records(qkey[0], qkey[1], off, 1)
            if not recs or recs[0][0] != off:  # gone (retention): done
                self.cursors[qkey].inflight.discard(off)
                self.fifo.done(mg)
                continue
            out.append(self._lease(m, qkey, off, recs[0][1], now, 0, qkey[0], qkey[1], off, build, qkey[0], mg))

    def _poll_retries(self, now: float, by_topic: dict[str, list[Member]], build: MessageBuilder, out: list) -> float | None:
        wake_at: float | None = None
        reader = self.reader
        rt = self.retry_topic
        for level in self._retry_levels:
            delay = self._level_delay(level)
            cur = self.cursors[(rt, level)]
            end = reader.queue_end(rt, level)
            while cur.next_offset < end:
                entries = reader.read_queue(rt, level, cur.next_offset, 64)
                if not entries:
                    break
                stop = False
                for off, entry in entries:
                    if cur.skip and off in cur.skip:
                        cur.skip.discard(off)
                        cur.next_offset = off + 1
                        continue  # done before a restart, or superseded by a newer retry
                    due = entry.store_time / 1000.0 + delay
                    if due > now:
                        wake_at = due if wake_at is None else min(wake_at, due)
                        stop = True
                        break
                    rec = reader.read(entry.pos)
                    h = rec.header
                    topic = h["ot"]
                    tmembers = by_topic.get(topic)
                    m = self._pick(tmembers) if tmembers else None
                    if m is None:
                        stop = True
                        break
                    cur.next_offset = off + 1
                    msg = reader.read(h["rp"])
                    mg = _mgroup(msg) if self.fifo is not None else None
                    out.append(self._lease(m, (rt, level), off, msg, now, h["rt"], topic, h["oq"], h["oo"], build,
                                           topic, mg))
                if stop:
                    break
        return wake_at

    def _lease(
        self, m: Member, qkey: tuple[str, int], off: int, rec: Record, now: float, reconsume: int,
        topic: str, oq: int, oo: int, build: MessageBuilder, deliver_topic: str, mgroup: str | None = None,
        cur: QueueCursor | None = None,
    ) -> tuple[str, int, list[Any]]:
        token = next(self._tokens)
        wire = build(rec, deliver_topic, oq, oo, reconsume, None)
        deadline = now + (m.invisible if m.receiver else self.ack_timeout)
        d = Delivery(token, m.member_id, qkey, off, rec.pos, wire[0], topic, oq, oo, reconsume,
                     deadline, wire[3], _LEASED, 0, mgroup)
        (cur or self.cursors[qkey]).inflight.add(off)
        m.budget -= rec.size
        m.leases[token] = d
        leases = self.leases  # (LeaseTable.add, inline: once per message)
        leases.by_token[token] = d
        _heappush(leases.heap, (deadline, token, 0))
        if mgroup is not None and self.fifo is not None:
            self.fifo.hold(mgroup, token)
        return m.member_id, token, wire  # (counted in stats["delivered"] by ``poll``)

    # -- state for persistence and the admin API --------------------------------------

    def committed_offsets(self) -> dict[tuple[str, int], int]:
        """Committed offset of every queue (to persist)."""
        return {k: c.committed for k, c in self.cursors.items()}

    def lag(self) -> int:
        """Messages of the consumed topics not yet done by the group."""
        return sum(
            max(0, self.reader.queue_end(*k) - c.committed) for k, c in self.cursors.items() if k[0] != self.retry_topic
        )

    def waiting_retry(self) -> int:
        """Retry entries not yet redelivered."""
        return sum(
            max(0, self.reader.queue_end(*k) - c.next_offset) for k, c in self.cursors.items() if k[0] == self.retry_topic
        )

    def lease_of(self, msg_id: str) -> Iterable[Delivery]:
        """Live leases of a message (admin API)."""
        return [d for d in self.leases.values() if d.msg_id == msg_id]
