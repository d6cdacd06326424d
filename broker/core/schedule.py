"""The schedule of delayed messages, without I/O: a timer wheel whose chains live in the log.

How this works
--------------
A scheduled message is stored once, as a message record that no topic queue indexes yet,
plus a small *schedule record* (indexed in ``%SCHED%``) that lists the messages due in
one second: per message an *entry* ``(due_ms, pos, size, topic, queue_id, tag_hash,
epoch, tx)``. When its time comes the engine appends an index entry in the topic's queue
pointing at the stored message, as a commit does for a half message: the body is never
copied.

The wheel has one slot per second, ``slots`` of them (a little more than ``--max-delay``).
A slot holds three numbers in fixed-size arrays: ``heads[s]`` the log position of the
newest schedule record of its second, ``secs[s]`` that second, and ``lows[s]`` the lowest
log position its chain needs (what retention must keep). Each schedule record carries the
position of the previous record of its slot (``"p"``), so a slot's records form a chain
through the log, newest first. Memory is the arrays (24 bytes a slot, ~6 MB for three
days) whatever the number of scheduled messages: a million of them are a million entries
in the log, not a million Python objects.

The walker keeps ``cursor``, the last second whose chain was *loaded*: moved from the log
into ``heap``, a small heap of the entries due soon (the engine loads a second a little
before it starts). ``pop_due(now_ms)`` hands out the entries whose millisecond has come;
the engine releases them. An entry due in a second that is already loaded goes straight
into the heap (its record says ``"h"``, it is in no chain).

Collisions: a slot belongs to one second at a time. A record for a second whose slot still
holds another second's chain (the walker far behind, or a ``--max-delay`` larger than the
wheel) starts or extends an *overflow* chain for its second (``"o"``), kept in a small
dict; the walker loads overflow chains at their second like slots.

Recalls and releases: ``recall`` marks a position (``recalled``); the entry is dropped when
the walker meets it. Counts per topic follow every schedule, release and recall.

Durability and recovery: the engine persists the wheel now and then (``to_bytes``) with
the ``%SCHED%`` offset it reflects. Recovery loads it and ``replay``\\ s the records
written since, in order: schedule records link as they did (``"h"`` ones go to the heap),
release records (``{"r": [[pos, topic], ...]}``) and recall records mark positions to skip
(``skip`` / ``recalled``), so that what was released after the snapshot is not released
again when the walker loads its chain. A replayed link whose ``prev`` does not match the
slot (the walker loaded that slot after the snapshot and a later second took it) moves the
stale chain to the overflow: nothing is lost, whatever the age of the snapshot.

Time is always an argument (epoch milliseconds or seconds), never read here, and the log
is a ``read(pos) -> header`` callable: the wheel is tested with a dict and a made-up clock.
"""

from __future__ import annotations

import heapq
import struct
import zlib
from array import array
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Final

import msgpack  # type: ignore[import-untyped]

__all__ = ["ScheduleWheel", "Entry", "ReadHeader", "SnapshotError", "BudgetExceeded", "E_DUE", "E_POS", "E_SIZE",
           "E_TOPIC", "E_QUEUE", "E_TAG", "E_EPOCH", "E_TX", "NO_POS"]

#: An entry: (due_ms, pos, size, topic, queue_id, tag_hash, epoch, tx) -- ``tx`` is 1 when
#: ``pos`` is a committed half message (a transactional message delayed from its commit).
Entry = tuple[int, int, int, str, int, int, int, int]
E_DUE: Final = 0
E_POS: Final = 1
E_SIZE: Final = 2
E_TOPIC: Final = 3
E_QUEUE: Final = 4
E_TAG: Final = 5
E_EPOCH: Final = 6
E_TX: Final = 7

#: The header of the schedule record at a log position (``{"e": [...], "p": prev, ...}``).
ReadHeader = Callable[[int], dict[str, Any]]

