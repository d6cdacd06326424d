"""MessageStore: the log, the queue indexes, group commit, recovery and retention.

How this works
--------------
``append()`` is synchronous: in call order it assigns each record its global position
(rolling to the next segment when a record does not fit), its store time and its queue
offset, encodes it once, and adds the bytes to the *current batch*; it returns the
``Stored`` list and a future. One writer task takes the whole current batch (a fresh one
starts collecting), and in a worker thread writes it with one ``pwrite`` per segment
touched, writes the batch's queue-index entries (one ``pwrite`` per queue), and with
``flush="sync"`` fsyncs once. While that thread runs, the loop keeps accepting appends into
the next batch — so batches grow with concurrency (group commit). Back on the loop the
writer publishes the new end of the log and of each queue (readers never see unwritten
data) and resolves the futures. With ``flush="async"`` futures resolve after the write and
a timer queues an fsync every ``flush_interval``.

Durability bookkeeping: every few seconds (and at close) the store fsyncs the dirty index
files and records a *checkpoint* in metadata: a log position up to which index files are
complete, plus each queue's end at that point. ``close()`` also writes a ``CLEAN`` marker.
``open()`` removes the marker; if it was present and consistent, no scan happens.
Otherwise it scans the log from the checkpoint, stops at the first record with a bad
length/CRC (truncating the file there and deleting later segments), truncates every index
back to its checkpointed end and re-appends entries from the scanned records (their index
targets are in the record framing).

Retention deletes whole old segments from the front (never the active one, never one at or
above the broker's guard position) and moves ``queue_start`` past entries pointing into
them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from pathlib import Path
from typing import Any

from .lock import DataDirLock
from .log import (
    IDX,
    Segment,
    SegmentLog,
    check_record,
    decode_index_target,
    decode_record,
    encode_record,
    fsync_dir,
)
from .metadata import Metadata
from .model import IndexEntry, NewRecord, Record, Stored
from .queue_index import ENTRY, QueueIndexFile, scan_index_dir

__all__ = ["MessageStore", "StoreClosedError"]

log = logging.getLogger(__name__)

CLEAN_MARKER = "CLEAN"
CHECKPOINT_KEY = "storage.checkpoint"
EPOCH_KEY = "storage.epoch"
SEGMENT_SIZE_KEY = "storage.segment_size"
CHECKPOINT_INTERVAL = 5.0
RETENTION_INTERVAL = 60.0
_entry_pack = ENTRY.pack
_idx_pack = IDX.pack


class StoreClosedError(RuntimeError):
    """The store is closed, or failed (disk error) and must be reopened."""


class _Batch:
    """Records collected for one write: groups of (start_pos, chunks) per segment."""

    __slots__ = ("groups", "qentries", "futures", "count", "newest_ms", "force_sync", "end")

    def __init__(self) -> None:
        self.groups: list[tuple[int, list[bytes]]] = []
        self.qentries: dict[QueueIndexFile, tuple[int, list[bytes]]] = {}
        self.futures: list[asyncio.Future[None]] = []
        self.count = 0
        self.newest_ms = 0
        self.force_sync = False
        self.end = 0


class _Opener:
    """What :meth:`MessageStore.open` returns: awaitable, and an async context manager."""

    def __init__(self, coro_fn: Callable[[], Any]) -> None:
        self._coro_fn = coro_fn
        self._store: MessageStore | None = None

    def __await__(self) -> Generator[Any, None, MessageStore]:
        return self._coro_fn().__await__()

    async def __aenter__(self) -> MessageStore:
        self._store = await self._coro_fn()
        return self._store

    async def __aexit__(self, *exc: object) -> None:
        if self._store is not None:
            await self._store.close()


class MessageStore:
    """A durable segmented log with per-queue indexes. Create with :meth:`open`."""

    epoch: int
    metadata: Metadata
    stats: dict[str, int]

    def __init__(self) -> None:  # use MessageStore.open()
        self.stats = {"fsyncs": 0, "writes": 0, "records": 0, "batches": 0}
        self._closed = True
        self._failed: BaseException | None = None
        self._guard: Callable[[], int] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._writer_task: asyncio.Task[None] | None = None
        self._wake: asyncio.Future[None] | None = None
        self._queues: dict[tuple[str, int], QueueIndexFile] = {}
        self._inflight: _Batch | None = None
        self._dirty_segs: set[Segment] = set()
        self._close_lock = asyncio.Lock()
        self._lock: DataDirLock | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._last_checkpoint = -1

    # ------------------------------------------------------------------ open / close
    @classmethod
    def open(
        cls,
        data_dir: str | Path,
        *,
        segment_size: int = 128 * 1024 * 1024,
        flush: str = "sync",
        flush_interval: float = 0.2,
        retention: float = 72 * 3600,
        clock: Callable[[], float] = time.time,
    ) -> _Opener:
        """Open (creating, locking and recovering) the store in ``data_dir``.

        Use ``store = await MessageStore.open(...)`` or ``async with MessageStore.open(...) as s``.
        Raises :class:`DataDirLockedError` if another store holds the directory. The segment
        size of an existing store is kept (positions depend on it); ``segment_size`` applies
        to new stores only.
        """
        if flush not in ("sync", "async"):
            raise ValueError("flush must be 'sync' or 'async'")
        if segment_size < 1024:
            raise ValueError("segment_size must be at least 1024")

        async def _do() -> MessageStore:
            store = cls()
            await store._open(Path(data_dir), segment_size, flush, flush_interval, retention, clock)
            return store

        return _Opener(_do)

    async def _open(
        self, data_dir: Path, segment_size: int, flush: str, flush_interval: float, retention: float,
        clock: Callable[[], float],
    ) -> None:
        self.data_dir = data_dir
        self._sync = flush == "sync"
        self._flush_interval = flush_interval
        self._retention = retention
        self._clock = clock
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(data_dir.mkdir, parents=True, exist_ok=True)
        self._lock = DataDirLock.acquire(data_dir)
        self.metadata = None  # type: ignore[assignment]
        try:
            self.metadata = await Metadata.open(data_dir / "meta.sqlite")
            stored_size = await self.metadata.get(SEGMENT_SIZE_KEY)
            self.segment_size = int(stored_size) if stored_size else segment_size
            self.epoch = int(await self.metadata.get(EPOCH_KEY, 0)) + 1
            await self.metadata.put_many({EPOCH_KEY: self.epoch, SEGMENT_SIZE_KEY: self.segment_size})
            checkpoint = await self.metadata.get(CHECKPOINT_KEY)
            self._log = SegmentLog(data_dir / "log", self.segment_size)
            self._index_root = data_dir / "index"
            await asyncio.to_thread(self._load_and_recover, checkpoint)
        except BaseException:
            self._release_files()
            if self.metadata is not None:
                await self.metadata.close()
            self._lock.release()
            raise
        self._closed = False
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="halfmq-log")
        self._written_end = self._synced_end = self._log.end
        self._next_pos = self._log.end
        self._seg_limit = self._log.segments[-1].base + self.segment_size
        self._batch = _Batch()
        self._io_lock = asyncio.Lock()
        self._writer_task = asyncio.create_task(self._writer(), name="halfmq-log-writer")
        self._tasks.append(asyncio.create_task(self._periodic(CHECKPOINT_INTERVAL, self._checkpoint)))
        self._tasks.append(asyncio.create_task(self._periodic(RETENTION_INTERVAL, self.run_retention)))
        if not self._sync:
            self._tasks.append(asyncio.create_task(self._periodic(flush_interval, self._timed_fsync)))

    def _load_and_recover(self, checkpoint: dict | None) -> None:
        marker_path = self.data_dir / CLEAN_MARKER
        marker = None
        if marker_path.exists():
            with contextlib.suppress(ValueError, OSError):
                marker = json.loads(marker_path.read_text())
            marker_path.unlink()
            fsync_dir(self.data_dir)
        self._log.load()
        if not self._log.segments:
            self._log.register(self._log.open_segment(0, int(self._clock() * 1000)))
        for topic, qid, _path in scan_index_dir(self._index_root):
            self._queues[(topic, qid)] = QueueIndexFile.open(self._index_root, topic, qid)
        self.recovered_clean = bool(
            isinstance(marker, dict)
            and isinstance(checkpoint, dict)
            and marker.get("end") == self._log.end
            and checkpoint.get("pos") == self._log.end
        )
        if not self.recovered_clean:
            self._recover(checkpoint)
        self._last_checkpoint = self._log.end if self.recovered_clean else -1

    def _recover(self, checkpoint: dict | None) -> None:
        lg = self._log
        ck_pos = checkpoint.get("pos") if isinstance(checkpoint, dict) else None
        ck_queues: dict[tuple[str, int], int] = {}
        if isinstance(ck_pos, int) and lg.start <= ck_pos <= lg.end:
            ck_queues = {(t, q): e for t, q, e in checkpoint.get("queues", [])}
        else:
            ck_pos = lg.start
        scanned: list[tuple[int, int, object]] = []
        newest: dict[int, int] = {}
        for buf, off, _length, pos in lg.iter_from(ck_pos, strict=False):
            tgt = decode_index_target(buf, off)
            store_time = int.from_bytes(buf[off + 10 : off + 18], "little")
            newest[pos - pos % self.segment_size] = store_time
            if tgt is not None:
                scanned.append((pos, _length, (tgt, store_time)))
        end = lg.scan_end
        if end < lg.end:
            log.warning("storage: log damaged at position %d (end was %d); truncating", end, lg.end)
            lg.truncate_at(end)
        for seg in lg.segments:
            if seg.base in newest:
                seg.newest_ms = newest[seg.base]
        for key, q in self._queues.items():
            q.truncate(min(q.end, max(q.start, ck_queues.get(key, q.start))))
        pending: dict[QueueIndexFile, list[tuple[int, bytes]]] = {}
        for pos, size, (tgt, store_time) in scanned:  # type: ignore[misc]
            key = (tgt.topic, tgt.queue_id)
            q = self._queues.get(key)
            if q is None:
                q = self._queues[key] = QueueIndexFile.open(self._index_root, *key)
            if tgt.queue_offset < q.end:
                continue
            if tgt.queue_offset > q.end:
                if q.end == q.start:
                    q.start = tgt.queue_offset
                else:
                    log.warning("storage: index gap in %s/%d before offset %d", *key, tgt.queue_offset)
            entry = _entry_pack(
                pos if tgt.ref_pos < 0 else tgt.ref_pos,
                size if tgt.ref_pos < 0 else tgt.ref_size,
                tgt.tag_hash,
                store_time,
            )
            pending.setdefault(q, []).append((tgt.queue_offset, entry))
            q.end = q.next_offset = tgt.queue_offset + 1
        for q, items in pending.items():
            if _consecutive(items):
                q.write_entries(items[0][0], b"".join(e for _, e in items))
            else:
                for o, e in items:
                    q.write_entries(o, e)
            q.write_header()

    async def __aenter__(self) -> MessageStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Drain the writer, fsync, persist index files and checkpoint, write the clean marker,
        close metadata and release the lock. Idempotent."""
        async with self._close_lock:
            if self._closed:
                return
            self._closed = True
            for t in self._tasks:
                t.cancel()
            for t in self._tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await t
            self._tasks.clear()
            self._wake_writer()
            if self._writer_task is not None:
                with contextlib.suppress(Exception):
                    await self._writer_task
            try:
                if self._failed is None:
                    self._batch.force_sync = True
                    await self._checkpoint(final=True)
                    await asyncio.to_thread(self._write_marker)
            finally:
                self._executor.shutdown(wait=True)
                await self.metadata.close()
                self._release_files()
                self._lock.release()

    def _write_marker(self) -> None:
        path = self.data_dir / CLEAN_MARKER
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"end": self._written_end, "epoch": self.epoch}))
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_dir(self.data_dir)

    def _release_files(self) -> None:
        if hasattr(self, "_log"):
            self._log.close()
        for q in self._queues.values():
            q.close()
        self._queues.clear()

    # ------------------------------------------------------------------ appends
    def append(self, records: Sequence[NewRecord]) -> tuple[list[Stored], asyncio.Future[None]]:
        """Assign positions/store time/queue offsets now; return them and a durability future.

        The future resolves once the records are fsynced (``flush="sync"``) or written
        (``"async"``); it fails with the write error if the disk write fails. Raises
        :class:`StoreClosedError` if closed/failed, ``ValueError`` for a record larger than a
        segment, ``KeyError`` for an unknown ``ref_pos`` (which must come from an earlier call).
        """
        if self._closed or self._failed is not None:
            raise StoreClosedError(f"store {self.data_dir} is {'failed' if self._failed else 'closed'}")
        now = int(self._clock() * 1000)
        seg_size = self.segment_size
        # phase 1: encode (may raise; no state changes except creating index files)
        encoded: list[tuple[bytes, QueueIndexFile | None, int, int, int, int]] = []
        local: dict[QueueIndexFile, int] = {}
        queues = self._queues
        for r in records:
            idx = r.index
            if idx is None:
                data = encode_record(r.rtype, now, r.header, r.body, b"")
                if len(data) > seg_size:
                    raise ValueError(f"record of {len(data)} bytes exceeds segment size {seg_size}")
                encoded.append((data, None, -1, -1, 0, 0))
                continue
            key = (idx.topic, idx.queue_id)
            q = queues.get(key)
            if q is None:
                q = queues[key] = QueueIndexFile.open(self._index_root, idx.topic, idx.queue_id)
            n = local.get(q, 0)
            local[q] = n + 1
            qoff = q.next_offset + n
            if idx.ref_pos is None:
                ref_pos, ref_size = -1, 0
            else:
                ref_pos, ref_size = idx.ref_pos, self._ref_size(idx.ref_pos)
            topic_b = idx.topic.encode()
            part = _idx_pack(idx.queue_id, idx.tag_hash & 0xFFFFFFFF, ref_pos, ref_size, qoff, len(topic_b))
            data = encode_record(r.rtype, now, r.header, r.body, part + topic_b)
            if len(data) > seg_size:
                raise ValueError(f"record of {len(data)} bytes exceeds segment size {seg_size}")
            encoded.append((data, q, qoff, ref_pos, ref_size, idx.tag_hash & 0xFFFFFFFF))
        # phase 2: place (cannot fail)
        batch = self._batch
        if not batch.futures:
            self._wake_writer()
        fut = self._loop.create_future()
        batch.futures.append(fut)
        pos = self._next_pos
        limit = self._seg_limit
        groups = batch.groups
        if not groups:
            groups.append((pos, []))
        chunks = groups[-1][1]
        out = []
        qentries = batch.qentries
        for data, q, qoff, ref_pos, ref_size, tag in encoded:
            size = len(data)
            if pos + size > limit:
                pos = limit
                limit += seg_size
                groups.append((pos, []))
                chunks = groups[-1][1]
            chunks.append(data)
            if q is not None:
                e = _entry_pack(pos, size, tag, now) if ref_pos < 0 else _entry_pack(ref_pos, ref_size, tag, now)
                ent = qentries.get(q)
                if ent is None:
                    qentries[q] = (qoff, [e])
                else:
                    ent[1].append(e)
            out.append(Stored(pos, size, now, qoff))
            pos += size
        for q, n in local.items():
            q.next_offset += n
        self._next_pos = pos
        self._seg_limit = limit
        batch.count += len(encoded)
        batch.newest_ms = now
        batch.end = pos
        return out, fut

    async def append_one(self, record: NewRecord) -> Stored:
        """Append one record and wait until it is durable (per the flush mode)."""
        stored, fut = self.append((record,))
        await fut
        return stored[0]

    async def append_batch(self, records: Sequence[NewRecord]) -> list[Stored]:
        """Append records (one write, one fsync) and wait until they are durable."""
        stored, fut = self.append(records)
        await fut
        return stored

    def _ref_size(self, ref_pos: int) -> int:
        if ref_pos < self._written_end:
            return self._log.record_size(ref_pos)
        for batch in (self._inflight, self._batch):
            if batch is None:
                continue
            for start, chunks in batch.groups:
                p = start
                for c in chunks:
                    if p == ref_pos:
                        return len(c)
                    p += len(c)
        raise KeyError(f"ref_pos {ref_pos} is not a record position")

    def _wake_writer(self) -> None:
        w = self._wake
        if w is not None and not w.done():
            w.set_result(None)

    async def _writer(self) -> None:
        loop = self._loop
        while True:
            batch = self._batch
            if not batch.futures:
                if self._closed:
                    return
                self._wake = loop.create_future()
                await self._wake
                continue
            self._batch = _Batch()
            async with self._io_lock:
                self._inflight = batch
                lg = self._log
                plan = []
                for start, chunks in batch.groups:
                    base = start - start % self.segment_size
                    seg = lg.segments[-1] if lg.bases[-1] == base else None
                    plan.append((seg, base, start - base, chunks))
                sync = self._sync or batch.force_sync
                dirty = list(self._dirty_segs) if batch.force_sync else []
                try:
                    new_segs, touched = await loop.run_in_executor(
                        self._executor, self._write_batch, plan, batch.qentries, sync, dirty, batch.newest_ms
                    )
                except BaseException as exc:
                    self._inflight = None
                    self._fail(exc, batch)
                    return
                for seg in new_segs:
                    lg.register(seg)
                for seg, size in touched:
                    seg.size = size
                    seg.newest_ms = batch.newest_ms
                    if not sync:
                        self._dirty_segs.add(seg)
                if sync:
                    self._dirty_segs.clear()
                for q, (first, entries) in batch.qentries.items():
                    q.end = first + len(entries)
                if batch.groups:
                    self._written_end = batch.end
                if sync:
                    self._synced_end = self._written_end
                self._inflight = None
                st = self.stats
                st["batches"] += 1
                st["records"] += batch.count
                st["writes"] += len(plan)
                if sync:
                    st["fsyncs"] += len(touched) + len(dirty)
            for f in batch.futures:
                if not f.done():
                    f.set_result(None)

    def _write_batch(
        self, plan: list, qentries: dict, sync: bool, dirty: list[Segment], now_ms: int
    ) -> tuple[list[Segment], list[tuple[Segment, int]]]:
        new_segs = []
        touched = []
        for seg, base, rel, chunks in plan:
            if seg is None:
                seg = self._log.open_segment(base, now_ms)
                new_segs.append(seg)
            data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            view = memoryview(data)
            at = rel
            while view:
                n = os.pwrite(seg.fd, view, at)
                view = view[n:]
                at += n
            touched.append((seg, at))
        for q, (first, entries) in qentries.items():
            q.write_entries(first, entries[0] if len(entries) == 1 else b"".join(entries))
        if sync:
            for seg, _ in touched:
                os.fsync(seg.fd)
            for seg in dirty:
                if all(seg is not s for s, _ in touched):
                    os.fsync(seg.fd)
        return new_segs, touched

    def _fail(self, exc: BaseException, batch: _Batch) -> None:
        log.error("storage: write failed, store %s is now failed: %r", self.data_dir, exc)
        self._failed = exc
        err = exc if isinstance(exc, Exception) else StoreClosedError("writer cancelled")
        for b in (batch, self._batch):
            for f in b.futures:
                if not f.done():
                    f.set_exception(err)
        self._batch = _Batch()

    async def flush(self) -> None:
        """Write and fsync everything appended so far."""
        if self._closed or self._failed is not None:
            return
        fut = self._loop.create_future()
        if not self._batch.futures:
            self._wake_writer()
        self._batch.futures.append(fut)
        self._batch.force_sync = True
        await fut

    async def _timed_fsync(self) -> None:
        if self._dirty_segs:
            await self.flush()

    async def _periodic(self, interval: float, fn: Callable[[], Any]) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await fn()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("storage: periodic task %s failed", getattr(fn, "__name__", fn))

    async def _checkpoint(self, final: bool = False) -> None:
        """fsync log + dirty index files, then record the replay point in metadata."""
        if self._failed is not None:
            return
        if not final and self._written_end == self._last_checkpoint:
            return
        async with self._io_lock:
            pos = self._written_end
            queues = [[t, q, qi.end] for (t, q), qi in self._queues.items()]
            dirty_q = [qi for qi in self._queues.values() if qi.dirty]
            segs = list(self._dirty_segs)
            if final:
                segs.append(self._log.segments[-1])

            def _sync() -> None:
                for s in segs:
                    os.fsync(s.fd)
                for qi in dirty_q:
                    qi.sync()

            await self._loop.run_in_executor(self._executor, _sync)
            self.stats["fsyncs"] += len(segs)
            self._dirty_segs.clear()
            self._synced_end = pos
        await self.metadata.put(CHECKPOINT_KEY, {"pos": pos, "queues": queues})
        self._last_checkpoint = pos

    # ------------------------------------------------------------------ reads
    @property
    def end_pos(self) -> int:
        """End of the written log (the next record goes at or after it)."""
        return self._written_end

    @property
    def start_pos(self) -> int:
        """First retained log position."""
        return self._log.start

    def read(self, pos: int) -> Record:
        """The record at ``pos``. KeyError: not a written position; ValueError: corrupt/not a record start."""
        if pos >= self._written_end:
            raise KeyError(pos)
        return self._log.read(pos)

    def iter_log(self, from_pos: int = 0) -> Iterator[Record]:
        """Written records from ``from_pos`` (a record start, or before the first segment) in order."""
        end = self._written_end
        for rec in self._log.iter_records(from_pos):
            if rec.pos >= end:
                return
            yield rec

    def read_queue(self, topic: str, queue_id: int, offset: int, max_count: int) -> list[tuple[int, IndexEntry]]:
        """Next up to ``max_count`` written ``(queue_offset, entry)`` pairs from ``offset``.

        An offset below ``queue_start`` starts at ``queue_start``. An unknown queue gives [].
        """
        q = self._queues.get((topic, queue_id))
        if q is None or max_count <= 0:
            return []
        return q.read(offset, max_count)

    def read_queue_records(
        self, topic: str, queue_id: int, offset: int, max_count: int
    ) -> list[tuple[int, Record]]:
        """Like :meth:`read_queue` with the records read (entries whose record is gone are skipped)."""
        entries = self.read_queue(topic, queue_id, offset, max_count)
        out: list[tuple[int, Record]] = []
        n = len(entries)
        i = 0
        lg = self._log
        while i < n:
            e = entries[i][1]
            try:
                seg = lg.find(e.pos)
            except KeyError:
                i += 1
                continue
            seg_end = seg.end
            start = e.pos
            end = start + e.size
            j = i + 1
            while j < n and entries[j][1].pos == end and end + entries[j][1].size <= seg_end and end - start < 1 << 22:
                end += entries[j][1].size
                j += 1
            if j - i == 1 or end > seg_end:
                with contextlib.suppress(KeyError):
                    out.append((entries[i][0], lg.read(start)))
                i += 1
                continue
            buf = os.pread(seg.fd, end - start, start - seg.base)
            off = 0
            for k in range(i, j):
                length = check_record(buf, off, len(buf) - off, len(buf) - off)
                pos = start + off
                out.append((entries[k][0], decode_record(buf, off, length, pos, lg.next_pos_after(seg, pos + length))))
                off += length
            i = j
        return out

    def queue_start(self, topic: str, queue_id: int) -> int:
        """Smallest retained offset of the queue (0 unless retention removed entries)."""
        q = self._queues.get((topic, queue_id))
        return 0 if q is None else q.start

    def queue_end(self, topic: str, queue_id: int) -> int:
        """Next offset to be written (counting written entries only)."""
        q = self._queues.get((topic, queue_id))
        return 0 if q is None else q.end

    def queues(self) -> list[tuple[str, int]]:
        """Every ``(topic, queue_id)`` that has an index."""
        return sorted(self._queues)

    # ------------------------------------------------------------------ retention
    def set_retention_guard(self, fn: Callable[[], int]) -> None:
        """Register ``fn() -> lowest log position still needed``; retention keeps it and after."""
        self._guard = fn

    async def run_retention(self) -> int:
        """Delete whole segments older than ``retention`` below the guard; return how many."""
        if self._closed or self._failed is not None:
            return 0
        deleted = 0
        async with self._io_lock:
            guard = self._guard() if self._guard is not None else math.inf
            cutoff = int(self._clock() * 1000) - int(self._retention * 1000)
            lg = self._log
            doomed = []
            while len(lg.segments) > 1:
                seg = lg.segments[0]
                if seg.base + self.segment_size > guard or seg.newest_ms > cutoff:
                    break
                doomed.append(lg.drop_first())
            if doomed:
                first = lg.start
                for seg in doomed:
                    self._dirty_segs.discard(seg)
                    os.close(seg.fd)
                    os.unlink(seg.path)
                fsync_dir(lg.dir)
                deleted = len(doomed)
                for q in self._queues.values():
                    start = q.start
                    while start < q.end:
                        chunk = q.read(start, 4096)
                        k = 0
                        while k < len(chunk) and chunk[k][1].pos < first:
                            k += 1
                        start += k
                        if k < len(chunk):
                            break
                    q.set_start(start)
        if deleted:
            log.info("storage: retention deleted %d segment(s)", deleted)
            await self._checkpoint(final=False)
        return deleted


def _consecutive(items: list[tuple[int, bytes]]) -> bool:
    return all(items[k][0] == items[0][0] + k for k in range(len(items)))
