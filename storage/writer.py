"""The writer: one task takes the batches in order, writes and syncs them (group commit).

How this works
--------------
One writer task takes the whole current batch (a fresh one starts collecting: see
:mod:`storage.appending`) and writes it with one ``pwrite`` per segment touched; its
queue-index entries are written on the loop, one ``pwrite`` per queue (index descriptors
belong to the loop: see :mod:`storage.queue_index`); with ``flush="sync"`` it fdatasyncs
once. A batch of up to 256 KiB is written on the loop thread (cheaper than a thread round
trip); a bigger one in a worker thread while the loop writes its index entries and keeps
accepting appends. Either way, what arrives during a write goes into the next batch — so
batches grow with load (group commit). Back on the loop the writer publishes the new end
of the log and of each queue (readers never see unwritten data) and resolves the batch's
future. An appender that waits for its records (``append(..., now=True)``, a lone SEND)
has the batch written at once, without the writer task, when the writer is idle and the
batch small: it is the batch the writer would have taken one iteration later, so group
commit is the same. With ``flush="async"`` it resolves after the write and a timer queues an fsync
every ``flush_interval``. Big batches under ``flush="sync"`` are handed off instead of
waited for (:mod:`storage.handoff`).

With ``flush="sync"`` the active segment is zero-filled ahead of the appends in a thread of
its own (an fdatasync inside the file's length is cheaper); a segment is cut at the end of
its data, durably, before the next one holds any. A write error fails the store: every
waiting append gets the error, later ones :class:`StoreClosedError`.

:class:`Writer` is one part of :class:`storage.store.MessageStore` (a mixin).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .appending import StoreClosedError, _Batch
from .fileio import FileIO
from .log import Segment
from .queue_index import ESIZE, QueueIndexFile
from .state import StoreState

if TYPE_CHECKING:
    from .store import MessageStore

__all__ = ["Writer"]

log = logging.getLogger("storage.store")

# fdatasync flushes the data and the metadata needed to read it back (the file size),
# which is all an append needs; it skips timestamps and is markedly cheaper than fsync.
#: Batches up to this size are written (and fdatasynced) on the event loop thread; larger
#: ones are handed to the writer thread. Handing every batch to the thread instead was
#: measured against this (same code, 5 alternating pairs, 2 shared cores): the broker's CPU
#: per message rose in e2e-users (1.06-1.26x per pair), publish-users (1.02-2.07x) and e2e
#: (median 1.08x) and one-at-a-time p50 went from 0.54 to 0.67 ms (medians): the thread
#: round trip and the GIL hand-over cost more than the loop gains while the disk syncs.
_INLINE_BYTES = 256 * 1024
#: With flush="sync" the active segment is zero-filled this far ahead of its appends, in
#: the background: an fdatasync of a write inside the file's length skips the journal
#: commit that growing the file needs (measured here, 8 KiB write + fdatasync: p50 0.31 ->
#: 0.22 ms). A fill of 1 MiB starts when the appends come within 512 KiB of the filled
#: end; each ends with its own fdatasync, which the log's fdatasyncs queue behind (A/B, tx
#: send->deliver p99 at half rate: 4.0 / 4.7 ms with 1 MiB, 6.0 / 8.8 ms with 4 MiB).
#: Only small batches start a fill: a batch of more than _INLINE_BYTES would catch up with
#: the running fill and wait for it, and its own fdatasync gains little (1,024 appenders,
#: ~1 MB batches: 235k/s with fills after every batch, 280k/s with none).
_PREALLOC_CHUNK = 1 << 20
_ZEROS = bytes(1 << 20)


def _pwrite_whole(pwrite: Callable[..., int], fd: int, data: bytes, at: int) -> int:
    """``pwrite`` all of ``data`` at ``at`` (looping on short writes); return the end."""
    with memoryview(data) as view:
        while view:
            n = pwrite(fd, view, at)
            view = view[n:]
            at += n
    return at


def _retrieve(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


def _write_index(qentries: dict[QueueIndexFile, list[Any]]) -> None:
    """Write a batch's packed index entries, one ``pwrite`` per queue (event loop)."""
    for q, (first, entries) in qentries.items():
        q.write_entries(first, entries)



