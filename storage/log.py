"""Segmented append-only log: segment files, reading and scanning.

How this works
--------------
Positions are global byte offsets. Segment files live in ``<data_dir>/log/`` and are named
by the zero-padded (20 digits) global position of their first byte; segment ``k`` covers
``[k * segment_size, (k + 1) * segment_size)``. A record never straddles a boundary: one
that does not fit in the rest of a segment starts the next segment, and the previous file
is cut at the end of its data. So a segment file's length is the end of its data, and the
global end of the log is ``base + length`` of the last segment — except that with
flush="sync" the store zero-fills the active segment ahead of its appends (an fdatasync
that does not grow the file is cheaper), so after a crash the last file may end in zeros;
recovery finds the first record that does not check and cuts the file there.

The record format (framing, bundles, references, encoding and decoding) is in
:mod:`storage.framing`. :meth:`SegmentLog.read` keeps its last ``pread`` buffer (written
bytes never change; it is dropped when segments are truncated or deleted) and reads 64 KiB
ahead once reads move forward through a segment, so a consumer walking a queue does not
pay a syscall per record.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .fileio import REAL, FileIO
from .framing import (
    FIXED,
    FLAG_BUNDLE,
    PREFIX,
    CorruptRecordError,
    bundle_members,
    check_record,
    read_checked,
)
from .model import Record

__all__ = ["Segment", "SegmentLog", "fsync_dir", "segment_name"]

NAME_DIGITS = 20
READ_AHEAD = 4096
SEQ_READ_AHEAD = 64 * 1024  # read-ahead once reads look sequential (a consumer walking a queue)
SEQ_WINDOW = 256 * 1024
SCAN_CHUNK = 1 << 20


class Segment:
    """One segment file. ``size`` is the end of its written data (visible to readers);
    ``alloc`` the length of the file, which may run past ``size`` with zeros (the store
    zero-fills the active segment ahead of its appends)."""

    __slots__ = ("base", "path", "fd", "dsync_fd", "size", "alloc", "newest_ms", "dirty", "io")

    def __init__(self, base: int, path: Path, fd: int, size: int, newest_ms: int, io: FileIO = REAL) -> None:
        self.io = io
        self.base = base
        self.path = path
        self.fd = fd
        self.dsync_fd = -1  # an O_DSYNC descriptor the store opens for big synced writes
        self.size = size
        self.alloc = size
        self.newest_ms = newest_ms
        self.dirty = False

    def close(self) -> None:
        self.io.close(self.fd)
        if self.dsync_fd >= 0:
            self.io.close(self.dsync_fd)
            self.dsync_fd = -1

    @property
    def end(self) -> int:
        return self.base + self.size


def segment_name(base: int) -> str:
    return f"{base:0{NAME_DIGITS}d}"


class SegmentLog:
    """The segment files of a data directory: lookup, reads, iteration, recovery scan.

    Only the event loop mutates the segment list; the writer thread receives fds.
    """

    def __init__(self, directory: Path, segment_size: int, io: FileIO = REAL) -> None:
        self.io = io
        self.dir = directory
        self.segment_size = segment_size
        self.segments: list[Segment] = []
        self.bases: list[int] = []
        # the last read buffer: (segment, file offset of buf[0], buf); written bytes never change
        self._rbuf: tuple[Segment, int, bytes] | None = None

    # -- files ----------------------------------------------------------------------------
    def load(self) -> None:
        """Open every segment file found in the directory (sorted by base)."""
        io = self.io
        io.makedirs(self.dir)
        for name in sorted(io.listdir(self.dir)):
            if len(name) != NAME_DIGITS or not name.isdigit():
                continue
            path = self.dir / name
            fd = io.open(path, os.O_RDWR)
            st = io.fstat(fd)
            self._add(Segment(int(name), path, fd, st.st_size, int(st.st_mtime * 1000), io))

    def _add(self, seg: Segment) -> None:
        self.segments.append(seg)
        self.bases.append(seg.base)

    def open_segment(self, base: int, now_ms: int) -> Segment:
        """Create (or open) the segment file starting at ``base``; fsyncs the directory."""
        path = self.dir / segment_name(base)
        io = self.io
        fd = io.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        io.fsync_dir(self.dir)
        return Segment(base, path, fd, io.fstat(fd).st_size, now_ms, io)

    def register(self, seg: Segment) -> None:
        """Make a segment created by :meth:`open_segment` known (loop side)."""
        if self.bases and seg.base <= self.bases[-1]:
            raise ValueError("segments must be registered in order")
        self._add(seg)

    def drop_first(self) -> Segment:
        """Forget the oldest segment (the caller closes and unlinks it)."""
        self.bases.pop(0)
        self._rbuf = None
        return self.segments.pop(0)

    def truncate_at(self, pos: int) -> None:
        """Cut the log at ``pos``: shorten its segment, delete every later segment."""
        i = bisect.bisect_right(self.bases, pos) - 1
        if i < 0:
            i = 0
        for seg in self.segments[i + 1 :]:
            seg.close()
            self.io.unlink(seg.path)
        self._rbuf = None
        del self.segments[i + 1 :]
        del self.bases[i + 1 :]
        seg = self.segments[i]
        keep = max(0, pos - seg.base)
        if keep < max(seg.size, seg.alloc):
            self.io.ftruncate(seg.fd, keep)
            self.io.fsync(seg.fd)
            seg.size = seg.alloc = keep
        self.io.fsync_dir(self.dir)

    def zeros_from(self, pos: int) -> bool:
        """True if every byte of the log from ``pos`` to its end is zero (a zero-filled
        tail that no append reached, rather than damage)."""
        i = bisect.bisect_right(self.bases, pos) - 1
        if i < 0 or i != len(self.segments) - 1:
            return False
        seg = self.segments[i]
        at = pos - seg.base
        while at < seg.size:
            chunk = self.io.pread(seg.fd, min(SCAN_CHUNK, seg.size - at), at)
            if not chunk or chunk.count(0) != len(chunk):
                return False
            at += len(chunk)
        return True

    def close(self) -> None:
        for seg in self.segments:
            seg.close()
        self.segments.clear()
        self.bases.clear()

    @property
    def start(self) -> int:
        return self.bases[0] if self.bases else 0

    @property
    def end(self) -> int:
        return self.segments[-1].end if self.segments else 0

    def find(self, pos: int) -> Segment:
        i = bisect.bisect_right(self.bases, pos) - 1
        if i < 0:
            raise KeyError(pos)
        return self.segments[i]

    # -- reads ----------------------------------------------------------------------------
    def next_pos_after(self, seg: Segment, end: int) -> int:
        """Position of the record after one ending at global ``end`` in ``seg``."""
        if end >= seg.end and seg is not self.segments[-1]:
            i = bisect.bisect_right(self.bases, seg.base)
            return self.bases[i]
        return end

    def next_base(self, seg: Segment) -> int:
        """Base of the segment after ``seg``, or -1 if ``seg`` is the last one."""
        if seg is self.segments[-1]:
            return -1
        return self.bases[bisect.bisect_right(self.bases, seg.base)]

    def read(self, pos: int) -> Record:
        """Read and verify the record at ``pos`` (KeyError: no such position; ValueError: corrupt)."""
        if pos < 0:
            raise KeyError(pos)
        bases = self.bases
        i = bisect.bisect_right(bases, pos) - 1
        if i < 0:
            raise KeyError(pos)
        seg = self.segments[i]
        rel = pos - seg.base
        avail_total = seg.size - rel
        if avail_total <= 0:
            raise KeyError(pos)
        room = self.segment_size - rel
        if room > avail_total:
            room = avail_total
        next_base = bases[i + 1] if i + 1 < len(bases) else -1
        rb = self._rbuf
        ahead = READ_AHEAD
        if rb is not None and rb[0] is seg:
            off = rel - rb[1]
            buf = rb[2]
            if 0 <= off and off + FIXED <= len(buf):
                length = PREFIX.unpack_from(buf, off)[0]
                if off + length <= len(buf):
                    return read_checked(buf, off, len(buf) - off, room, pos, seg.base + seg.size, next_base)
            if 0 <= off - len(buf) < SEQ_WINDOW:
                ahead = SEQ_READ_AHEAD
        pread = self.io.pread
        buf = pread(seg.fd, ahead if avail_total > ahead else avail_total, rel)
        if len(buf) >= 8:
            length = PREFIX.unpack_from(buf, 0)[0]
            if len(buf) < length <= avail_total:
                buf += pread(seg.fd, length - len(buf), rel + len(buf))
        self._rbuf = (seg, rel, buf)
        return read_checked(buf, 0, len(buf), room, pos, seg.base + seg.size, next_base)

    def record_size(self, pos: int) -> int:
        """Size of the verified record at ``pos``."""
        return self.read(pos).size

    def iter_from(self, from_pos: int, strict: bool = True) -> Iterator[tuple[bytes, int, int, int]]:
        """Yield ``(buf, off, length, pos)`` for each valid record from ``from_pos``.

        A position in the gap at the end of a segment continues with the next segment.
        ``strict``: a corrupt record raises ValueError; otherwise iteration stops there and
        :attr:`scan_end` tells where the valid log ended.
        """
        return self._scan(from_pos, strict, False, None)  # type: ignore[return-value]

    def iter_records(self, from_pos: int, end: int | None = None) -> Iterator[Record]:
        """Decoded records from ``from_pos`` in log order (stopping before position ``end``)."""
        return self._scan(from_pos, True, True, end)  # type: ignore[return-value]

    def _scan(self, from_pos: int, strict: bool, decode: bool, stop: int | None) -> Iterator[Any]:
        self.scan_end = from_pos
        if not self.segments:
            return
        if stop is None:
            stop = 1 << 62
        pos = max(from_pos, self.start)
        i = max(0, bisect.bisect_right(self.bases, pos) - 1)
        rel = pos - self.segments[i].base
        unpack_len = PREFIX.unpack_from
        while i < len(self.segments):
            seg = self.segments[i]
            while rel < seg.size:
                seg_end = seg.base + seg.size
                next_base = self.bases[i + 1] if i + 1 < len(self.bases) else -1
                remaining = seg.size - rel
                room = self.segment_size - rel
                buf = self.io.pread(seg.fd, min(SCAN_CHUNK, remaining), rel)
                n = len(buf)
                if not n:
                    break
                off = 0
                gpos = seg.base + rel
                while off < n:
                    if n < remaining:
                        if n - off >= 8:
                            length = unpack_len(buf, off)[0]
                            if n - off < length <= room - off:
                                if off:
                                    break  # continues past this chunk: re-read from here
                                buf = self.io.pread(seg.fd, min(length, remaining), rel)
                                n = len(buf)
                                continue
                        elif off:
                            break
                    if gpos + off >= stop:
                        return
                    try:
                        if decode:
                            rec = read_checked(buf, off, n - off, room - off, gpos + off, seg_end, next_base)
                            length = rec.size
                        else:
                            length = check_record(buf, off, n - off, room - off)
                    except CorruptRecordError:
                        self.scan_end = gpos + off
                        if strict:
                            raise
                        return
                    if decode:
                        if buf[off + 9] & FLAG_BUNDLE:
                            yield from bundle_members(rec)
                        else:
                            yield rec
                    else:
                        yield buf, off, length, gpos + off
                    off += length
                    self.scan_end = gpos + off
                rel += off
            i += 1
            rel = 0
            if i < len(self.segments):
                self.scan_end = self.segments[i].base


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
