"""Delayed and scheduled messages on the embedded engine: the wheel's I/O, walker and recovery.

How this works
--------------
The rules live in ``ScheduleWheel`` (``broker.core.schedule``); this shell gives them I/O.
Why this shape: the log is already the truth and an index entry can point at any stored
record (that is how a commit makes a half message visible), so a scheduled message is
stored once, where a consumer will later read it, and releasing it is one small index
entry. What must be found again at its time is kept in the log too, as small schedule
records chained per second, so memory holds a fixed-size wheel, not one object per
message; a million scheduled messages cost their records on disk.

- **Sending** (``send`` in :mod:`.sending`): a message with a delivery time is an
  ``RT_MSG`` record with ``{"at": due_ms}`` in its header and no index target. Once that
  iteration's append has given the records their positions, ``_schedule_sent`` appends
  one ``RT_SCHEDULE`` record per due second (in ``%SCHED%``, same batch: the producer's
  reply waits for both) and links it into the wheel.
- **Delayed transactions**: a half message may carry ``{"d": delay_ms}``; its COMMIT
  schedules the stored half record at commit time + delay (``_schedule_commit``), the
  schedule record appended before the outcome record, instead of making it visible.
  After a crash, an entry whose commit is not in the log is not scheduled (the check-back
  decides again).
- **The walker** (``_walk``), a timer: about ``_LEAD`` seconds before a second starts it
  loads that second's chain into the wheel's heap; at each entry's millisecond it
  *releases* what is due: one ``RT_RELEASE`` record listing them, then per message an
  ``RT_COMMIT_REF`` record whose index entry, in the topic's queue, points at the stored
  message. Consumers are dispatched to once that append is durable. Never early: an entry
  is released only when the broker's clock has passed its millisecond.
- **Recall**: an ``RT_RECALL`` record; the wheel drops the entry when the walker meets it.
- **Persistence**: every ``_SNAPSHOT_INTERVAL`` (when something changed) and at stop, the
  wheel is written to ``schedule.snapshot`` in the data directory with the ``%SCHED%``
  offset it reflects, after a ``store.flush()`` (so every record it refers to is durable).
- **Recovery**: load the snapshot, replay ``%SCHED%`` from its offset (releases and
  recalls since then are skipped when met), then catch up -- load every second up to now
  and release what is due -- before the broker serves. The release record is written
  before its index entries, so a release cut short by a crash is noticed (the last
  release record's entries are checked) and done again: no message lost, none released
  twice.
- **Retention** keeps every record the schedule still needs (``_schedule_guard``).

A record appended in this iteration is not written yet: the walker reads the headers of
schedule records it just appended from ``_sched_unwritten`` until their batch is written.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from broker.core.lifecycle import TxState
from broker.core.records import (
    H_TOPIC,
    RT_COMMIT_REF,
    RT_HALF,
    RT_MSG,
    RT_RECALL,
    RT_RELEASE,
    RT_SCHEDULE,
    SCHED_TOPIC,
    header_ext,
    make_msg_id,
    parse_msg_id,
    record_msg_id,
)
from broker.core.schedule import (
    E_DUE,
    E_EPOCH,
    E_POS,
    E_TOPIC,
    E_TX,
    BudgetExceeded,
    Entry,
    ScheduleWheel,
    SnapshotError,
)
from broker.engines.base import Session
from protocol import HalfMQError, MessageStateError
from storage import IndexTarget, NewRecord, Record, Stored
from storage.log import fsync_dir

if TYPE_CHECKING:
    from broker.core.transactions import HalfMessage
    from broker.engines.embedded.engine import EmbeddedEngine

__all__ = ["EmbeddedScheduling", "SNAPSHOT_FILE", "wheel_slots"]

log = logging.getLogger("halfmq.broker")

#: The wheel, persisted now and then (see the module docstring).
SNAPSHOT_FILE = "schedule.snapshot"
#: A second's chain is loaded into the heap this long (s) before the second starts.
_LEAD = 0.5
#: How often (s) the wheel is persisted when something changed.
_SNAPSHOT_INTERVAL = 10.0
#: Slots beyond --max-delay (a walker this far behind shares slots through the overflow).
_SLOT_MARGIN = 3600
#: At most this many slots (8 days; longer delays use the overflow chains).
_SLOTS_MAX = 8 * 86400 + _SLOT_MARGIN
#: At most this many messages per release append (a catch-up after a long stop).
_RELEASE_CHUNK = 10_000
#: Entries read from the log at most for one admin view of what comes next.
_VIEW_BUDGET = 200_000


def wheel_slots(max_delay: float) -> int:
    """The wheel's slot count for ``--max-delay`` (seconds)."""
    return min(int(max_delay) + 1 + _SLOT_MARGIN, _SLOTS_MAX)


