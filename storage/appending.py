"""Appends: records encoded straight into the current batch, in call order.

How this works
--------------
``append()`` is synchronous: in call order it assigns each record its global position
(rolling to the next segment when a record does not fit), its store time and its queue
offset, and encodes it once, straight into the *current batch*: one list of ``bytes``
parts per segment touched (prefix, head and body of each record, joined once when the
batch is written, and that one ``bytes`` is also what the recent-record cache keeps), the
list of record starts in it, and one ``bytearray`` of packed index entries per queue. A
failing record (too large, unknown ``ref_pos``) rolls the batch back to where the call
started. It returns the ``Stored`` list and the batch's future: one future, shared by every
append into that batch, so a thousand appends cost one future, not a thousand. The writer
(:mod:`storage.writer`) takes the batch and resolves the future.

``append_one`` (one record, awaited) only queues its record: the queued records are encoded
together, as one ``append``, when the writer takes the batch or when the next ``append``
comes (so positions still follow call order). After 512 queued records the batch is
*sealed* and the next ones start another, so that many appenders split into groups that
take turns: one group's batch on its way to the disk while the other's appenders run. Its
callers wait on one plain future per batch; a task waits on a plain future markedly faster
than on the batch's uncancellable subclass, and a waiter's cancellation, which cancels the
plain one, sends the others on to wait for the batch's own.

Bundles: a :class:`NewBundle` (many messages of one queue) is encoded as *one* record —
one msgpack call for all member headers, one CRC, one ``b"".join`` of the bodies — with
one index entry per member pointing at the member's own position inside it (entry size
with ``MEMBER_BIT`` set). Reading members back is in :mod:`storage.cache`; recovery
rebuilds one index entry per member from the bundle's framing and header. A record with a
:class:`RefsTarget` likewise gives its queue one entry per reference, its body the table of
them (recovery reads the entries back from it).

:class:`Appending` is one part of :class:`storage.store.MessageStore` (a mixin: its methods
use the store's attributes).
"""

from __future__ import annotations

import asyncio
import bisect
import struct
from collections.abc import Callable, Sequence
from functools import lru_cache
from itertools import accumulate, chain, repeat
from operator import add, or_
from typing import TYPE_CHECKING, Any

from .framing import (
    FLAG_BUNDLE,
    FLAG_INDEX,
    FLAG_REFS,
    MEMBER,
    MEMBER_BIT,
    PREFIX,
    TAIL,
    TAIL_IDX,
    crc32,
)
from .model import BundleTarget, IndexTarget, NewBundle, NewRecord, RefsTarget, Stored
from .queue_index import ENTRY, QueueIndexFile
from .state import StoreState

if TYPE_CHECKING:
    from .store import MessageStore

__all__ = ["Appending", "StoreClosedError"]

_entry_pack = ENTRY.pack
_prefix_pack = PREFIX.pack
_tail_pack = TAIL.pack
_tail_idx_pack = TAIL_IDX.pack
_crc32 = crc32
#: append_one: a batch takes at most this many queued records, the next ones start another,
#: so that with many appenders one batch is on its way to the disk while the next fills
#: (1,024 appenders of 1 KiB, in-process: 256k/s in one batch, 300-318k/s in two).
_SINGLES_MAX = 512
_make_stored = tuple.__new__  # Stored(...) without the named tuple's Python-level __new__
_TARGETS_MAX = 4096  # cached index targets before the cache starts over


@lru_cache(maxsize=256)
def _n_structs(n: int) -> tuple[Callable[..., bytes], Callable[..., bytes]]:
    """``pack`` of ``n`` member markers and of ``n`` index entries, each in one call."""
    return struct.Struct("<" + "IIII" * n).pack, struct.Struct("<" + "QIIQ" * n).pack


@lru_cache(maxsize=256)
def _refs_structs(n: int) -> tuple[Callable[..., bytes], Callable[..., bytes]]:
    """``pack`` of ``n`` references (a references record's body) and of their ``n`` index
    entries, each in one call."""
    return struct.Struct("<" + "qII" * n).pack, struct.Struct("<" + "QIIQ" * n).pack


class StoreClosedError(RuntimeError):
    """The store is closed, or failed (disk error) and must be reopened."""