#: "No position": an empty slot's head, a chain's end, an empty slot's low.
NO_POS = -1
_NO_LOW = 1 << 62
_MAGIC = b"HQSCHED1"
_LEN = struct.Struct("<I")
#: Recalls remembered after their message's time has passed (to answer a repeated recall).
_PASSED_KEEP = 10_000


class SnapshotError(ValueError):
    """A persisted wheel that cannot be used (damaged, or of another format)."""


class BudgetExceeded(Exception):
    """:meth:`ScheduleWheel.upcoming` read its budget of entries before the end."""


class ScheduleWheel:
    """Scheduled entries by due second (see the module docstring).

    ``slots``: seconds the wheel covers before a slot is reused; ``cursor``: the last
    second considered loaded (a new wheel: the second before now).
    """

    def __init__(self, *, slots: int, cursor: int) -> None:
        if slots < 2:
            raise ValueError(f"a wheel needs at least 2 slots, got {slots}")
        self.slots = slots
        self.heads = array("q", [NO_POS]) * slots
        self.secs = array("q", [0]) * slots
        self.lows = array("q", [_NO_LOW]) * slots
        self.cursor = cursor
        self.heap: list[Entry] = []
        self.overflow: dict[int, list[list[int]]] = {}  # second -> chains [head, low]
        self.recalled: set[int] = set()  # positions recalled, their entry not met yet
        self.skip: set[int] = set()  # positions released (replayed) or dropped: skip when met
        self.counts: dict[str, int] = {}  # topic -> scheduled, not yet released or recalled
        self._passed: deque[int] = deque()
        self._passed_set: set[int] = set()

    # -- placing ----------------------------------------------------------------------

    def place(self, second: int, entries: list[Entry]) -> dict[str, Any]:
        """The header of the schedule record for ``entries`` (all due in ``second``).

        Append the record, then call :meth:`placed` with the header and its position,
        before anything else touches the wheel.
        """
        rows = [list(e) for e in entries]
        if second <= self.cursor:
            return {"h": 1, "e": rows}
        s = second % self.slots
        head = self.heads[s]
        if head == NO_POS or self.secs[s] == second:
            return {"s": second, "p": head, "e": rows}
        chains = self.overflow.get(second)
        return {"s": second, "o": 1, "p": chains[-1][0] if chains else NO_POS, "e": rows}

    def placed(self, header: dict[str, Any], pos: int) -> list[Entry]:
        """The record of ``header`` is at ``pos``: link it; return the entries now in the
        heap (those of an ``"h"`` record), for the caller to arm its timer."""
        entries = [_entry(e) for e in header["e"]]
        self._count(entries, 1)
        if header.get("h"):
            for e in entries:
                heapq.heappush(self.heap, e)
            return entries
        low = min(pos, *(e[E_POS] for e in entries))
        second = header["s"]
        if header.get("o"):
            self._link_overflow(second, header["p"], pos, low)
        else:
            s = second % self.slots
            self.heads[s] = pos
            self.secs[s] = second
            self.lows[s] = min(self.lows[s], low)
        return []

    def _link_overflow(self, second: int, prev: int, pos: int, low: int) -> None:
        chains = self.overflow.setdefault(second, [])
        for chain in chains:
            if chain[0] == prev and prev != NO_POS:
                chain[0] = pos
                chain[1] = min(chain[1], low)
                return
        chains.append([pos, low])

    def _count(self, entries: Iterable[Entry], sign: int) -> None:
        counts = self.counts
        for e in entries:
            t = e[E_TOPIC]
            n = counts.get(t, 0) + sign
            if n > 0:
                counts[t] = n
            else:
                counts.pop(t, None)

    # -- walking ----------------------------------------------------------------------

    def load_next(self, read: ReadHeader) -> int:
        """Load the second after ``cursor`` (its slot's chain if it is due by then, and its
        overflow chains) into the heap; return how many entries were loaded.

        A wheel far behind (a long downtime) needs at most ``slots`` calls to catch up (see
        :meth:`catch_up_start`): a slot holding an older second is loaded when visited. If
        ``read`` fails on a damaged chain, what was read is loaded, the second is done all
        the same, and the first error is raised at the end.
        """
        second = self.cursor + 1
        loaded = 0
        errors: list[Exception] = []
        s = second % self.slots
        head = self.heads[s]
        if head != NO_POS and self.secs[s] <= second:
            loaded += self._load_chain(head, read, errors)
            self.heads[s] = NO_POS
            self.lows[s] = _NO_LOW
        if self.overflow:
            for sec in [sec for sec in self.overflow if sec <= second]:
                for head, _low in self.overflow.pop(sec):
                    loaded += self._load_chain(head, read, errors)
        self.cursor = second
        if errors:
            raise errors[0]
        return loaded

    def catch_up_start(self, target: int) -> None:
        """Before loading up to ``target`` second by second: if that is more than a lap,
        skip the seconds whose slots the last lap visits anyway (see :meth:`load_next`)."""
        if target - self.cursor > self.slots:
            self.cursor = target - self.slots

    def _load_chain(self, head: int, read: ReadHeader, errors: list[Exception]) -> int:
        rows: list[Any] = []
        pos = head
        try:
            while pos != NO_POS:
                header = read(pos)
                rows += header["e"]
                prev = header["p"]
                if prev >= pos:  # a chain runs backwards through the log; anything else is damage
                    raise ValueError(f"schedule chain at {pos} points forward to {prev}")
                pos = prev
        except Exception as exc:  # what was read is loaded all the same
            errors.append(exc)
        entries: list[Entry] = list(map(_entry, rows))
        if self.skip or self.recalled:
            entries = [e for e in entries if not self._dropped(e[E_POS])]
        # one heapify (linear, in C) beats a heappush per entry: a second may hold thousands
        self.heap += entries
        heapq.heapify(self.heap)
        return len(entries)

    def _dropped(self, pos: int) -> bool:
        """Whether the entry at ``pos`` was recalled or released meanwhile (forgotten now)."""
        if pos in self.skip:
            self.skip.discard(pos)
            return True
        if pos in self.recalled:
            self.recalled.discard(pos)
            self._passed_add(pos)
            return True
        return False

    def pop_due(self, now_ms: int) -> list[Entry]:
        """Take the heap's entries due at or before ``now_ms`` (recalled ones are dropped)."""
        heap = self.heap
        out: list[Entry] = []
        while heap and heap[0][E_DUE] <= now_ms:
            e = heapq.heappop(heap)
            if not self._dropped(e[E_POS]):
                out.append(e)
        self._count(out, -1)
        return out

    def next_due_ms(self) -> int | None:
        """Due time of the heap's first entry (loaded and not released), or None."""
        return self.heap[0][E_DUE] if self.heap else None

    # -- recalls ----------------------------------------------------------------------

    def recall(self, pos: int, topic: str, due_ms: int, now_ms: int) -> bool:
        """Cancel the scheduled entry at ``pos`` (due at ``due_ms``, of ``topic``).

        Returns True if it is recalled now (the caller records it), False if it already
        was. Raises ``ValueError`` if its time has come (it is released, or about to be).
        """
        if pos in self.recalled or pos in self._passed_set:
            return False
        if due_ms <= now_ms:
            raise ValueError("due")
        self.recalled.add(pos)
        self._count(((0, pos, 0, topic, 0, 0, 0, 0),), -1)
        return True

    def is_recalled(self, pos: int) -> bool:
        """Whether the entry at ``pos`` was recalled (as far as the wheel remembers)."""
        return pos in self.recalled or pos in self._passed_set

    def _passed_add(self, pos: int) -> None:
        self._passed.append(pos)
        self._passed_set.add(pos)
        if len(self._passed) > _PASSED_KEEP:
            self._passed_set.discard(self._passed.popleft())

    # -- recovery ---------------------------------------------------------------------

    def replay_schedule(self, header: dict[str, Any], pos: int, keep: Callable[[Entry], bool] | None = None) -> None:
        """Replay a schedule record written after the snapshot. ``keep(entry)`` False: the
        entry is not scheduled (its position is skipped wherever the walker meets it)."""
        dropped = [] if keep is None else [e for e in map(_entry, header["e"]) if not keep(e)]
        self._replay_link(header, pos)
        for e in dropped:
            self.skip.add(e[E_POS])
        self._count(dropped, -1)

    def _replay_link(self, header: dict[str, Any], pos: int) -> None:
        if header.get("h") or header.get("o"):
            self.placed(header, pos)
            return
        second, prev = header["s"], header["p"]
        s = second % self.slots
        head = self.heads[s]
        if head != NO_POS and head != prev and self.secs[s] != second:
            # the walker had loaded this slot's older second after the snapshot (and a later
            # second took the slot): that chain waits in the overflow for its own second
            self._link_overflow(self.secs[s], NO_POS, head, self.lows[s])
            self.heads[s] = NO_POS
            self.lows[s] = _NO_LOW
        self.placed(header, pos)

    def replay_release(self, header: dict[str, Any]) -> None:
        """Replay a release record: its positions are not released again."""
        rows = header["r"]
        for pos, _topic in rows:
            self.skip.add(pos)
        self._count(((0, pos, 0, topic, 0, 0, 0, 0) for pos, topic in rows), -1)

    def replay_recall(self, header: dict[str, Any]) -> None:
        """Replay a recall record."""
        pos, topic = header["r"], header["t"]
        if pos not in self.recalled:
            self.recalled.add(pos)
            self._count(((0, pos, 0, topic, 0, 0, 0, 0),), -1)

    def finish_replay(self) -> None:
        """Drop from the heap what the replayed records released or recalled."""
        if self.skip or self.recalled:
            kept = [e for e in self.heap if not self._dropped(e[E_POS])]
            heapq.heapify(kept)
            self.heap = kept

    def resized(self, slots: int) -> ScheduleWheel:
        """The same schedule on a wheel of ``slots`` slots (chains move whole: a chain is
        one second)."""
        w = ScheduleWheel(slots=slots, cursor=self.cursor)
        w.heap, w.recalled, w.skip, w.counts = self.heap, self.recalled, self.skip, self.counts
        w._passed, w._passed_set = self._passed, self._passed_set
        w.overflow = {sec: [list(c) for c in chains] for sec, chains in self.overflow.items()}
        for s in range(self.slots):
            head = self.heads[s]
            if head == NO_POS:
                continue
            second, low = self.secs[s], self.lows[s]
            t = second % slots
            if w.heads[t] == NO_POS:
                w.heads[t], w.secs[t], w.lows[t] = head, second, low
            else:
                w._link_overflow(second, NO_POS, head, low)
        return w

    # -- views ------------------------------------------------------------------------

    def scheduled(self) -> int:
        """Entries scheduled and not yet released or recalled (all topics)."""
        return sum(self.counts.values())

    def low_pos(self) -> int | None:
        """The lowest log position the schedule still needs (chains and messages), or None."""
        low = min(self.lows)
        for chains in self.overflow.values():
            for _head, chain_low in chains:
                low = min(low, chain_low)
        if self.heap:
            low = min(low, min(e[E_POS] for e in self.heap))
        return None if low >= _NO_LOW else low

    def upcoming(self, read: ReadHeader, *, budget: int = 100_000) -> Iterator[Entry]:
        """The scheduled entries in due order (the heap's, then the chains'); stops early
        (raising ``BudgetExceeded``) once ``budget`` entries were read from the log."""
        for e in sorted(self.heap):
            if not self.is_recalled(e[E_POS]):
                yield e
        seen = 0
        for _second, heads in self._chains_in_order():
            entries: list[Entry] = []
            for head in heads:
                pos = head
                while pos != NO_POS:
                    header = read(pos)
                    rows = header["e"]
                    seen += len(rows)
                    entries.extend(_entry(e) for e in rows)
                    pos = header["p"]
            entries.sort()
            for e in entries:
                if not self.is_recalled(e[E_POS]) and e[E_POS] not in self.skip:
                    yield e
            if seen >= budget:
                raise BudgetExceeded(seen)

    def _chains_in_order(self) -> Iterator[tuple[int, list[int]]]:
        """Every chain not loaded yet, as ``(second, [heads])`` in second order (lazily: a
        caller that stops early does not pay for the whole wheel)."""
        n = self.slots
        heads, secs = self.heads, self.secs
        over = sorted(self.overflow.items())
        k = 0
        first = self.cursor + 1
        for sec in range(first, first + n):
            group: list[int] = []
            while k < len(over) and over[k][0] <= sec:
                group.extend(c[0] for c in over[k][1])
                k += 1
            s = sec % n
            if heads[s] != NO_POS and secs[s] == sec:
                group.append(heads[s])
            if group:
                yield sec, group
        # beyond one lap: chains of a --max-delay longer than the wheel
        far: dict[int, list[int]] = {}
        for s in range(n):
            if heads[s] != NO_POS and secs[s] >= first + n:
                far.setdefault(secs[s], []).append(heads[s])
        for sec, chains in over[k:]:
            far.setdefault(sec, []).extend(c[0] for c in chains)
        yield from sorted(far.items())

    # -- persistence ------------------------------------------------------------------

    def to_bytes(self, extra: dict[str, Any]) -> bytes:
        """The wheel and ``extra`` (msgpack-able) as one checksummed blob."""
        meta = msgpack.packb({
            "slots": self.slots,
            "cursor": self.cursor,
            "heap": [list(e) for e in self.heap],
            "over": [[sec, chains] for sec, chains in self.overflow.items()],
            "recalled": list(self.recalled),
            "skip": list(self.skip),
            "passed": list(self._passed),
            "counts": self.counts,
            "extra": extra,
        }, use_bin_type=True)
        body = b"".join((_MAGIC, _LEN.pack(len(meta)), meta, self.heads.tobytes(), self.secs.tobytes(),
                         self.lows.tobytes()))
        return body + _LEN.pack(zlib.crc32(body))

    @classmethod
    def from_bytes(cls, data: bytes) -> tuple[ScheduleWheel, dict[str, Any]]:
        """The wheel and ``extra`` of :meth:`to_bytes`; ``SnapshotError`` if unusable."""
        if len(data) < len(_MAGIC) + 8 or data[: len(_MAGIC)] != _MAGIC:
            raise SnapshotError("not a schedule snapshot")
        body, (crc,) = data[:-4], _LEN.unpack(data[-4:])
        if zlib.crc32(body) != crc:
            raise SnapshotError("schedule snapshot checksum mismatch")
        at = len(_MAGIC)
        (n,) = _LEN.unpack_from(body, at)
        at += 4
        try:
            meta = msgpack.unpackb(body[at : at + n], raw=False, strict_map_key=False)
            at += n
            slots = int(meta["slots"])
            w = cls(slots=slots, cursor=int(meta["cursor"]))
            size = 8 * slots
            if len(body) != at + 3 * size:
                raise SnapshotError("schedule snapshot has the wrong size")
            for arr in (w.heads, w.secs, w.lows):
                del arr[:]
                arr.frombytes(body[at : at + size])
                at += size
            w.heap = [_entry(e) for e in meta["heap"]]
            heapq.heapify(w.heap)
            w.overflow = {int(sec): [list(c) for c in chains] for sec, chains in meta["over"]}
            w.recalled = set(meta["recalled"])
            w.skip = set(meta["skip"])
            for pos in meta["passed"]:
                w._passed_add(pos)
            w.counts = dict(meta["counts"])
            return w, dict(meta["extra"])
        except (KeyError, TypeError, ValueError, msgpack.UnpackException) as exc:
            if isinstance(exc, SnapshotError):
                raise
            raise SnapshotError(f"malformed schedule snapshot: {exc!r}") from None


def _entry(e: Any) -> Entry:
    """An entry from a record's row (a list): a tuple, so heap order is (due, pos)."""
    return (e[0], e[1], e[2], e[3], e[4], e[5], e[6], e[7])
