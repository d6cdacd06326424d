"""Segmented append-only log: record framing, segment files, reading and scanning.

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

Record framing (little endian)::

    u32 length      total record size, this field included
    u32 crc         CRC-32 (zlib's) of everything after this field
    u8  rtype       opaque to the store
    u8  flags       bit 0: an index target follows
    u64 store_time  ms since epoch
    u32 header_len
    [index target:  u32 queue_id, u32 tag_hash, i64 ref_pos (-1: none), u32 ref_size,
                    u64 queue_offset, u16 topic_len, topic (utf-8)]
    header          msgpack, header_len bytes
    body            the rest, raw

A *bundle* (flags bit 1) stores many messages of one queue in one record (``send_batch``:
one record, one CRC, one header encoding for the lot). Its index target's ``ref_size``
field holds the member count and ``queue_offset`` the first member's offset; its header is
``[member headers, member tag hashes]`` and its body is a table of one marker per member,
then the members' bodies one after another::

    u32 0           (a record's length is never 0: this marks a member, not a record)
    u32 body_off    where the member's body starts, from the start of the record
    u32 back        member position - bundle position (the marker's own offset)
    u32 body_len

A member's *position* is the global position of its marker, so every member has a
distinct position inside its bundle, in log order: ids, references and retention treat
it like a record's. :func:`member_record` decodes one member from its (decoded) bundle.

A *references* record (flags bit 2) gives its queue one index entry per reference, at
consecutive offsets from its index target's ``queue_offset`` (``ref_size`` holds the
count), each pointing at an earlier record or member (the commits of many half messages in
one record). Its body is the table, one :data:`REF` per reference::

    i64 ref_pos     u32 ref_size (as that record's own entry has it)     u32 tag_hash

The index target is in the framing so that queue-index tails can be rebuilt from the log.
The store encodes a record with one ``struct.pack`` of the fixed part (+ index target), a
reused msgpack ``Packer`` and two chained :func:`crc32` calls, appending the parts straight
to the batch (see :func:`storage.store.MessageStore.append`); :func:`encode_record`
is the same encoding as a standalone function. Decoding checks and unpacks the fixed part
with one ``struct.unpack_from`` and builds :class:`Record` through a fast constructor.
:meth:`SegmentLog.read` keeps its last ``pread`` buffer (written bytes never change; it is
dropped when segments are truncated or deleted) and reads 64 KiB ahead once reads move
forward through a segment, so a consumer walking a queue does not pay a syscall per record.
"""

from __future__ import annotations

import bisect
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

from .fileio import REAL, FileIO
from .model import Record

