"""Reads: records by position and by queue, the recent-record cache, decoded bundles.

How this works
--------------
A read is served from memory when it can be, else with ``pread``. Recent-record cache:
after a batch is written, its per-segment buffers (as immutable ``bytes``, with their
record starts) go into a small cache of the last ``cache_bytes`` of the log.
``read``/``read_queue_records`` of a cached position decode from memory (same results)
instead of ``pread`` — consumers mostly read the tail just written. Only written bytes
enter it; retention drops chunks of deleted segments; it starts empty at open, after any
recovery truncation, so it never holds a truncated record.

``read_queue_records`` reads a queue's entries with one ``pread`` of its index, then the
records, several neighbours in one ``pread`` of the log when they lie close together. A
bundle member is read by finding its bundle (the member marker holds the distance back to
it) and decoding the bundle once: a small cache keeps recently decoded bundles, so reading
a bundle's members one after another decodes it once.

:class:`Reads` is one part of :class:`storage.store.MessageStore` (a mixin).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from .framing import (
    MEMBER,
    MEMBER_BIT,
    CorruptRecordError,
    member_record,
    read_checked,
    take_members,
)
from .model import IndexEntry, Record
from .queue_index import ENTRY
from .state import StoreState

if TYPE_CHECKING:
    from .store import MessageStore

__all__ = ["CACHE_BYTES", "Reads"]

CACHE_BYTES = 32 << 20
SPAN_MAX = 1 << 22  # read_queue_records: largest single pread covering several entries
_BUNDLES_MAX = 64  # decoded bundles kept for reads of their members ...
_BUNDLES_BYTES = 8 << 20  # ... and their total size at most


class Reads(StoreState):
    """The reads of :class:`storage.store.MessageStore` (see the module's "How this works")."""

    @property
    def end_pos(self: MessageStore) -> int:
        """End of the written log (the next record goes at or after it)."""
        return self._written_end

    @property
    def start_pos(self: MessageStore) -> int:
        """First retained log position."""
        return self._log.start

    def read(self: MessageStore, pos: int) -> Record:
        """The record at ``pos``. KeyError: not a written position; ValueError: corrupt/not a record start."""
        if pos >= self._written_end:
            raise KeyError(pos)
        if pos >= self._rc_lo:
            rec = self._cache_read(pos)
            if rec is not None:
                return rec
        try:
            return self._log.read(pos)
        except CorruptRecordError:
            marker = self._marker(pos)  # not a record start: a bundle member?
            if marker is None:
                raise
            return member_record(self._bundle_at(pos, marker), pos)

    def _marker(self: MessageStore, pos: int) -> bytes | None:
        """The member marker at written position ``pos`` (from the cache or the disk), or
        None if the bytes there are not one."""
        marker = None
        if pos >= self._rc_lo:
            chunk = self._cache_chunk(pos)
            if chunk is not None:
                off = pos - chunk[0]
                marker = chunk[2][off : off + MEMBER.size]
        if marker is None:
            seg = self._log.find(pos)
            if pos >= seg.base + seg.size:
                raise KeyError(pos)
            marker = self._io.pread(seg.fd, MEMBER.size, pos - seg.base)
        return marker if len(marker) == MEMBER.size and marker[:4] == b"\0\0\0\0" else None

    def _bundle_of(self: MessageStore, pos: int) -> Record:
        """The decoded bundle holding the member at ``pos`` (KeyError: not a written position)."""
        if pos >= self._written_end:
            raise KeyError(pos)
        marker = self._marker(pos)
        if marker is None:
            raise CorruptRecordError(f"position {pos} is not a bundle member")
        return self._bundle_at(pos, marker)

    def _bundle_at(self: MessageStore, pos: int, marker: bytes) -> Record:
        """The decoded bundle that the member marker ``marker`` at ``pos`` points back to."""
        back = MEMBER.unpack_from(marker)[2]
        bpos = pos - back
        if back <= 0 or bpos < 0:
            raise CorruptRecordError(f"position {pos} is not a record start")
        bundles = self._bundles
        bundle = bundles.get(bpos)
        if bundle is None:
            bundle = self.read(bpos)
            self._bundles_bytes += bundle.size
            if len(bundles) >= _BUNDLES_MAX or self._bundles_bytes > _BUNDLES_BYTES:
                bundles.clear()
                self._bundles_bytes = bundle.size
            bundles[bpos] = bundle
        return bundle

    def iter_log(self: MessageStore, from_pos: int = 0) -> Iterator[Record]:
        """Written records from ``from_pos`` (a record start, or before the first segment) in order."""
        return self._log.iter_records(from_pos, self._written_end)

    def read_queue(self: MessageStore, topic: str, queue_id: int, offset: int, max_count: int) -> list[tuple[int, IndexEntry]]:
        """Next up to ``max_count`` written ``(queue_offset, entry)`` pairs from ``offset``.

        An offset below ``queue_start`` starts at ``queue_start``. An unknown queue gives [].
        """
        q = self._queues.get((topic, queue_id))
        if q is None or max_count <= 0:
            return []
        return q.read(offset, max_count)

    def read_queue_records(
        self: MessageStore, topic: str, queue_id: int, offset: int, max_count: int
    ) -> list[tuple[int, Record]]:
        """Like :meth:`read_queue` with the records read (entries whose record is gone are skipped)."""
        q = self._queues.get((topic, queue_id))
        if q is None or max_count <= 0:
            return []
        raw = q.read_raw(offset, max_count)
        if raw is None:
            return []
        first, data = raw
        out: list[tuple[int, Record]] = []
        ents = list(ENTRY.iter_unpack(data))
        n = len(ents)
        lg = self._log
        bases = lg.bases
        segs = lg.segments
        seg_size = self.segment_size
        rc_lo = self._rc_lo
        # the cache chunk of the previous entry: the next one is mostly there too
        chunk = None
        c_lo = c_hi = -1
        i = 0
        bundle = None  # the bundle of the previous member entry: the next one is mostly there too
        b_lo = b_hi = -1
        while i < n:
            pos, size = ents[i][0], ents[i][1]
            if size & MEMBER_BIT:
                if not b_lo < pos < b_hi:
                    try:
                        bundle = self._bundle_of(pos)
                    except KeyError:
                        i += 1  # deleted by retention
                        continue
                    b_lo = bundle.pos
                    b_hi = b_lo + bundle.size
                i = take_members(bundle, ents, i, first, out)  # type: ignore[arg-type]
                continue
            if pos >= rc_lo:
                if not c_lo <= pos < c_hi:
                    chunk = self._cache_chunk(pos)
                    c_lo, c_hi = (chunk[0], chunk[1]) if chunk is not None else (-1, -1)
                if chunk is not None and c_lo <= pos < c_hi:
                    out.append((first + i, self._cached_record(chunk, pos)))
                    i += 1
                    continue
            k = bisect.bisect_right(bases, pos) - 1
            if k < 0 or pos < 0:
                i += 1  # record deleted by retention
                continue
            seg = segs[k]
            seg_end = seg.base + seg.size
            # one pread for the following entries that lie ahead in the same segment, not too sparse
            end = pos + size
            used = size
            j = i + 1
            while j < n:
                p2, s2 = ents[j][0], ents[j][1]
                if p2 < end or p2 + s2 > seg_end or p2 >= rc_lo or s2 & MEMBER_BIT:
                    break
                e2 = p2 + s2
                if e2 - pos > SPAN_MAX or (e2 - pos) > 4 * (used + s2) + 65536:
                    break
                used += s2
                end = e2
                j += 1
            if j - i == 1 or end > seg_end:
                try:
                    out.append((first + i, self.read(pos)))  # (a record, or a member a reference points at)
                except KeyError:
                    pass
                i += 1
                continue
            rel = pos - seg.base
            buf = self._io.pread(seg.fd, end - pos, rel)
            nb = len(buf)
            next_base = bases[k + 1] if k + 1 < len(bases) else -1
            for t in range(i, j):
                p2 = ents[t][0]
                off = p2 - pos
                try:
                    rec = read_checked(buf, off, nb - off, seg_size - rel - off, p2, seg_end, next_base)
                except CorruptRecordError:
                    rec = self.read(p2)  # a reference to a bundle member (else: raises again)
                out.append((first + t, rec))
            i = j
        return out

    def _cache_add(self: MessageStore, groups: list[list[Any]], datas: list[bytes]) -> None:
        starts_l = self._rc_starts
        for (start, _parts, starts), data in zip(groups, datas, strict=True):
            if not data:
                continue
            starts_l.append(start)
            self._rc_ends.append(start + len(data))
            self._rc_chunks.append((data, starts))
            self._rc_bytes += len(data)
        limit = self._rc_limit
        head = self._rc_head
        while self._rc_bytes > limit and head < len(starts_l) - 1:
            self._rc_bytes -= len(self._rc_chunks[head][0])
            self._rc_chunks[head] = None  # type: ignore[call-overload]
            head += 1
        self._cache_set_head(head)

    def _cache_set_head(self: MessageStore, head: int) -> None:
        if head > 256 and head * 2 > len(self._rc_starts):
            del self._rc_starts[:head]
            del self._rc_ends[:head]
            del self._rc_chunks[:head]
            head = 0
        self._rc_head = head
        self._rc_lo = self._rc_starts[head] if head < len(self._rc_starts) else 1 << 62

    def _cache_drop_below(self: MessageStore, pos: int) -> None:
        """Forget cached chunks that start below ``pos`` (their segment was deleted)."""
        head = self._rc_head
        while head < len(self._rc_starts) and self._rc_starts[head] < pos:
            self._rc_bytes -= len(self._rc_chunks[head][0])
            self._rc_chunks[head] = None  # type: ignore[call-overload]
            head += 1
        self._cache_set_head(head)

    def _cache_chunk(self: MessageStore, pos: int) -> tuple | None:
        """The cache chunk holding ``pos``: ``(lo, hi, data, record starts, segment base,
        segment end, next segment base)``, or None if ``pos`` is not cached."""
        k = bisect.bisect_right(self._rc_starts, pos, self._rc_head) - 1
        if k < self._rc_head or pos >= self._rc_ends[k]:
            return None
        data, starts = self._rc_chunks[k]
        lg = self._log
        seg = lg.find(pos)
        return (self._rc_starts[k], self._rc_ends[k], data, starts, seg.base, seg.base + seg.size, lg.next_base(seg))

    def _cached_record(self: MessageStore, chunk: tuple, pos: int) -> Record:
        """Decode the record at ``pos`` from ``chunk`` (bytes this process wrote: no CRC check)."""
        lo, _hi, data, starts, base, seg_end, next_base = chunk
        j = bisect.bisect_left(starts, pos)
        off = pos - lo
        if j == len(starts) or starts[j] != pos:
            if data[off : off + 4] == b"\0\0\0\0":  # a bundle member
                return member_record(self._bundle_at(pos, data[off : off + MEMBER.size]), pos)
            raise CorruptRecordError(f"position {pos} is not a record start")
        return read_checked(data, off, len(data) - off, self.segment_size - (pos - base), pos, seg_end, next_base, False)

    def _cache_read(self: MessageStore, pos: int) -> Record | None:
        """The cached record at ``pos``, or None if ``pos`` is not in the cache."""
        chunk = self._cache_chunk(pos)
        return None if chunk is None else self._cached_record(chunk, pos)

    def queue_start(self: MessageStore, topic: str, queue_id: int) -> int:
        """Smallest retained offset of the queue (0 unless retention removed entries)."""
        q = self._queues.get((topic, queue_id))
        return 0 if q is None else q.start

    def queue_end(self: MessageStore, topic: str, queue_id: int) -> int:
        """Next offset to be written (counting written entries only)."""
        q = self._queues.get((topic, queue_id))
        return 0 if q is None else q.end

    def queues(self: MessageStore) -> list[tuple[str, int]]:
        """Every ``(topic, queue_id)`` that has an index."""
        return sorted(self._queues)
