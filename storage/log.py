"""Segmented append-only log: record framing, segment files, reading and scanning.

How this works
--------------
Positions are global byte offsets. Segment files live in ``<data_dir>/log/`` and are named
by the zero-padded (20 digits) global position of their first byte; segment ``k`` covers
``[k * segment_size, (k + 1) * segment_size)``. A record never straddles a boundary: one
that does not fit in the rest of a segment starts the next segment, and the previous file
simply ends early. So a segment file's length is the end of its data, and the global end
of the log is ``base + length`` of the last segment.

Record framing (little endian)::

    u32 length      total record size, this field included
    u32 crc         zlib.crc32 of everything after this field
    u8  rtype       opaque to the store
    u8  flags       bit 0: an index target follows
    u64 store_time  ms since epoch
    u32 header_len
    [index target:  u32 queue_id, u32 tag_hash, i64 ref_pos (-1: none), u32 ref_size,
                    u64 queue_offset, u16 topic_len, topic (utf-8)]
    header          msgpack, header_len bytes
    body            the rest, raw

The index target is in the framing so that queue-index tails can be rebuilt from the log.
Encoding is one ``struct.pack`` + ``msgpack.packb`` + ``zlib.crc32`` + join per record.
"""

from __future__ import annotations

import bisect
import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import msgpack

from .model import Record

__all__ = [
    "CorruptRecordError",
    "IndexTargetInfo",
    "Segment",
    "SegmentLog",
    "encode_record",
    "PREFIX",
    "TAIL",
    "IDX",
]

PREFIX = struct.Struct("<II")  # length, crc
TAIL = struct.Struct("<BBQI")  # rtype, flags, store_time, header_len
IDX = struct.Struct("<IIqIQH")  # queue_id, tag_hash, ref_pos, ref_size, queue_offset, topic_len
FIXED = PREFIX.size + TAIL.size  # 22
FLAG_INDEX = 1
NAME_DIGITS = 20
READ_AHEAD = 4096
SCAN_CHUNK = 1 << 20

_packb = msgpack.Packer(use_bin_type=True).pack
_crc32 = zlib.crc32
_prefix_pack = PREFIX.pack
_tail_pack = TAIL.pack


class CorruptRecordError(ValueError):
    """A record failed its length/CRC/framing checks."""


@dataclass(frozen=True, slots=True)
class IndexTargetInfo:
    """The index target decoded from a record's framing (used by recovery)."""

    topic: str
    queue_id: int
    tag_hash: int
    ref_pos: int
    ref_size: int
    queue_offset: int


def encode_record(rtype: int, store_time: int, header: dict, body: bytes, index_part: bytes) -> bytes:
    """Return the framed bytes of one record (``index_part`` is ``b""`` or packed :data:`IDX`+topic)."""
    hdr = _packb(header)
    tail = _tail_pack(rtype, FLAG_INDEX if index_part else 0, store_time, len(hdr))
    if index_part:
        tail += index_part
    tail += hdr
    return b"".join((_prefix_pack(FIXED - TAIL.size + len(tail) + len(body), _crc32(body, _crc32(tail))), tail, body))


def _unpack_header(raw: bytes) -> dict:
    return msgpack.unpackb(raw, raw=False, strict_map_key=False)


def check_record(buf: bytes, off: int, avail: int, max_len: int) -> int:
    """Validate the record starting at ``buf[off]``; return its length or raise CorruptRecordError.

    ``avail``: bytes of ``buf`` available from ``off``; ``max_len``: room left in the segment.
    """
    if avail < FIXED:
        raise CorruptRecordError("torn record header")
    length, crc = PREFIX.unpack_from(buf, off)
    if length < FIXED or length > max_len:
        raise CorruptRecordError(f"bad record length {length}")
    if length > avail:
        raise CorruptRecordError("torn record")
    if _crc32(memoryview(buf)[off + 8 : off + length]) != crc:
        raise CorruptRecordError("record CRC mismatch")
    _, flags, _, header_len = TAIL.unpack_from(buf, off + 8)
    need = FIXED + header_len
    if flags & FLAG_INDEX:
        if length < need + IDX.size:
            raise CorruptRecordError("bad index target")
        need += IDX.size + IDX.unpack_from(buf, off + FIXED)[5]
    if need > length:
        raise CorruptRecordError("bad header length")
    return length


def decode_index_target(buf: bytes, off: int) -> IndexTargetInfo | None:
    """Index target of the (already checked) record at ``buf[off]``, or None."""
    if not buf[off + 9] & FLAG_INDEX:
        return None
    qid, tag, ref_pos, ref_size, qoff, tlen = IDX.unpack_from(buf, off + FIXED)
    start = off + FIXED + IDX.size
    topic = bytes(buf[start : start + tlen]).decode("utf-8")
    return IndexTargetInfo(topic, qid, tag, ref_pos, ref_size, qoff)


def decode_record(buf: bytes, off: int, length: int, pos: int, next_pos: int) -> Record:
    """Decode the (already checked) record of ``length`` bytes at ``buf[off]``."""
    rtype, flags, store_time, header_len = TAIL.unpack_from(buf, off + 8)
    h = off + FIXED
    if flags & FLAG_INDEX:
        h += IDX.size + IDX.unpack_from(buf, off + FIXED)[5]
    header = _unpack_header(buf[h : h + header_len])
    body = bytes(buf[h + header_len : off + length])
    return Record(pos, length, rtype, store_time, header, body, next_pos)


class Segment:
    """One segment file. ``size`` is the end of its written data (visible to readers)."""

    __slots__ = ("base", "path", "fd", "size", "newest_ms", "dirty")

    def __init__(self, base: int, path: Path, fd: int, size: int, newest_ms: int) -> None:
        self.base = base
        self.path = path
        self.fd = fd
        self.size = size
        self.newest_ms = newest_ms
        self.dirty = False

    @property
    def end(self) -> int:
        return self.base + self.size