__all__ = [
    "CorruptRecordError",
    "IndexTargetInfo",
    "FLAG_BUNDLE",
    "FLAG_REFS",
    "REF",
    "MEMBER",
    "MEMBER_BIT",
    "bundle_members",
    "member_record",
    "take_members",
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
TAIL_IDX = struct.Struct("<BBQIIIqIQH")  # TAIL + IDX in one pack
FRAME = struct.Struct("<IIBBQI")  # PREFIX + TAIL in one unpack
FIXED = PREFIX.size + TAIL.size  # 22
FLAG_INDEX = 1
FLAG_BUNDLE = 2
FLAG_REFS = 4  # the body is a table of references (REF each), one index entry per reference
REF = struct.Struct("<qII")  # ref_pos, ref_size (with MEMBER_BIT for a member), tag hash
MEMBER = struct.Struct("<IIII")  # 0, body offset in the record, position - bundle position, body length
#: Set in a queue-index entry's size field when the entry points at a bundle member.
MEMBER_BIT = 1 << 31
NAME_DIGITS = 20
READ_AHEAD = 4096
SEQ_READ_AHEAD = 64 * 1024  # read-ahead once reads look sequential (a consumer walking a queue)
SEQ_WINDOW = 256 * 1024
SCAN_CHUNK = 1 << 20

_packb = msgpack.Packer(use_bin_type=True).pack
try:
    # ISA-L's CRC-32: the same values as zlib.crc32 (so the same log format), computed with
    # carry-less multiply instructions: 1 KiB + a 40-byte head in 0.07 us instead of 0.36
    from isal.isal_zlib import crc32
except ImportError:  # (a platform without the isal wheel: same results, slower)
    from zlib import crc32
_crc32 = crc32
_prefix_pack = PREFIX.pack
_tail_pack = TAIL.pack
_frame_unpack = FRAME.unpack_from
_idx_unpack = IDX.unpack_from
_member_unpack = MEMBER.unpack_from
_unpackb = msgpack.unpackb


class _Row:
    """A ``Record``'s layout without the frozen dataclass around it: ``take_members`` fills
    the slots with plain stores, then assigns ``__class__ = Record`` (the same slots in the
    same order, so Python allows it): the very object ``make_record`` gives, with fewer
    instructions than seven descriptor ``__set__`` calls."""

    __slots__ = Record.__slots__  # type: ignore[attr-defined]

    pos: int
    size: int
    rtype: int
    store_time: int
    header: Any
    body: bytes
    next_pos: int


def make_record(pos: int, size: int, rtype: int, store_time: int, header: dict, body: bytes, next_pos: int) -> Record:
    """``Record(...)`` without the frozen dataclass ``__init__`` (same class, same fields:
    see :class:`_Row`)."""
    r: Any = _Row()
    r.pos = pos
    r.size = size
    r.rtype = rtype
    r.store_time = store_time
    r.header = header
    r.body = body
    r.next_pos = next_pos
    r.__class__ = Record
    return r  # type: ignore[no-any-return]


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
    length, crc, _, flags, _, header_len = _frame_unpack(buf, off)
    if length < FIXED or length > max_len:
        raise CorruptRecordError(f"bad record length {length}")
    if length > avail:
        raise CorruptRecordError("torn record")
    if _crc32(memoryview(buf)[off + 8 : off + length]) != crc:
        raise CorruptRecordError("record CRC mismatch")
    need = FIXED + header_len
    if flags & FLAG_INDEX:
        if length < need + IDX.size:
            raise CorruptRecordError("bad index target")
        need += IDX.size + _idx_unpack(buf, off + FIXED)[5]
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
    _, _, rtype, flags, store_time, header_len = _frame_unpack(buf, off)
    h = off + FIXED
    if flags & FLAG_INDEX:
        h += IDX.size + _idx_unpack(buf, h)[5]
    b = h + header_len
    if type(buf) is bytes:
        header = _unpackb(buf[h:b], raw=False, strict_map_key=False)
        body = buf[b : off + length]
    else:
        mv = memoryview(buf)
        header = _unpackb(mv[h:b], raw=False, strict_map_key=False)
        body = mv[b : off + length].tobytes()
    return make_record(pos, length, rtype, store_time, header, body, next_pos)


def read_checked(
    buf: bytes, off: int, avail: int, max_len: int, pos: int, seg_end: int, next_base: int, verify: bool = True
) -> Record:
    """:func:`check_record` + :func:`decode_record` in one pass.

    ``seg_end``: global end of the record's segment; ``next_base``: base of the following
    segment, or -1 if it is the last (a record ending at ``seg_end`` then continues there).
    ``verify=False`` skips the CRC (only for bytes this process encoded itself).
    """
    if avail < FIXED:
        raise CorruptRecordError("torn record header")
    length, crc, rtype, flags, store_time, header_len = _frame_unpack(buf, off)
    if length < FIXED or length > max_len:
        raise CorruptRecordError(f"bad record length {length}")
    if length > avail:
        raise CorruptRecordError("torn record")
    end = off + length
    if verify and _crc32(memoryview(buf)[off + 8 : end]) != crc:
        raise CorruptRecordError("record CRC mismatch")
    h = off + FIXED
    if flags & FLAG_INDEX:
        if length < FIXED + header_len + IDX.size:
            raise CorruptRecordError("bad index target")
        h += IDX.size + _idx_unpack(buf, h)[5]
    b = h + header_len
    if b > end:
        raise CorruptRecordError("bad header length")
    if type(buf) is bytes:
        header = _unpackb(buf[h:b], raw=False, strict_map_key=False)
        body = buf[b:end]
    else:
        mv = memoryview(buf)
        header = _unpackb(mv[h:b], raw=False, strict_map_key=False)
        body = mv[b:end].tobytes()
    npos = pos + length
    if npos >= seg_end and next_base >= 0:
        npos = next_base
    return make_record(pos, length, rtype, store_time, header, body, npos)


def _bundle_parts(bundle: Record) -> tuple[list, list, bytes]:
    h = bundle.header
    if type(h) is not list or len(h) != 2 or type(h[0]) is not list or type(h[1]) is not list:
        raise CorruptRecordError(f"position {bundle.pos} is not a bundle")
    return h[0], h[1], bundle.body


def member_record(bundle: Record, pos: int) -> Record:
    """The member at ``pos`` of the decoded ``bundle`` (CorruptRecordError if there is none)."""
    out: list[tuple[int, Record]] = []
    take_members(bundle, [(pos, MEMBER_BIT, 0, 0)], 0, 0, out)  # (one entry: only ``pos`` is read)
    return out[0][1]


def take_members(bundle: Record, ents: list[tuple[int, int, int, int]], i: int, first: int, out: list[tuple[int, Record]]) -> int:
    """Append ``(first + j, member)`` for the index entries ``ents[i:]`` that are members of
    the decoded ``bundle``, in order, and return the index of the first entry that is not;
    ``ents[i]`` itself must be one (CorruptRecordError if not). :func:`member_record` for a
    run of members, with the bundle's parts checked once."""
    headers, _tags, body = _bundle_parts(bundle)
    n = len(headers)
    nbody = len(body)
    bpos = bundle.pos
    table = bundle.size - nbody  # offset of the marker table in the record
    lo = bpos + table  # the marker table: members' positions are lo + 16 k, k < n
    rtype = bundle.rtype
    stime = bundle.store_time
    msize = MEMBER.size
    body_min = n << 4
    ne = len(ents)
    j = i
    while j < ne:
        pos, size, _tag, _time = ents[j]
        t = pos - lo
        if j > i:
            if not size & MEMBER_BIT or not 0 <= t < body_min:
                break
            if t & 15:
                raise CorruptRecordError(f"position {pos} is not a member of the bundle at {bpos}")
        elif t < 0 or t & 15 or t >= body_min:
            raise CorruptRecordError(f"position {pos} is not a member of the bundle at {bpos}")
        zero, boff, b, blen = _member_unpack(body, t)
        start = boff - table
        if zero or b != pos - bpos or start < body_min or start + blen > nbody:
            raise CorruptRecordError(f"position {pos} is not a member of the bundle at {bpos}")
        k = t >> 4
        r: Any = _Row()
        r.pos = pos
        r.size = msize + blen
        r.rtype = rtype
        r.store_time = stime
        r.header = headers[k]
        r.body = body[start : start + blen]
        r.next_pos = pos + msize if k + 1 < n else bundle.next_pos
        r.__class__ = Record
        out.append((first + j, r))
        j += 1
    return j


def bundle_members(bundle: Record) -> Iterator[Record]:
    """Every member of the decoded ``bundle``, in order."""
    first = bundle.pos + bundle.size - len(bundle.body)
    for k in range(len(_bundle_parts(bundle)[0])):
        yield member_record(bundle, first + (k << 4))


def bundle_entries(bundle: Record) -> list[tuple[int, int, int]]:
    """``(member position, size field of its index entry, tag hash)`` of each member (recovery)."""
    tags = _bundle_parts(bundle)[1]
    out = []
    for k, m in enumerate(bundle_members(bundle)):
        out.append((m.pos, m.size | MEMBER_BIT, tags[k] if k < len(tags) else 0))
    return out


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