class _BatchFuture(asyncio.Future):
    """The durability future shared by every append of one batch.

    It cannot be cancelled: one waiter's cancellation must not cancel it for the others. A
    task cancelled while it waits is still cancelled, once the batch is durable.
    """

    def cancel(self, msg: Any = None) -> bool:
        return False


class _Batch:
    """Records collected for one write: ``[start_pos, parts, record starts]`` per segment,
    ``parts`` holding three ``bytes`` per record (prefix, head, body), joined once to write."""

    __slots__ = ("groups", "qentries", "futures", "count", "newest_ms", "force_sync", "end")

    def __init__(self) -> None:
        self.groups: list[list[Any]] = []
        self.qentries: dict[QueueIndexFile, list[Any]] = {}  # q -> [first offset, bytearray]
        # empty, or the one shared future first (then append_one's plain ones: see _Singles)
        self.futures: list[asyncio.Future[None]] = []
        self.count = 0
        self.newest_ms = 0
        self.force_sync = False
        self.end = 0


class _Singles:
    """``append_one`` calls collected since the last encode: their records, and once
    encoded into the current batch, one ``Stored`` (or the record's error) each."""

    __slots__ = ("records", "stored", "fut", "batch_fut")

    def __init__(self, fut: asyncio.Future[None], batch_fut: asyncio.Future[None]) -> None:
        self.records: list[NewRecord] = []
        self.stored: list[Any] = []
        self.fut = fut  # a plain future: a task waits on it much faster than on a subclass
        self.batch_fut = batch_fut  # the batch's own, which no waiter can cancel