def segment_name(base: int) -> str:
    return f"{base:0{NAME_DIGITS}d}"


class SegmentLog:
    """The segment files of a data directory: lookup, reads, iteration, recovery scan.

    Only the event loop mutates the segment list; the writer thread receives fds.
    """

    def __init__(self, directory: Path, segment_size: int) -> None:
        self.dir = directory
        self.segment_size = segment_size
        self.segments: list[Segment] = []
        self.bases: list[int] = []

    # -- files ----------------------------------------------------------------------------
    def load(self) -> None:
        """Open every segment file found in the directory (sorted by base)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        for name in sorted(os.listdir(self.dir)):
            if len(name) != NAME_DIGITS or not name.isdigit():
                continue
            path = self.dir / name
            fd = os.open(path, os.O_RDWR)
            st = os.fstat(fd)
            self._add(Segment(int(name), path, fd, st.st_size, int(st.st_mtime * 1000)))

    def _add(self, seg: Segment) -> None:
        self.segments.append(seg)
        self.bases.append(seg.base)

    def open_segment(self, base: int, now_ms: int) -> Segment:
        """Create (or open) the segment file starting at ``base``; fsyncs the directory."""
        path = self.dir / segment_name(base)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        fsync_dir(self.dir)
        return Segment(base, path, fd, os.fstat(fd).st_size, now_ms)

    def register(self, seg: Segment) -> None:
        """Make a segment created by :meth:`open_segment` known (loop side)."""
        if self.bases and seg.base <= self.bases[-1]:
            raise ValueError("segments must be registered in order")
        self._add(seg)

    def drop_first(self) -> Segment:
        """Forget the oldest segment (the caller closes and unlinks it)."""
        self.bases.pop(0)
        return self.segments.pop(0)

    def truncate_at(self, pos: int) -> None:
        """Cut the log at ``pos``: shorten its segment, delete every later segment."""
        i = bisect.bisect_right(self.bases, pos) - 1
        if i < 0:
            i = 0
        for seg in self.segments[i + 1 :]:
            os.close(seg.fd)
            os.unlink(seg.path)
        del self.segments[i + 1 :]
        del self.bases[i + 1 :]
        seg = self.segments[i]
        keep = max(0, pos - seg.base)
        if keep < seg.size:
            os.ftruncate(seg.fd, keep)
            os.fsync(seg.fd)
            seg.size = keep
        fsync_dir(self.dir)

    def close(self) -> None:
        for seg in self.segments:
            os.close(seg.fd)
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

    def read(self, pos: int) -> Record:
        """Read and verify the record at ``pos`` (KeyError: no such position; ValueError: corrupt)."""
        if pos < 0:
            raise KeyError(pos)
        seg = self.find(pos)
        rel = pos - seg.base
        if rel >= seg.size:
            raise KeyError(pos)
        avail_total = seg.size - rel
        buf = os.pread(seg.fd, min(READ_AHEAD, avail_total), rel)
        if len(buf) >= 4:
            length = PREFIX.unpack_from(buf, 0)[0]
            if len(buf) < length <= avail_total:
                buf += os.pread(seg.fd, length - len(buf), rel + len(buf))
        length = check_record(buf, 0, len(buf), min(avail_total, self.segment_size - rel))
        return decode_record(buf, 0, length, pos, self.next_pos_after(seg, pos + length))

    def record_size(self, pos: int) -> int:
        """Size of the verified record at ``pos``."""
        return self.read(pos).size

    def iter_from(self, from_pos: int, strict: bool = True) -> Iterator[tuple[bytes, int, int, int]]:
        """Yield ``(buf, off, length, pos)`` for each valid record from ``from_pos``.

        A position in the gap at the end of a segment continues with the next segment.
        ``strict``: a corrupt record raises ValueError; otherwise iteration stops there and
        :attr:`scan_end` tells where the valid log ended.
        """
        self.scan_end = from_pos
        if not self.segments:
            return
        pos = max(from_pos, self.start)
        i = max(0, bisect.bisect_right(self.bases, pos) - 1)
        rel = pos - self.segments[i].base
        while i < len(self.segments):
            seg = self.segments[i]
            while rel < seg.size:
                remaining = seg.size - rel
                room = self.segment_size - rel
                buf = os.pread(seg.fd, min(SCAN_CHUNK, remaining), rel)
                n = len(buf)
                if not n:
                    break
                off = 0
                while off < n:
                    if n < remaining and n - off >= 8:
                        length = PREFIX.unpack_from(buf, off)[0]
                        if n - off < length <= room - off:
                            if off:
                                break  # continues past this chunk: re-read from here
                            buf = os.pread(seg.fd, min(length, remaining), rel)
                            n = len(buf)
                            continue
                    elif n < remaining and off:
                        break
                    try:
                        length = check_record(buf, off, n - off, room - off)
                    except CorruptRecordError:
                        self.scan_end = seg.base + rel + off
                        if strict:
                            raise
                        return
                    yield buf, off, length, seg.base + rel + off
                    off += length
                    self.scan_end = seg.base + rel + off
                rel += off
            i += 1
            rel = 0
            if i < len(self.segments):
                self.scan_end = self.segments[i].base

    def iter_records(self, from_pos: int) -> Iterator[Record]:
        """Decoded records from ``from_pos`` in log order."""
        for buf, off, length, pos in self.iter_from(from_pos):
            seg = self.find(pos)
            yield decode_record(buf, off, length, pos, self.next_pos_after(seg, pos + length))


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
