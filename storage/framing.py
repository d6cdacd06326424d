"""The record format of the log: framing, bundles, references; encoding and decoding.

How this works
--------------
Every record of the log (:mod:`storage.log`) is framed the same way and checked by its
CRC when read.

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
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import msgpack

from .model import Record

__all__ = [
    "FIXED",
    "FLAG_BUNDLE",
    "FLAG_INDEX",
    "FLAG_REFS",
    "FRAME",
    "IDX",
    "MEMBER",
    "MEMBER_BIT",
    "PREFIX",
    "REF",
    "TAIL",
    "TAIL_IDX",
    "CorruptRecordError",
    "IndexTargetInfo",
    "bundle_entries",
    "bundle_members",
    "check_record",
    "crc32",
    "decode_index_target",
    "decode_record",
    "encode_record",
    "make_record",
    "member_record",
    "read_checked",
    "take_members",
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