class Writer(StoreState):
    """The writer of :class:`storage.store.MessageStore` (see the module's "How this works")."""

    async def _writer(self: MessageStore) -> None:
        """Take batches in order and write them: here, in the writer thread, or (big batches
        under flush="sync") handed to the writer thread without waiting, several in flight;
        publish each, in order, once written (and synced)."""
        loop = self._loop
        handed = self._handed
        try:
            while True:
                while handed and handed[0].job.done():
                    self._finish_handed()
                batch = self._next_batch()
                if batch is None:
                    if handed:
                        self._wake = loop.create_future()
                        await asyncio.wait((self._wake, handed[0].job), return_when=asyncio.FIRST_COMPLETED)
                        continue
                    if self._closed:
                        return
                    self._wake = loop.create_future()
                    await self._wake
                    continue
                plan = self._plan(batch)
                nbytes = sum(len(data) for _, _, _, data in plan)
                if self._sync and nbytes > _INLINE_BYTES and not batch.force_sync and all(p[0] for p in plan):
                    await self._hand_off(batch, plan)  # (all in the active segment)
                    continue
                while handed:  # what was handed off first is published first
                    await asyncio.wait((handed[0].job,))
                    self._finish_handed()
                await self._write(batch, plan, nbytes)
        except BaseException as exc:  # a write failed (or the writer was cancelled)
            self._fail(exc, *(h.batch for h in handed))
            for h in handed:  # (their errors, if any, are this one's)
                h.job.add_done_callback(_retrieve)
            handed.clear()
            if not isinstance(exc, Exception):
                raise

    def _next_batch(self: MessageStore) -> _Batch | None:
        """The oldest batch waiting to be written (a sealed one, else the current one, with
        the queued ``append_one`` records), or None if nothing waits."""
        if self._sealed:
            return self._sealed.popleft()
        if self._singles is not None:
            self._encode_singles()
        batch = self._batch
        if not batch.futures:
            return None
        self._batch = _Batch()
        return batch

    def _plan(self: MessageStore, batch: _Batch) -> list[tuple[Segment | None, int, int, bytes]]:
        """Per segment the batch touches: ``(segment, or None for one still to create, its
        base, offset in it, bytes)``. The bytes, one join of the records' parts, are both
        what is written and (immutable) what the recent-record cache keeps."""
        lg = self._log
        plan = []
        for start, parts, _starts in batch.groups:
            base = start - start % self.segment_size
            seg = lg.segments[-1] if lg.bases[-1] == base else None
            plan.append((seg, base, start - base, b"".join(parts)))
        return plan

    async def _write(self: MessageStore, batch: _Batch, plan: list, nbytes: int) -> None:
        """Write (and with flush="sync" or ``force_sync``, fdatasync) ``batch`` and publish it."""
        async with self._io_lock:
            if batch.end > self._zero_from:  # the batch reaches the zero-fill running
                await self._wait_zero_job()
            if nbytes <= _INLINE_BYTES:
                self._write_here(batch, plan)
                if self._prealloc:
                    self._maybe_zero_fill()
                return
            # the log bytes in the writer thread; meanwhile the index entries here (index
            # descriptors are the loop's: see storage.queue_index)
            self._inflight = batch
            try:
                sync, dirty = self._sync or batch.force_sync, self._dirty_for(batch)
                job = self._loop.run_in_executor(self._executor, self._write_batch, plan, sync, dirty, batch.newest_ms)
                try:
                    _write_index(batch.qentries)
                except BaseException:
                    job.add_done_callback(_retrieve)
                    raise
                new_segs, touched, _ = await job
                self._written(batch, plan, new_segs, touched, sync, dirty)
            except BaseException as exc:
                self._fail(exc, batch)
                raise
            finally:
                self._inflight = None

    def _write_here(self: MessageStore, batch: _Batch, plan: list) -> None:
        """Write (and sync) a small batch right here on the loop, and publish it.

        A round trip to a thread costs two thread wake-ups (measured here: p50 0.19 ms,
        p99 1.1 ms for a no-op) plus a wait for the GIL while the loop runs, about as much
        as the fdatasync itself; while the loop waits for the disk, the next sends pile up
        in the socket buffers and make the next batch (group commit still happens).
        Measured on the side-by-side benchmark, halfmq sync, against handing off every
        batch of more than 4 records: publish 47,373 -> 55,648 msgs/s, one-at-a-time p50
        0.727 -> 0.651 ms, e2e 17,096 -> 24,786, tx 10,109 -> 13,812. Only big batches go
        to the thread, so the loop keeps serving.
        """
        self._inflight = batch
        try:
            sync, dirty = self._sync or batch.force_sync, self._dirty_for(batch)
            _write_index(batch.qentries)
            new_segs, touched, synced_ns = self._write_batch(plan, sync, dirty, batch.newest_ms)
            # (its writes go to the page cache: the fdatasyncs are the loop's wait)
            self.stats["loop_disk_wait_ns"] += synced_ns
            self._written(batch, plan, new_segs, touched, sync, dirty)
        except BaseException as exc:
            self._fail(exc, batch)
            raise
        finally:
            self._inflight = None

    def _dirty_for(self: MessageStore, batch: _Batch) -> list[Segment]:
        """The segments written unsynced before, that a ``force_sync`` batch syncs too."""
        return list(self._dirty_segs) if batch.force_sync else []

    def _written(self: MessageStore, batch: _Batch, plan: list, new_segs: list[Segment],
                 touched: list[tuple[Segment, int]], sync: bool, dirty: list[Segment]) -> None:
        """The batch's bytes are written (and synced): register its new segments, publish it."""
        for seg in new_segs:
            self._log.register(seg)
        self._publish(batch, touched, [data for *_, data in plan], sync, len(plan), len(touched) + len(dirty))

    def write_now(self: MessageStore) -> bool:
        """Write the current batch here and now if the writer is idle; True if it did (the
        batch's future is then done: resolved, or failed with the write error).

        For an appender that waits for its records (a lone SEND): the writer would take
        the same batch one loop iteration later and resolve its future another iteration
        after that. Only when nothing else is being written or waits to be (the writer
        asleep on its wake-up, no sealed or handed-off batch, the write lock free), the
        batch is small (written on the loop anyway) and does not reach a running zero-fill;
        otherwise the writer takes it as usual, so group commit under load is unchanged.
        """
        wake = self._wake
        batch = self._batch
        if (wake is None or wake.done() or not batch.futures or self._sealed or self._handed
                or self._singles is not None or self._io_lock.locked() or self._closed
                or self._failed is not None or batch.end > self._zero_from):
            return False
        plan = self._plan(batch)
        if sum(len(p[3]) for p in plan) > _INLINE_BYTES:
            return False
        self._batch = _Batch()
        with contextlib.suppress(Exception):  # (the batch's future has the error; the store is failed)
            self._write_here(batch, plan)
        if self._prealloc:
            self._maybe_zero_fill()
        return True

    def _publish(self: MessageStore, batch: _Batch, touched: list, datas: list[bytes], sync: bool, writes: int, fsyncs: int) -> None:
        """A batch is written (and synced): make it visible to readers, resolve its futures."""
        for seg, size in touched:
            seg.size = size
            seg.newest_ms = batch.newest_ms
            if not sync:
                self._dirty_segs.add(seg)
        if sync:
            self._dirty_segs.clear()
        for q, (first, entries) in batch.qentries.items():
            q.end = first + len(entries) // ESIZE
        if batch.groups:
            self._written_end = batch.end
            if self._rc_limit:
                self._cache_add(batch.groups, datas)
        if sync:
            self._synced_end = self._written_end
        st = self.stats
        st["batches"] += 1
        st["records"] += batch.count
        self.batch_records.observe(batch.count)
        st["writes"] += writes
        if sync:
            st["fsyncs"] += fsyncs
        for f in batch.futures:
            if not f.done():
                f.set_result(None)

    def _maybe_zero_fill(self: MessageStore) -> None:
        """Start zero-filling the active segment ahead of the appends when they come near
        the end of what is filled; one fill at a time, in its own thread."""
        if self._zero_job is not None or self._closed or self._failed is not None:
            return
        seg = self._log.segments[-1]
        chunk = min(_PREALLOC_CHUNK, self.segment_size)
        # positions up to _next_pos are taken (some still being written): fill past them,
        # once they come within half a chunk of the filled end
        used = max(seg.size, self._next_pos - seg.base)
        if used + chunk // 2 <= seg.alloc:
            return
        start = max(seg.alloc, used)
        if start >= self.segment_size:
            return
        end = min(self.segment_size, start + chunk)
        self._zero_from = seg.base + start
        job = self._loop.run_in_executor(self._zero_executor, self._zero_fill, self._io, seg, start, end)
        self._zero_job = job

        def done(f: asyncio.Future[None]) -> None:
            self._zero_job = None
            self._zero_from = 1 << 62
            exc = None if f.cancelled() else f.exception()
            if f.cancelled() or exc is not None:
                # only a speed-up: appends still grow the file themselves
                log.warning("storage: zero-filling segment %s failed (%r); appends grow the file", seg.path, exc)
                self._prealloc = False
            else:
                seg.alloc = max(seg.alloc, end)

        job.add_done_callback(done)

    @staticmethod
    def _zero_fill(io: FileIO, seg: Segment, start: int, end: int) -> None:
        at = start
        while at < end:
            n = io.pwrite(seg.fd, _ZEROS[: min(len(_ZEROS), end - at)], at)
            at += n
        io.fdatasync(seg.fd)

    async def _wait_zero_job(self: MessageStore) -> None:
        job = self._zero_job
        if job is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.shield(job)

    def _write_batch(
        self: MessageStore, plan: list, sync: bool, dirty: list[Segment], now_ms: int
    ) -> tuple[list[Segment], list[tuple[Segment, int]], int]:
        """Write a batch's log bytes (creating the segments it starts) and with ``sync``
        fdatasync them and the ``dirty`` segments; its index entries are written apart.
        Returns the new segments, each touched segment with its new size, and the
        nanoseconds the fdatasyncs took (0 without ``sync``)."""
        synced_ns = 0
        new_segs = []
        touched: list[tuple[Segment, int]] = []
        io = self._io
        for seg, base, rel, data in plan:
            if seg is None:
                # the segment before is full: cut its zero-filled tail (durably) before the
                # new one holds data, so that only the last file can ever end in zeros
                prev, prev_end = touched[-1] if touched else (self._log.segments[-1], self._log.segments[-1].size)
                if io.fstat(prev.fd).st_size > prev_end:  # (a failed fill may have grown it too)
                    io.ftruncate(prev.fd, prev_end)
                    io.fsync(prev.fd)
                prev.alloc = prev_end
                if prev.dsync_fd >= 0:  # (no hand-off is in flight: they end before this write)
                    io.close(prev.dsync_fd)
                    prev.dsync_fd = -1
                seg = self._log.open_segment(base, now_ms)
                new_segs.append(seg)
            touched.append((seg, _pwrite_whole(io.pwrite, seg.fd, data, rel)))
        if sync:
            t0 = time.perf_counter_ns()
            for seg, _ in touched:
                io.fdatasync(seg.fd)
            for seg in dirty:
                if all(seg is not s for s, _ in touched):
                    io.fdatasync(seg.fd)
            synced_ns = time.perf_counter_ns() - t0
            self.fsync_seconds.observe(synced_ns / 1e9)
        return new_segs, touched, synced_ns

    def _fail(self: MessageStore, exc: BaseException, *batches: _Batch) -> None:
        """The store is failed: every waiting append gets the error (or StoreClosedError)."""
        if self._failed is None:
            log.error("storage: write failed, store %s is now failed: %r", self.data_dir, exc)
            self._failed = exc
        err = exc if isinstance(exc, Exception) else StoreClosedError("writer cancelled")
        for b in (*batches, *self._sealed, self._batch):
            for f in b.futures:
                if not f.done():
                    f.set_exception(err)
                    f.exception()  # (the error is logged above; an append nobody awaits is no news)
        self._batch = _Batch()
        self._sealed.clear()
        self._singles = None  # (their future was the current batch's)

    async def flush(self: MessageStore) -> None:
        """Write and fsync everything appended so far."""
        if self._closed or self._failed is not None:
            return
        fut = self._batch_future(self._batch)
        self._batch.force_sync = True
        await fut

    async def _timed_fsync(self: MessageStore) -> None:
        """flush="async": fdatasync what was written since the last time, every
        ``flush_interval``, without holding up appends (see :meth:`_sync_written`)."""
        if not self._dirty_segs or self._closed or self._failed is not None:
            return
        try:
            await self._sync_written()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self._fail(exc, _Batch())
            raise

    async def _sync_written(self: MessageStore, final: bool = False, index: bool = False) -> tuple[int, list]:
        """fdatasync the dirty segments (``final``: and the active one; ``index``: and the
        dirty index files); return the log position and queue ends this covers.

        What to sync is taken under the write lock; the fsyncs (maybe many MB) run in a
        thread without it, so appends go on meanwhile (measured with flush="async":
        publish->deliver p99 29-103 ms while the writer waited for them), but never beside
        retention, which closes files. Not in the writer's thread: a big batch must not
        queue behind them.
        """
        async with self._sync_lock:
            async with self._io_lock:
                pos = self._written_end
                queues = [[t, q, qi.end] for (t, q), qi in self._queues.items()] if index else []
                dirty_q = [qi for qi in self._queues.values() if qi.dirty] if index else []
                new_q = [qi for qi in dirty_q if qi.new]
                for qi in dirty_q:  # (a write from here on marks it again)
                    qi.dirty = qi.new = False
                segs = list(self._dirty_segs)
                self._dirty_segs.clear()  # a write from here on marks its segment again
                if final:
                    segs.append(self._log.segments[-1])

            io = self._io

            def _sync() -> None:
                t0 = time.perf_counter_ns()
                for seg in segs:
                    io.fdatasync(seg.fd)
                if segs:
                    self.fsync_seconds.observe((time.perf_counter_ns() - t0) / 1e9)
                for qi in dirty_q:
                    qi.sync_path()
                # a new index file's directory entry (and its topic directory's) must be
                # durable before a checkpoint counts on the file
                for d in {qi.path.parent for qi in new_q}:
                    io.fsync_dir(d)
                if new_q:
                    io.fsync_dir(self._index_root)

            try:
                await self._loop.run_in_executor(None, _sync)
            except BaseException:
                self._dirty_segs.update(segs)
                for qi in dirty_q:
                    qi.dirty = True
                for qi in new_q:
                    qi.new = True
                raise
            self.stats["fsyncs"] += len(segs)
            self._synced_end = max(self._synced_end, pos)
        return pos, queues