class Appending(StoreState):
    """Appends of :class:`storage.store.MessageStore` (see the module's "How this works")."""

    def append(self: MessageStore, records: Sequence[NewRecord | NewBundle],
               now: bool = False) -> tuple[list[Stored], asyncio.Future[None]]:
        """Assign positions/store time/queue offsets now; return them and a durability future.

        The future resolves once the records are fsynced (``flush="sync"``) or written
        (``"async"``); it fails with the write error if the disk write fails. Raises
        :class:`StoreClosedError` if closed/failed, ``ValueError`` for a record larger than a
        segment, ``KeyError`` for an unknown ``ref_pos`` (which must come from an earlier call).

        ``now``: if the writer is idle, write the batch before returning (the future is then
        done; see :meth:`storage.writer.Writer.write_now`), two loop iterations sooner.
        """
        if self._closed or self._failed is not None:
            raise StoreClosedError(f"store {self.data_dir} is {'failed' if self._failed else 'closed'}")
        if self._singles is not None:
            self._encode_singles()
        if not now:
            return self._encode(records)
        out = self._encode(records, wake=False)  # (written here, unless the writer is busy)
        if not self.write_now():
            self._wake_writer()
        return out

    def _encode(self: MessageStore, records: Sequence[NewRecord | NewBundle],
                wake: bool = True) -> tuple[list[Stored], asyncio.Future[None]]:
        """:meth:`append` without its checks: encode ``records`` into the current batch
        (``wake``: a new batch wakes the writer)."""
        now = int(self._clock() * 1000)
        seg_size = self.segment_size
        batch = self._batch
        groups = batch.groups
        qentries = batch.qentries
        targets = self._targets
        packb = self._packb
        crc32 = _crc32
        tail_pack = _tail_pack
        tail_idx_pack = _tail_idx_pack
        prefix_pack = _prefix_pack
        entry_pack = _entry_pack
        make_stored = _make_stored
        # per queue: [records of this call, their packed index entries]; merged into the
        # batch at the end, so that a failing record leaves the batch's entries untouched
        local: dict[QueueIndexFile, list[Any]] = {}
        out: list[Stored] = []
        add = out.append
        pos = self._next_pos
        limit = self._seg_limit
        n_groups = len(groups)
        if groups:
            g = groups[-1]
            parts: list[bytes] = g[1]
            starts: list[int] = g[2]
            mark_parts = len(parts)
            mark_starts = len(starts)
        else:
            parts = starts = None  # type: ignore[assignment]
            mark_parts = mark_starts = 0
        try:
            for rtype, header, body, idx in records:
                if type(idx) is BundleTarget:
                    pos, limit, parts, starts = self._append_bundle(
                        rtype, header, body, idx, now, pos, limit, parts, starts, local, out)  # type: ignore[arg-type]
                    continue
                if type(idx) is RefsTarget:
                    pos, limit, parts, starts = self._append_refs(
                        rtype, header, idx, now, pos, limit, parts, starts, local, out)  # type: ignore[arg-type]
                    continue
                hdr = packb(header)
                if idx is None:
                    head = tail_pack(rtype, 0, now, len(hdr)) + hdr
                    qoff = -1
                    q = None
                else:
                    t = targets.get(idx)  # type: ignore[arg-type]
                    if t is None:
                        t = self._target(idx)  # type: ignore[arg-type]
                    _, q, topic_b, tag, ref_pos, ref_size, qid, tlen = t
                    lq = local.get(q)
                    if lq is None:
                        lq = local[q] = [0, bytearray()]
                    qoff = q.next_offset + lq[0]
                    head = tail_idx_pack(rtype, FLAG_INDEX, now, len(hdr), qid, tag, ref_pos, ref_size, qoff, tlen) + topic_b + hdr
                size = 8 + len(head) + len(body)
                if size > seg_size:
                    raise ValueError(f"record of {size} bytes exceeds segment size {seg_size}")
                if pos + size > limit:
                    pos = limit
                    limit += seg_size
                    parts = None  # type: ignore[assignment]
                if parts is None:
                    parts = []
                    starts = []
                    groups.append([pos, parts, starts])
                parts += (prefix_pack(size, crc32(body, crc32(head))), head, body)  # type: ignore[arg-type]
                starts.append(pos)
                if q is not None:
                    lq[1] += entry_pack(pos, size, tag, now) if ref_pos < 0 else entry_pack(ref_pos, ref_size, tag, now)  # type: ignore[index]
                    lq[0] += 1  # type: ignore[index]
                add(make_stored(Stored, (pos, size, now, qoff)))
                pos += size
        except BaseException:
            # roll the batch back to where this call started
            del groups[n_groups:]
            if n_groups:
                g = groups[-1]
                del g[1][mark_parts:]
                del g[2][mark_starts:]
            raise
        futs = batch.futures
        fut = futs[0] if futs else self._batch_future(batch, wake)
        for q, (n, entries) in local.items():
            ent = qentries.get(q)
            if ent is None:
                qentries[q] = [q.next_offset, entries]
            else:
                ent[1] += entries
            q.next_offset += n
        self._next_pos = pos
        self._seg_limit = limit
        batch.count += len(out)
        batch.newest_ms = now
        batch.end = pos
        return out, fut

    def _append_bundle(
        self: MessageStore, rtype: int, headers: list, bodies: list[bytes], idx: BundleTarget, now: int, pos: int,
        limit: int, parts: list[bytes] | None, starts: list[int] | None, local: dict, out: list[Stored],
    ) -> tuple[int, int, list[bytes], list[int]]:
        """Encode one :class:`NewBundle` into the current batch (part of :meth:`append`)."""
        n = len(bodies)
        tags = idx.tag_hashes
        if not n or len(headers) != n or len(tags) != n:
            raise ValueError("a bundle needs as many headers and tag hashes as bodies (at least one)")
        t, lq, qoff = self._queue_slot(idx.topic, idx.queue_id, local)
        hdr = self._packb([headers, tags])
        head = _tail_idx_pack(rtype, FLAG_INDEX | FLAG_BUNDLE, now, len(hdr), t[6], 0, -1, n, qoff, t[7]) + t[2] + hdr
        lens = list(map(len, bodies))
        table = 8 + len(head)  # the marker table, then the bodies (see storage.framing)
        first_body = table + (n << 4)
        size = first_body + sum(lens)
        pos, limit, parts, starts = self._place("bundle", size, pos, limit, parts, starts)
        # everything per member below runs in C (map/zip/struct over whole lists)
        offs = list(accumulate(lens, initial=first_body))
        offs.pop()
        structs = _n_structs(n)
        try:
            backs = range(table, first_body, 16)
            markers = structs[0](*chain.from_iterable(zip(repeat(0, n), offs, backs, lens, strict=True)))
            sizes = list(map(add, lens, repeat(MEMBER.size, n)))
            vps = range(pos + table, pos + first_body, 16)
            e_sizes = map(or_, sizes, repeat(MEMBER_BIT, n))
            e = structs[1](*chain.from_iterable(zip(vps, e_sizes, tags, repeat(now, n), strict=True)))
        except struct.error as exc:
            raise ValueError(f"bad bundle: {exc} (tag hashes are 0 .. 2**32-1)") from None
        pieces = [markers]
        pieces += bodies
        data = b"".join(pieces)
        parts += (_prefix_pack(size, _crc32(data, _crc32(head))), head, data)
        starts.append(pos)
        out += map(_make_stored, repeat(Stored, n), zip(vps, sizes, repeat(now, n), range(qoff, qoff + n), strict=True))
        lq[1] += e
        lq[0] += n
        self.stats["bundles"] += 1
        return pos + size, limit, parts, starts  # type: ignore[return-value]

    def _place(self: MessageStore, what: str, size: int, pos: int, limit: int, parts: list[bytes] | None,
               starts: list[int] | None) -> tuple[int, int, list[bytes], list[int]]:
        """Where a record of ``size`` bytes goes in the current batch (bundles, references
        records): ``(pos, limit, parts, starts)``, in the next segment if it does not fit in
        this one; ``ValueError`` if no segment holds it."""
        seg_size = self.segment_size
        if size > seg_size:
            raise ValueError(f"{what} of {size} bytes exceeds segment size {seg_size}")
        if pos + size > limit:
            pos = limit
            limit += seg_size
            parts = None
        if parts is None or starts is None:
            parts = []
            starts = []
            self._batch.groups.append([pos, parts, starts])
        return pos, limit, parts, starts

    def _queue_slot(self: MessageStore, topic: str, queue_id: int, local: dict) -> tuple[tuple, list, int]:
        """For a record with many index entries in one queue: the queue's target, its
        ``[count, entries]`` of this call in ``local``, and the offset its next entry gets."""
        t = self._targets.get(IndexTarget(topic, queue_id))
        if t is None:
            t = self._target(IndexTarget(topic, queue_id))
        q = t[1]
        lq = local.get(q)
        if lq is None:
            lq = local[q] = [0, bytearray()]
        return t, lq, q.next_offset + lq[0]

    def _append_refs(
        self: MessageStore, rtype: int, header: Any, idx: RefsTarget, now: int, pos: int, limit: int,
        parts: list[bytes] | None, starts: list[int] | None, local: dict, out: list[Stored],
    ) -> tuple[int, int, list[bytes], list[int]]:
        """Encode one record with a :class:`RefsTarget` into the current batch (part of
        :meth:`append`): its body the table of references, one index entry per reference."""
        refs = idx.refs
        n = len(refs)
        if not n:
            raise ValueError("a references record needs at least one reference")
        t, lq, qoff = self._queue_slot(idx.topic, idx.queue_id, local)
        pack_refs, pack_entries = _refs_structs(n)
        try:
            flat = list(chain.from_iterable(refs))
            body = pack_refs(*flat)
            e = pack_entries(*chain.from_iterable(zip(flat[0::3], flat[1::3], flat[2::3], repeat(now, n), strict=True)))
        except struct.error as exc:
            raise ValueError(f"bad reference: {exc} (positions and sizes from earlier appends, tag hashes 0 .. 2**32-1)") from None
        hdr = self._packb(header)
        head = _tail_idx_pack(rtype, FLAG_INDEX | FLAG_REFS, now, len(hdr), t[6], 0, -1, n, qoff, t[7]) + t[2] + hdr
        size = 8 + len(head) + len(body)
        pos, limit, parts, starts = self._place("references record", size, pos, limit, parts, starts)
        parts += (_prefix_pack(size, _crc32(body, _crc32(head))), head, body)
        starts.append(pos)
        out.append(_make_stored(Stored, (pos, size, now, qoff)))
        lq[1] += e
        lq[0] += n
        self.stats["ref_records"] += 1
        return pos + size, limit, parts, starts  # type: ignore[return-value]

    async def append_one(self: MessageStore, record: NewRecord) -> Stored:
        """Append one record and wait until it is durable (per the flush mode).

        Concurrent calls are encoded together, as one :meth:`append` of all of them, when
        the writer takes the batch (or at the next ``append``, keeping call order): per
        record that costs about half of an ``append`` of one. A bad record fails only its
        own call, with the error ``append`` would raise.
        """
        g = self._singles
        if g is None or len(g.records) >= _SINGLES_MAX or self._closed:
            if self._closed or self._failed is not None:  # (a failure also drops the queue)
                raise StoreClosedError(f"store {self.data_dir} is {'failed' if self._failed else 'closed'}")
            if g is not None:
                self._seal()
            batch = self._batch
            g = self._singles = _Singles(self._loop.create_future(), self._batch_future(batch))
            batch.futures.append(g.fut)
        k = len(g.records)
        g.records.append(record)
        try:
            await g.fut
        except asyncio.CancelledError:
            # a cancelled waiter cancels the shared plain future for all: the others, not
            # cancelled themselves, go on waiting for the batch
            if not g.fut.cancelled() or asyncio.current_task().cancelling():  # type: ignore[union-attr]
                raise
            await g.batch_fut
        r = g.stored[k]
        if type(r) is not Stored:
            raise r
        return r

    def _seal(self: MessageStore) -> None:
        """Close the current batch (with the queued ``append_one`` records) for the writer;
        later appends go to a new one."""
        if self._singles is not None:
            self._encode_singles()
        if self._batch.futures:
            self._sealed.append(self._batch)
            self._batch = _Batch()

    def _encode_singles(self: MessageStore) -> None:
        """Encode the pending ``append_one`` records into the current batch, all at once;
        if one is bad, one at a time, so that only the bad one fails."""
        g = self._singles
        assert g is not None  # (called only when there are pending records)
        self._singles = None
        try:
            g.stored = self._encode(g.records)[0]
        except Exception:
            out = g.stored = []
            for r in g.records:
                try:
                    out.append(self._encode((r,))[0][0])
                except Exception as exc:
                    out.append(exc)

    async def append_batch(self: MessageStore, records: Sequence[NewRecord | NewBundle]) -> list[Stored]:
        """Append records (one write, one fsync) and wait until they are durable."""
        stored, fut = self.append(records)
        await fut
        return stored

    def _target(self: MessageStore, idx: IndexTarget) -> tuple:
        """What ``append`` needs of an index target; cached unless it refers to a record."""
        topic = idx.topic
        q = self._queues.get((topic, idx.queue_id))
        if q is None:
            q = self._queues[(topic, idx.queue_id)] = QueueIndexFile.open(self._index_root, topic, idx.queue_id, self._files)
        topic_b = self._topic_bytes.get(topic)
        if topic_b is None:
            topic_b = self._topic_bytes[topic] = topic.encode()
        if idx.ref_pos is None:
            t = (idx, q, topic_b, idx.tag_hash & 0xFFFFFFFF, -1, 0, idx.queue_id, len(topic_b))
            if len(self._targets) >= _TARGETS_MAX:
                self._targets.clear()
            self._targets[idx] = t
            return t
        ref_size = idx.ref_size if idx.ref_size is not None else self._ref_size(idx.ref_pos)
        return (idx, q, topic_b, idx.tag_hash & 0xFFFFFFFF, idx.ref_pos, ref_size, idx.queue_id, len(topic_b))

    def _ref_size(self: MessageStore, ref_pos: int) -> int:
        if ref_pos < self._written_end:
            return self.read(ref_pos).size
        for batch in (self._inflight, *(h.batch for h in self._handed), *self._sealed, self._batch):
            if batch is None:
                continue
            for _start, parts, starts in batch.groups:
                k = bisect.bisect_left(starts, ref_pos)
                if k < len(starts) and starts[k] == ref_pos:
                    return PREFIX.unpack_from(parts[3 * k])[0]
        raise KeyError(f"ref_pos {ref_pos} is not a record position")

    def _batch_future(self: MessageStore, batch: _Batch, wake: bool = True) -> asyncio.Future[None]:
        """The one future every append into ``batch`` shares (created by the first, which
        wakes the writer unless ``wake`` is false)."""
        if batch.futures:
            return batch.futures[0]
        if wake:
            self._wake_writer()
        fut = _BatchFuture(loop=self._loop)
        batch.futures.append(fut)
        return fut

    def _wake_writer(self: MessageStore) -> None:
        w = self._wake
        if w is not None and not w.done():
            w.set_result(None)