class EmbeddedScheduling:
    """The scheduling shell of :class:`EmbeddedEngine` (see the module docstring)."""

    schedule: ScheduleWheel
    _sched_rows: list[tuple[int, str, int, int, int, int]]
    _half_delays: dict[str, int]

    def _init_scheduling(self: EmbeddedEngine) -> None:
        self.schedule = ScheduleWheel(slots=wheel_slots(self.config.max_delay), cursor=int(time.time()) - 1)
        # sends of this iteration with a delivery time: (row, topic, queue, tag hash, due, epoch)
        self._sched_rows = []
        self._sched_unwritten: dict[int, dict[str, Any]] = {}  # pos -> header, until written
        self._sched_next_off = 0  # the %SCHED% offset of the next record
        self._sched_dirty = False
        self._sched_replay_off = 0  # the %SCHED% offset replay starts at with the persisted snapshot
        # the walker's pending call and the loop time it was armed for (uvloop returns a
        # plain Handle, without when(), for a time already reached: it runs it at once)
        self._walk_handle: asyncio.Handle | None = None
        self._walk_at = 0.0
        self._half_delays = {}  # pending half message -> delay ms after commit
        self._next_due_cache: tuple[float, dict[str, int]] = (0.0, {})

    # -- placing --------------------------------------------------------------------------

    def _schedule_sent(self: EmbeddedEngine, rows: list[tuple[int, str, int, int, int, int]],
                       stored: list[Stored], fut: asyncio.Future[Any]) -> asyncio.Future[Any]:
        """The scheduled messages of this iteration's append are at ``stored[row]``: append
        their schedule records; return the future to wait for (the last append's)."""
        by_second: dict[int, list[Entry]] = defaultdict(list)
        for row, topic, qid, th, due, epoch in rows:
            st = stored[row]
            by_second[due // 1000].append((due, st.pos, st.size, topic, qid, th, epoch, 0))
        return self._append_schedule(by_second) or fut

    def _schedule_commit(self: EmbeddedEngine, hm: HalfMessage, meta: tuple[int, int, int], delay_ms: int,
                         outcome: list[NewRecord]) -> None:
        """A delayed half message is committed: schedule its stored record ``delay_ms`` from
        now. Its schedule record and then the ``outcome`` records are appended now, in one
        append (the wheel never reflects a commit that is not in the store)."""
        due = int(time.time() * 1000) + delay_ms
        epoch = int(hm.msg_id[:8], 16)
        self._ensure_topic(hm.topic)
        self._append_schedule({due // 1000: [(due, hm.pos, meta[2], hm.topic, meta[0], meta[1], epoch, 1)]},
                              outcome)

    def _append_schedule(self: EmbeddedEngine, by_second: dict[int, list[Entry]],
                         trailing: list[NewRecord] | None = None) -> asyncio.Future[Any] | None:
        """One schedule record per second, each appended and linked before the next is
        built (a record names the previous one of its slot), the ``trailing`` records in the
        last one's append; return the last future."""
        store = self.store
        assert store is not None
        wheel = self.schedule
        fut = None
        armed = False
        seconds = sorted(by_second)
        for second in seconds:
            header = wheel.place(second, by_second[second])
            records = [NewRecord(RT_SCHEDULE, header, b"", IndexTarget(SCHED_TOPIC, 0))]
            if trailing and second == seconds[-1]:
                records += trailing
            stored, fut = store.append(records)
            pos = stored[0].pos
            self._sched_next_off += 1
            if wheel.placed(header, pos):
                armed = True  # entries went straight to the heap
            else:
                self._sched_unwritten[pos] = header
                fut.add_done_callback(functools.partial(_forget, self._sched_unwritten, pos))
        self._sched_dirty = True
        if armed:
            self._arm_walker()
        return fut

    def _sched_read(self: EmbeddedEngine, pos: int) -> dict[str, Any]:
        """The header of the schedule record at ``pos`` (written or not yet)."""
        header = self._sched_unwritten.get(pos)
        if header is not None:
            return header
        assert self.store is not None
        rec = self.store.read(pos)
        if rec.rtype != RT_SCHEDULE:
            raise ValueError(f"record at {pos} is not a schedule record")
        return rec.header  # type: ignore[return-value]

    # -- the walker -----------------------------------------------------------------------

    def _walk(self: EmbeddedEngine) -> None:
        """Load the seconds starting within ``_LEAD``, release what is due, re-arm."""
        self._walk_handle = None
        if self._stopping or self.store is None:
            return
        now = time.time()
        self._load_until(int(now + _LEAD))
        due = self.schedule.pop_due(int(now * 1000))
        if due:
            self._release(due)
        self._arm_walker()

    def _load_until(self: EmbeddedEngine, target: int) -> None:
        wheel = self.schedule
        while wheel.cursor < target:
            try:
                if wheel.load_next(self._sched_read):
                    self._sched_dirty = True
            except Exception:
                log.exception("schedule: a damaged chain of second %d: what could be read is loaded", wheel.cursor)

    def _arm_walker(self: EmbeddedEngine) -> None:
        """Have ``_walk`` run at the next due entry or the next second to load."""
        if self._stopping:
            return
        wheel = self.schedule
        at = wheel.cursor + 1 - _LEAD
        due = wheel.next_due_ms()
        if due is not None:
            at = min(at, due / 1000.0)
        loop = asyncio.get_running_loop()
        when = loop.time() + max(0.0, at - time.time())
        h = self._walk_handle
        if h is not None:
            if self._walk_at <= when:
                return
            h.cancel()
        self._walk_at = when
        self._walk_handle = loop.call_at(when, self._walk)

    def _release(self: EmbeddedEngine, entries: list[Entry]) -> None:
        """Append the release record of ``entries`` and, after it, the index entry of each
        in its topic's queue (pointing at the stored message); dispatch once durable."""
        store = self.store
        assert store is not None
        entries = [e for e in entries if not e[E_TX] or self._still_committed(e)]
        for k in range(0, len(entries), _RELEASE_CHUNK):
            chunk = entries[k : k + _RELEASE_CHUNK]
            records = [NewRecord(RT_RELEASE, {"r": [[e[E_POS], e[E_TOPIC]] for e in chunk]}, b"",
                                 IndexTarget(SCHED_TOPIC, 0))]
            for _due, pos, size, topic, qid, th, _epoch, _tx in chunk:
                nq = self.topics.get(topic) or self._topic_for_release(topic)
                records.append(NewRecord(RT_COMMIT_REF, {"rel": pos}, b"",
                                         IndexTarget(topic, qid % nq, th, ref_pos=pos, ref_size=size)))
            try:
                _stored, fut = store.append(records)
            except Exception:
                log.exception("schedule: cannot release %d messages", len(chunk))
                return
            self._sched_next_off += 1
            self._sched_dirty = True
            fut.add_done_callback(self._released)

    def _topic_for_release(self: EmbeddedEngine, topic: str) -> int:
        """The queue count of a topic a message was accepted for but that the broker does
        not know now (its creation was lost in a crash): created again, whatever
        ``--auto-create-topics`` and ``--max-topics`` say, rather than losing the message."""
        try:
            return self._ensure_topic(topic)
        except HalfMQError as exc:
            log.warning("schedule: topic %s re-created to release its scheduled messages (%s)", topic, exc)
            n = self.topics[topic] = self.config.default_queues
            assert self.store is not None
            asyncio.get_running_loop().create_task(self.store.metadata.put_topic(topic, n))
            return n

    def _released(self: EmbeddedEngine, fut: asyncio.Future[Any]) -> None:
        exc = fut.exception()
        if exc is not None:
            log.error("schedule: a release was not stored: %s", exc)
        elif not self._stopping:
            self.dispatch(flush=True)

    # -- recall ---------------------------------------------------------------------------

    def recall(self: EmbeddedEngine, s: Session, rid: int, msg_id: str,
               allowed: Callable[[str], None] | None = None) -> None:
        """Cancel the scheduled message ``msg_id``; reply ``{"state": "RECALLED"}`` once
        that is durable. Raises ``MessageStateError`` (unknown, not scheduled, due), or what
        ``allowed(topic)`` raises for the message's topic (a front end's rights check)."""
        fut = self.recall_scheduled(msg_id, allowed)
        reply = {"state": "RECALLED"}
        if fut is None:
            s.reply(rid, reply)
            return

        def done(f: asyncio.Future[Any]) -> None:
            exc = f.exception()
            if exc is None:
                s.reply(rid, reply)
            else:
                s.error(rid, MessageStateError(f"recall of {msg_id} not stored: {exc}"))
            s.flush()

        fut.add_done_callback(done)

    def recall_scheduled(self: EmbeddedEngine, msg_id: str,
                         allowed: Callable[[str], None] | None = None) -> asyncio.Future[Any] | None:
        """Recall a scheduled message not yet due. Returns the append future of the recall
        record, or None if it was already recalled. Raises ``MessageStateError`` if there is
        no such message, it was not scheduled, or its time has come; first, ``allowed``
        (if given) is called with the message's topic and may raise."""
        store = self.store
        assert store is not None
        rec = self._message_record(msg_id)
        if allowed is not None:
            allowed(rec.header[H_TOPIC])
        ext = header_ext(rec.header) or {}  # type: ignore[arg-type]
        if rec.rtype == RT_HALF:
            if "d" in ext:
                raise MessageStateError(
                    f"message {msg_id} is a delayed transactional message: roll its transaction back "
                    "instead (a committed one cannot be recalled)")
            raise MessageStateError(f"message {msg_id} is a transactional message, not a scheduled one")
        due = ext.get("at")
        if due is None:
            raise MessageStateError(f"message {msg_id} was not scheduled (sent without delay or deliver_at)")
        topic = rec.header[H_TOPIC]
        try:
            new = self.schedule.recall(rec.pos, topic, due, int(time.time() * 1000))
        except ValueError:
            raise MessageStateError(
                f"message {msg_id} was due at {_iso(due)}: already delivered, it cannot be recalled") from None
        if not new:
            return None
        stored, fut = store.append([NewRecord(RT_RECALL, {"r": rec.pos, "t": topic}, b"", IndexTarget(SCHED_TOPIC, 0))])
        self._sched_next_off += 1
        self._sched_dirty = True
        return fut

    def _message_record(self: EmbeddedEngine, msg_id: str) -> Record:
        """The stored message of ``msg_id`` (``MessageStateError`` if there is none)."""
        assert self.store is not None
        try:
            rec = self.store.read(parse_msg_id(msg_id))
        except (ValueError, KeyError, OSError):
            raise MessageStateError(f"no message {msg_id}") from None
        if rec.rtype not in (RT_MSG, RT_HALF) or record_msg_id(rec) != msg_id:
            raise MessageStateError(f"no message {msg_id}")
        return rec

    # -- persistence and recovery ---------------------------------------------------------

    async def _persist_schedule(self: EmbeddedEngine, final: bool = False) -> None:
        """Write the wheel (if it changed) once every record it reflects is durable."""
        store = self.store
        if store is None or not self._sched_dirty:
            return
        # (every change of the wheel is appended to the store in the same step, so the state
        # captured here is that of the records appended so far)
        self._sched_dirty = False
        off = self._sched_next_off
        data = self.schedule.to_bytes({"off": off})
        try:
            await store.flush()
            await asyncio.to_thread(_write_file, Path(self.data_dir) / SNAPSHOT_FILE, data)
        except BaseException:
            self._sched_dirty = True
            raise
        self._sched_replay_off = off

    async def _schedule_persist_loop(self: EmbeddedEngine) -> None:
        while True:
            await asyncio.sleep(_SNAPSHOT_INTERVAL)
            try:
                await self._persist_schedule()
            except Exception:
                log.exception("schedule: persisting the wheel failed")

    async def _recover_schedule(self: EmbeddedEngine) -> None:
        """Load the persisted wheel, replay ``%SCHED%`` since, release what is due by now."""
        store = self.store
        assert store is not None
        path = Path(self.data_dir) / SNAPSHOT_FILE
        start, end = store.queue_start(SCHED_TOPIC, 0), store.queue_end(SCHED_TOPIC, 0)
        wheel: ScheduleWheel | None = None
        off = start
        try:
            data = await asyncio.to_thread(path.read_bytes)
        except FileNotFoundError:
            data = None
        if data is not None:
            try:
                wheel, extra = ScheduleWheel.from_bytes(data)
                off = int(extra["off"])
                if not start <= off <= end:
                    raise SnapshotError(f"it reflects %SCHED% up to {off}, the log holds {start}..{end}")
            except (SnapshotError, KeyError, TypeError, ValueError) as exc:
                log.warning("schedule: %s unusable (%s): rebuilding the schedule from the log", path, exc)
                wheel, off = None, start
        if wheel is None:
            first = next(iter(self._scan_queue(SCHED_TOPIC, 0, start)), None)
            cursor = (first[1].store_time // 1000 - 1) if first is not None else int(time.time()) - 1
            wheel = ScheduleWheel(slots=wheel_slots(self.config.max_delay), cursor=cursor)
        self._sched_replay_off = off  # (until the next snapshot is written)
        replayed = self._replay_schedule(wheel, off)
        slots = wheel_slots(self.config.max_delay)
        if wheel.slots != slots:
            wheel = wheel.resized(slots)
        self.schedule = wheel
        self._sched_next_off = end
        # catch up: every second up to now, releasing as it goes (memory: one second at a time)
        now = time.time()
        target = int(now + _LEAD)
        wheel.catch_up_start(target)
        released = 0
        while wheel.cursor < target:
            self._load_until(wheel.cursor + 1)
            due = wheel.pop_due(int(now * 1000))
            if due:
                released += len(due)
                self._release(due)
        self._sched_dirty = True
        await self._persist_schedule()
        n = wheel.scheduled()
        if n or replayed or released:
            log.info("schedule: %d scheduled messages (%d records replayed, %d released now)", n, replayed, released)

    def _replay_schedule(self: EmbeddedEngine, wheel: ScheduleWheel, off: int) -> int:
        """Replay the ``%SCHED%`` records from offset ``off``; return how many there were."""
        held: Record | None = None  # a release record: checked if it is the last record
        n = 0
        for _o, rec in self._scan_queue(SCHED_TOPIC, 0, off):
            n += 1
            if held is not None:
                wheel.replay_release(held.header)  # type: ignore[arg-type]
                held = None
            if rec.rtype == RT_SCHEDULE:
                wheel.replay_schedule(rec.header, rec.pos, self._committed)  # type: ignore[arg-type]
            elif rec.rtype == RT_RELEASE:
                held = rec
            elif rec.rtype == RT_RECALL:
                wheel.replay_recall(rec.header)  # type: ignore[arg-type]
        if held is not None:
            wheel.replay_release(self._release_done(held))
        wheel.finish_replay()
        return n

    def _release_done(self: EmbeddedEngine, rec: Record) -> dict[str, Any]:
        """The part of the last release record whose index entries made it to the log (a
        crash may cut an append short: the rest is released again)."""
        assert self.store is not None
        rows = rec.header["r"]  # type: ignore[call-overload]
        done = []
        pos = rec.next_pos
        for row in rows:
            try:
                ref = self.store.read(pos)
            except (KeyError, ValueError):
                break
            if ref.rtype != RT_COMMIT_REF or ref.header.get("rel") != row[0]:  # type: ignore[union-attr]
                break
            done.append(row)
            pos = ref.next_pos
        if len(done) < len(rows):
            log.warning("schedule: a release was cut short by the crash: %d of %d messages are released again",
                        len(rows) - len(done), len(rows))
        return {"r": done}

    def _still_committed(self: EmbeddedEngine, e: Entry) -> bool:
        """Whether a delayed transaction due now is committed as far as the table knows
        (a forgotten one is: it was scheduled by its commit)."""
        state = self.tx.state_of(make_msg_id(e[E_EPOCH], e[E_POS]))
        if state is None or state is TxState.COMMITTED:
            return True
        log.warning("schedule: delayed transaction %s is %s, not released", make_msg_id(e[E_EPOCH], e[E_POS]), state.name)
        return False

    def _committed(self: EmbeddedEngine, e: Entry) -> bool:
        """Replay filter: an entry of a delayed transaction counts only if its commit is in the log."""
        return not e[E_TX] or self.tx.state_of(make_msg_id(e[E_EPOCH], e[E_POS])) is TxState.COMMITTED

    def _schedule_guard(self: EmbeddedEngine) -> int | None:
        """The lowest log position the schedule needs (retention keeps it and after): its
        chains and messages, and the records a recovery from the snapshot would replay."""
        assert self.store is not None
        low = self.schedule.low_pos()
        first = self.store.read_queue(SCHED_TOPIC, 0, self._sched_replay_off, 1)
        if first:
            low = first[0][1].pos if low is None else min(low, first[0][1].pos)
        return low

    # -- admin views ----------------------------------------------------------------------

    def scheduled_by_topic(self: EmbeddedEngine) -> dict[str, tuple[int, int | None]]:
        """Per topic with scheduled messages: how many, and the next due time (epoch ms;
        None if it is further than the view reads). Cached for a second."""
        counts = dict(self.schedule.counts)
        at, cached = self._next_due_cache
        now = time.monotonic()
        if now - at > 1.0:
            cached = {}
            try:
                for e in self.schedule.upcoming(self._sched_read, budget=_VIEW_BUDGET):
                    cached.setdefault(e[E_TOPIC], e[E_DUE])
                    if len(cached) >= len(counts):
                        break
            except BudgetExceeded:
                pass
            self._next_due_cache = (now, cached)
        return {t: (n, cached.get(t)) for t, n in counts.items()}

    async def admin_scheduled(self: EmbeddedEngine, topic: str | None = None, limit: int = 100) -> dict[str, Any]:
        """Scheduled messages (of ``topic``, or all): how many, per topic, and the next
        ``limit`` in due order (msg_id, topic, deliver_at)."""
        wheel = self.schedule
        upcoming: list[dict[str, Any]] = []
        complete = True
        try:
            for e in wheel.upcoming(self._sched_read, budget=_VIEW_BUDGET):
                if topic is None or e[E_TOPIC] == topic:
                    upcoming.append({"msg_id": make_msg_id(e[E_EPOCH], e[E_POS]), "topic": e[E_TOPIC],
                                     "deliver_at": e[E_DUE], "transactional": bool(e[E_TX])})
                    if len(upcoming) >= limit:
                        break
        except BudgetExceeded:
            complete = False
        counts = wheel.counts if topic is None else {topic: wheel.counts.get(topic, 0)}
        return {
            "scheduled": sum(counts.values()),
            "topics": dict(sorted(counts.items())),
            "next": upcoming,
            "complete": complete,
        }

    def schedule_state(self: EmbeddedEngine, rec: Record) -> dict[str, Any] | None:
        """A scheduled message's delivery time and state (scheduled, recalled or released)
        for the admin view of a message; None for other messages."""
        ext = header_ext(rec.header) or {}  # type: ignore[arg-type]
        due = ext.get("at")
        if due is None or rec.rtype != RT_MSG:
            return None
        if self.schedule.is_recalled(rec.pos):
            state = "recalled"
        else:
            state = "scheduled" if due > int(time.time() * 1000) else "released"
        return {"deliver_at": due, "state": state}


def _forget(unwritten: dict[int, Any], pos: int, _fut: asyncio.Future[Any]) -> None:
    """The batch of the schedule record at ``pos`` is written: read it from the log now."""
    unwritten.pop(pos, None)


def _iso(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms / 1000)) + f".{ms % 1000:03d}Z"


def _write_file(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically and durably."""
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)
