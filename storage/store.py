"""MessageStore: the log, the queue indexes, group commit, recovery and retention.

How this works
--------------
``append()`` is synchronous: in call order it assigns each record its global position
(rolling to the next segment when a record does not fit), its store time and its queue
offset, and encodes it once, straight into the *current batch*: one list of ``bytes``
parts per segment touched (prefix, head and body of each record, joined once when the
batch is written, and that one ``bytes`` is also what the recent-record cache keeps), the
list of record starts in it, and one ``bytearray`` of packed index entries per queue. A
failing record (too large, unknown ``ref_pos``) rolls the batch back to where the call
started. It returns the ``Stored`` list and a future. One writer task takes the whole
current batch (a fresh one starts collecting) and writes it with one ``pwrite`` per
segment touched, writes the batch's queue-index entries (one ``pwrite`` per queue), and
with ``flush="sync"`` fdatasyncs once. A batch of up to 256 KiB is written on the loop
thread (cheaper than a thread round trip); a bigger one in a worker thread, while the loop
keeps accepting appends. Either way, what arrives during a write goes into the next batch
— so batches grow with load (group commit). Back on the loop the writer publishes the new
end of the log and of each queue (readers never see unwritten data) and resolves the
batch's future — one future, shared by every append into that batch, so a thousand
appends cost one future, not a thousand. With ``flush="async"`` it resolves after the
write and a timer queues an fsync every ``flush_interval``.

Hand-off: with ``flush="sync"`` a batch of more than 256 KiB in the active segment is not
waited for: its index entries are written on the loop, its log bytes go to the writer
thread as one ``pwrite`` on an ``O_DSYNC`` descriptor (written and synced in one syscall),
and the writer takes the next batch at once. Several such batches can be in flight; they
are published strictly in order, and any other batch waits until they are. So the disk
writes one batch while the loop encodes the next (see :meth:`MessageStore._hand_off`).

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
with ``MEMBER_BIT`` set). A member is read by finding its bundle (the member marker holds
the distance back to it) and decoding the bundle once: a small cache keeps recently
decoded bundles, so reading a bundle's members one after another decodes it once.
Recovery rebuilds one index entry per member from the bundle's framing and header.

Recent-record cache: after a batch is written, its per-segment buffers (as immutable
``bytes``, with their record starts) go into a small cache of the last ``cache_bytes`` of
the log. ``read``/``read_queue_records`` of a cached position decode from memory (same CRC
check, same results) instead of ``pread`` — consumers mostly read the tail just written.
Only written bytes enter it; retention drops chunks of deleted segments; it starts empty
at open, after any recovery truncation, so it never holds a truncated record.

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
import bisect
import concurrent.futures
import contextlib
import json
import logging
import math
import os
import struct
import time
from collections import deque
from collections.abc import Callable, Generator, Iterator, Sequence
from functools import lru_cache
from itertools import accumulate, chain, repeat
from operator import add, or_
from pathlib import Path
from typing import Any

import msgpack

from .fileio import REAL, FileIO
from .histogram import BATCH_RECORDS_BUCKETS, FSYNC_SECONDS_BUCKETS, Histogram
from .lock import DataDirLock
from .log import (
    FLAG_BUNDLE,
    FLAG_INDEX,
    MEMBER,
    MEMBER_BIT,
    PREFIX,
    TAIL,
    TAIL_IDX,
    CorruptRecordError,
    IndexTargetInfo,
    Segment,
    SegmentLog,
    bundle_entries,
    crc32,
    decode_index_target,
    member_record,
    read_checked,
)
from .metadata import Metadata
from .model import BundleTarget, IndexEntry, IndexTarget, NewBundle, NewRecord, Record, Stored
from .queue_index import (
    DEFAULT_OPEN_INDEXES,
    ENTRY,
    ESIZE,
    IndexFiles,
    QueueIndexFile,
    scan_index_dir,
)

# fdatasync flushes the data and the metadata needed to read it back (the file size),
# which is all an append needs; it skips timestamps and is markedly cheaper than fsync.
#: Batches up to this size are written (and fdatasynced) on the event loop thread; larger
#: ones are handed to the writer thread.
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

__all__ = ["MessageStore", "StoreClosedError"]

log = logging.getLogger(__name__)

CLEAN_MARKER = "CLEAN"
CHECKPOINT_KEY = "storage.checkpoint"
EPOCH_KEY = "storage.epoch"
SEGMENT_SIZE_KEY = "storage.segment_size"
CHECKPOINT_INTERVAL = 5.0
RETENTION_INTERVAL = 60.0
CACHE_BYTES = 32 << 20
SPAN_MAX = 1 << 22  # read_queue_records: largest single pread covering several entries
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
_BUNDLES_MAX = 64  # decoded bundles kept for reads of their members ...
_BUNDLES_BYTES = 8 << 20  # ... and their total size at most


@lru_cache(maxsize=256)
def _n_structs(n: int) -> tuple[Callable[..., bytes], Callable[..., bytes]]:
    """``pack`` of ``n`` member markers and of ``n`` index entries, each in one call."""
    return struct.Struct("<" + "IIII" * n).pack, struct.Struct("<" + "QIIQ" * n).pack


def _pwrite_all(pwrite: Callable[..., int], writes: list[tuple[int, int, bytes]]) -> int:
    """``pwrite`` each ``(fd, offset, data)`` whole (the writer thread's job, on ``O_DSYNC``
    descriptors: written and synced); return the time it took in ns."""
    t0 = time.perf_counter_ns()
    for fd, at, data in writes:
        _pwrite_whole(pwrite, fd, data, at)
    return time.perf_counter_ns() - t0


def _pwrite_whole(pwrite: Callable[..., int], fd: int, data: bytes, at: int) -> int:
    """``pwrite`` all of ``data`` at ``at`` (looping on short writes); return the end."""
    with memoryview(data) as view:
        while view:
            n = pwrite(fd, view, at)
            view = view[n:]
            at += n
    return at


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


def _retrieve(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


class _Handed:
    """A batch handed to the writer thread: its job and its write plan (see ``_plan``)."""

    __slots__ = ("batch", "job", "plan")

    def __init__(self, batch: _Batch, job: asyncio.Future[None], plan: list) -> None:
        self.batch = batch
        self.job = job
        self.plan = plan


class _Singles:
    """``append_one`` calls collected since the last encode: their records, and once
    encoded into the current batch, one ``Stored`` (or the record's error) each."""

    __slots__ = ("records", "stored", "fut", "batch_fut")

    def __init__(self, fut: asyncio.Future[None], batch_fut: asyncio.Future[None]) -> None:
        self.records: list[NewRecord] = []
        self.stored: list[Any] = []
        self.fut = fut  # a plain future: a task waits on it much faster than on a subclass
        self.batch_fut = batch_fut  # the batch's own, which no waiter can cancel


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
        # loop_disk_wait_ns: time the event loop spent waiting for the disk in writes and
        # fdatasyncs done on it (off the CPU, so the process's CPU time does not show it, and
        # it serves nothing meanwhile)
        # records: messages stored (a bundle counts its members); bundles: bundle records
        # handed_off: batches written and synced by the writer thread while the writer went on
        self.stats = {
            "fsyncs": 0, "writes": 0, "records": 0, "batches": 0, "bundles": 0, "handed_off": 0, "loop_disk_wait_ns": 0
        }
        # how long each batch's fdatasyncs took (one observation per batch or timed sync;
        # an O_DSYNC write handed off counts whole), and how many records each batch held
        self.fsync_seconds = Histogram(FSYNC_SECONDS_BUCKETS)
        self.batch_records = Histogram(BATCH_RECORDS_BUCKETS)
        self._closed = True
        self._failed: BaseException | None = None
        self._guard: Callable[[], int] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._writer_task: asyncio.Task[None] | None = None
        self._wake: asyncio.Future[None] | None = None
        self._queues: dict[tuple[str, int], QueueIndexFile] = {}
        self._io = REAL  # every file operation (see storage.fileio)
        self._files = IndexFiles(DEFAULT_OPEN_INDEXES)  # open index descriptors, bounded
        self._inflight: _Batch | None = None
        self._singles: _Singles | None = None
        self._sealed: deque[_Batch] = deque()  # full batches, before the current one
        self._handed: deque[_Handed] = deque()  # batches handed to the writer thread, oldest first
        self._dirty_segs: set[Segment] = set()
        self._close_lock = asyncio.Lock()
        self._lock: DataDirLock | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._zero_executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._zero_job: asyncio.Future[None] | None = None
        self._zero_from = 1 << 62  # global position where the running zero-fill starts
        self._prealloc = True
        self._last_checkpoint = -1
        # recent-record cache: chunk i covers [_rc_starts[i], _rc_ends[i]) with bytes and record starts
        self._rc_starts: list[int] = []
        self._rc_ends: list[int] = []
        self._rc_chunks: list[tuple[bytes, list[int]]] = []
        self._rc_head = 0
        self._rc_bytes = 0
        self._rc_lo = 1 << 62  # lowest cached position
        self._rc_limit = CACHE_BYTES
        self._topic_bytes: dict[str, bytes] = {}
        # IndexTarget without ref_pos -> (target, queue file, topic bytes, tag, ref_pos,
        # ref_size, queue_id, topic length): what append() needs of it
        self._targets: dict[IndexTarget, tuple] = {}
        self._packb = msgpack.Packer(use_bin_type=True).pack
        self._bundles: dict[int, Record] = {}  # recently decoded bundles by position
        self._bundles_bytes = 0

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
        cache_bytes: int = CACHE_BYTES,
        max_open_indexes: int = DEFAULT_OPEN_INDEXES,
        fileio: FileIO | None = None,
    ) -> _Opener:
        """Open (creating, locking and recovering) the store in ``data_dir``.

        Use ``store = await MessageStore.open(...)`` or ``async with MessageStore.open(...) as s``.
        Raises :class:`DataDirLockedError` if another store holds the directory. The segment
        size of an existing store is kept (positions depend on it); ``segment_size`` applies
        to new stores only. ``cache_bytes`` (default 32 MiB, 0 disables) bounds the in-memory
        cache of recently written records that serves reads of the log tail.
        ``max_open_indexes`` bounds the index files held open at once (whatever the number
        of queues); it is lowered to a quarter of the descriptor limit if that is smaller.
        ``fileio`` replaces the real file operations (tests: see :mod:`storage.fileio`).
        """
        if flush not in ("sync", "async"):
            raise ValueError("flush must be 'sync' or 'async'")
        if segment_size < 1024:
            raise ValueError("segment_size must be at least 1024")
        if max_open_indexes < 1:
            raise ValueError("max_open_indexes must be at least 1")

        async def _do() -> MessageStore:
            store = cls()
            store._rc_limit = max(0, int(cache_bytes))
            store._io = fileio or REAL
            store._files = IndexFiles(fit_open_indexes(max_open_indexes), store._io)
            await store._open(Path(data_dir), segment_size, flush, flush_interval, retention, clock)
            return store

        return _Opener(_do)

    async def _open(
        self, data_dir: Path, segment_size: int, flush: str, flush_interval: float, retention: float,
        clock: Callable[[], float],
    ) -> None:
        self.data_dir = data_dir
        self._sync = flush == "sync"
        # Zero-filling ahead pays for flush="sync" (an fdatasync per batch); with "async" it
        # only doubles the bytes written (measured in-process, three runs each, 1 KiB
        # messages, async: append_batch of bundles 574-595k -> 773-799k msgs/s, of records
        # 250-261k -> 329-374k, single appends 190-195k -> 226-276k).
        self._prealloc = self._sync
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
            self._log = SegmentLog(data_dir / "log", self.segment_size, self._io)
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
        self._zero_executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="halfmq-prealloc")
        self._written_end = self._synced_end = self._log.end
        self._next_pos = self._log.end
        self._seg_limit = self._log.segments[-1].base + self.segment_size
        self._batch = _Batch()
        self._io_lock = asyncio.Lock()  # the writer's batches, retention, a checkpoint's snapshot
        self._sync_lock = asyncio.Lock()  # a checkpoint's fsyncs, retention
        self._writer_task = asyncio.create_task(self._writer(), name="halfmq-log-writer")
        self._tasks.append(asyncio.create_task(self._periodic(CHECKPOINT_INTERVAL, self._checkpoint)))
        self._tasks.append(asyncio.create_task(self._periodic(RETENTION_INTERVAL, self.run_retention)))
        if not self._sync:
            self._tasks.append(asyncio.create_task(self._periodic(flush_interval, self._timed_fsync)))

    def _load_and_recover(self, checkpoint: dict | None) -> None:
        io = self._io
        marker_path = self.data_dir / CLEAN_MARKER
        marker = None
        if io.exists(marker_path):
            with contextlib.suppress(ValueError, OSError):
                fd = io.open(marker_path, os.O_RDONLY)
                try:
                    marker = json.loads(io.pread(fd, 4096, 0))
                finally:
                    io.close(fd)
            io.unlink(marker_path)
            io.fsync_dir(self.data_dir)
        self._log.load()
        # the log and index directories' own entries must be durable before anything in
        # them counts (a power cut may otherwise take the whole directory away)
        io.makedirs(self._index_root)
        io.fsync_dir(self.data_dir)
        if not self._log.segments:
            self._log.register(self._log.open_segment(0, int(self._clock() * 1000)))
        for topic, qid, _path in scan_index_dir(self._index_root, io):
            self._queues[(topic, qid)] = QueueIndexFile.open(self._index_root, topic, qid, self._files)
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
            if tgt is None:
                continue
            if buf[off + 9] & FLAG_BUNDLE:
                # one entry per member, at consecutive offsets from the bundle's first
                bundle = read_checked(bytes(buf[off : off + _length]), 0, _length, _length, pos, 1 << 62, -1, False)
                for k, (vpos, vsize, vtag) in enumerate(bundle_entries(bundle)):
                    t = IndexTargetInfo(tgt.topic, tgt.queue_id, vtag, -1, 0, tgt.queue_offset + k)
                    scanned.append((vpos, vsize, (t, store_time)))
            else:
                scanned.append((pos, _length, (tgt, store_time)))
        end = lg.scan_end
        if end < lg.end:
            if lg.zeros_from(end):
                log.info("storage: log ends at %d, before a zero-filled tail; cutting the tail", end)
            else:
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
                q = self._queues[key] = QueueIndexFile.open(self._index_root, *key, self._files)
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
            await self._wait_zero_job()
            try:
                if self._failed is None:
                    self._batch.force_sync = True
                    await self._checkpoint(final=True)
                    await asyncio.to_thread(self._trim_active)
                    await asyncio.to_thread(self._write_marker)
            finally:
                self._executor.shutdown(wait=True)
                self._zero_executor.shutdown(wait=True)
                await self.metadata.close()
                self._release_files()
                self._lock.release()

    def _trim_active(self) -> None:
        """Cut the zero-filled tail off the active segment (a clean log ends at its data)."""
        seg = self._log.segments[-1]
        io = self._io
        if io.fstat(seg.fd).st_size > seg.size:  # (a failed fill may have grown it too)
            io.ftruncate(seg.fd, seg.size)
            io.fsync(seg.fd)
        seg.alloc = seg.size

    def _write_marker(self) -> None:
        io = self._io
        path = self.data_dir / CLEAN_MARKER
        tmp = path.with_suffix(".tmp")
        fd = io.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            io.pwrite(fd, json.dumps({"end": self._written_end, "epoch": self.epoch}).encode(), 0)
            io.fsync(fd)
        finally:
            io.close(fd)
        io.replace(tmp, path)
        io.fsync_dir(self.data_dir)

    def _release_files(self) -> None:
        if hasattr(self, "_log"):
            self._log.close()
        self._files.close_all()
        self._queues.clear()

    # ------------------------------------------------------------------ appends
    def append(self, records: Sequence[NewRecord | NewBundle]) -> tuple[list[Stored], asyncio.Future[None]]:
        """Assign positions/store time/queue offsets now; return them and a durability future.

        The future resolves once the records are fsynced (``flush="sync"``) or written
        (``"async"``); it fails with the write error if the disk write fails. Raises
        :class:`StoreClosedError` if closed/failed, ``ValueError`` for a record larger than a
        segment, ``KeyError`` for an unknown ``ref_pos`` (which must come from an earlier call).
        """
        if self._closed or self._failed is not None:
            raise StoreClosedError(f"store {self.data_dir} is {'failed' if self._failed else 'closed'}")
        if self._singles is not None:
            self._encode_singles()
        return self._encode(records)

    def _encode(self, records: Sequence[NewRecord | NewBundle]) -> tuple[list[Stored], asyncio.Future[None]]:
        """:meth:`append` without its checks: encode ``records`` into the current batch."""
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
                        rtype, header, body, idx, now, pos, limit, parts, starts, local, out)
                    continue
                hdr = packb(header)
                if idx is None:
                    head = tail_pack(rtype, 0, now, len(hdr)) + hdr
                    qoff = -1
                    q = None
                else:
                    t = targets.get(idx)
                    if t is None:
                        t = self._target(idx)
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
                parts += (prefix_pack(size, crc32(body, crc32(head))), head, body)
                starts.append(pos)
                if q is not None:
                    lq[1] += entry_pack(pos, size, tag, now) if ref_pos < 0 else entry_pack(ref_pos, ref_size, tag, now)
                    lq[0] += 1
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
        fut = futs[0] if futs else self._batch_future(batch)
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
        self, rtype: int, headers: list, bodies: list[bytes], idx: BundleTarget, now: int, pos: int,
        limit: int, parts: list[bytes] | None, starts: list[int] | None, local: dict, out: list[Stored],
    ) -> tuple[int, int, list[bytes], list[int]]:
        """Encode one :class:`NewBundle` into the current batch (part of :meth:`append`)."""
        n = len(bodies)
        tags = idx.tag_hashes
        if not n or len(headers) != n or len(tags) != n:
            raise ValueError("a bundle needs as many headers and tag hashes as bodies (at least one)")
        key = IndexTarget(idx.topic, idx.queue_id)
        t = self._targets.get(key)
        if t is None:
            t = self._target(key)
        q = t[1]
        lq = local.get(q)
        if lq is None:
            lq = local[q] = [0, bytearray()]
        qoff = q.next_offset + lq[0]
        hdr = self._packb([headers, tags])
        head = _tail_idx_pack(rtype, FLAG_INDEX | FLAG_BUNDLE, now, len(hdr), t[6], 0, -1, n, qoff, t[7]) + t[2] + hdr
        lens = list(map(len, bodies))
        table = 8 + len(head)  # the marker table, then the bodies (see storage.log)
        first_body = table + (n << 4)
        size = first_body + sum(lens)
        seg_size = self.segment_size
        if size > seg_size:
            raise ValueError(f"bundle of {size} bytes exceeds segment size {seg_size}")
        if pos + size > limit:
            pos = limit
            limit += seg_size
            parts = None
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
        if parts is None:
            parts = []
            starts = []
            self._batch.groups.append([pos, parts, starts])
        pieces = [markers]
        pieces += bodies
        data = b"".join(pieces)
        parts += (_prefix_pack(size, _crc32(data, _crc32(head))), head, data)
        starts.append(pos)  # type: ignore[union-attr]
        out += map(_make_stored, repeat(Stored, n), zip(vps, sizes, repeat(now, n), range(qoff, qoff + n), strict=True))
        lq[1] += e
        lq[0] += n
        self.stats["bundles"] += 1
        return pos + size, limit, parts, starts  # type: ignore[return-value]

    async def append_one(self, record: NewRecord) -> Stored:
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

    def _seal(self) -> None:
        """Close the current batch (with the queued ``append_one`` records) for the writer;
        later appends go to a new one."""
        if self._singles is not None:
            self._encode_singles()
        if self._batch.futures:
            self._sealed.append(self._batch)
            self._batch = _Batch()

    def _encode_singles(self) -> None:
        """Encode the pending ``append_one`` records into the current batch, all at once;
        if one is bad, one at a time, so that only the bad one fails."""
        g = self._singles
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

    async def append_batch(self, records: Sequence[NewRecord | NewBundle]) -> list[Stored]:
        """Append records (one write, one fsync) and wait until they are durable."""
        stored, fut = self.append(records)
        await fut
        return stored

    def _target(self, idx: IndexTarget) -> tuple:
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

    def _ref_size(self, ref_pos: int) -> int:
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

    def _batch_future(self, batch: _Batch) -> asyncio.Future[None]:
        """The one future every append into ``batch`` shares (created by the first)."""
        if batch.futures:
            return batch.futures[0]
        self._wake_writer()
        fut = _BatchFuture(loop=self._loop)
        batch.futures.append(fut)
        return fut

    def _wake_writer(self) -> None:
        w = self._wake
        if w is not None and not w.done():
            w.set_result(None)

    async def _writer(self) -> None:
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

    def _next_batch(self) -> _Batch | None:
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

    def _plan(self, batch: _Batch) -> list[tuple[Segment | None, int, int, bytes]]:
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

    async def _hand_off(self, batch: _Batch, plan: list) -> None:
        """flush="sync", a big batch in the active segment: write its index entries here
        and hand its log bytes to the writer thread as one ``pwrite`` on an ``O_DSYNC`` file
        descriptor (written and synced in one syscall), without waiting for it.

        Why: with the GIL, a thread that comes back from a syscall waits for the loop to let
        go of the GIL, so a job of several syscalls (write, fdatasync) runs in steps between
        the loop's bursts of work, while the loop waits for the whole job. One syscall per
        job, and the next job queued before the previous one ends, let the disk work while
        the loop encodes the next batch (1,024 appenders of 1 KiB, ~512 KiB batches:
        in-process 256k/s waiting for each batch, 300-318k/s handed off).
        """
        async with self._io_lock:
            if batch.end > self._zero_from:  # the batch reaches the zero-fill running
                await self._wait_zero_job()
            seg = plan[0][0]
            try:
                if seg.dsync_fd < 0:
                    seg.dsync_fd = self._io.open(seg.path, os.O_WRONLY | getattr(os, "O_DSYNC", os.O_SYNC))
                _write_index(batch.qentries)
            except BaseException as exc:
                self._fail(exc, batch)
                raise
            writes = [(seg.dsync_fd, rel, data) for _, _, rel, data in plan]
            job = self._loop.run_in_executor(self._executor, _pwrite_all, self._io.pwrite, writes)
            self.stats["handed_off"] += 1
            self._handed.append(_Handed(batch, job, plan))

    def _finish_handed(self) -> None:
        """Publish the oldest handed-off batch, whose job is done (raises its error)."""
        h = self._handed[0]
        self.fsync_seconds.observe(h.job.result() / 1e9)
        touched = [(seg, rel + len(data)) for seg, _, rel, data in h.plan]
        self._publish(h.batch, touched, [data for *_, data in h.plan], True, len(touched), len(touched))
        self._handed.popleft()  # (only now: if anything above raised, the writer fails it)

    async def _write(self, batch: _Batch, plan: list, nbytes: int) -> None:
        """Write (and with flush="sync" or ``force_sync``, fdatasync) ``batch`` and publish it."""
        loop = self._loop
        async with self._io_lock:
            if batch.end > self._zero_from:  # the batch reaches the zero-fill running
                await self._wait_zero_job()
            self._inflight = batch
            sync = self._sync or batch.force_sync
            dirty = list(self._dirty_segs) if batch.force_sync else []
            try:
                if nbytes <= _INLINE_BYTES:
                    # write (and fdatasync) right here. A round trip to a thread costs
                    # two thread wake-ups (measured here: p50 0.19 ms, p99 1.1 ms for a
                    # no-op) plus a wait for the GIL while the loop runs, about as much
                    # as the fdatasync itself; while the loop waits for the disk, the
                    # next sends pile up in the socket buffers and make the next batch
                    # (group commit still happens). Measured on the side-by-side
                    # benchmark, halfmq sync, against handing off every batch of more
                    # than 4 records: publish 47,373 -> 55,648 msgs/s, one-at-a-time
                    # p50 0.727 -> 0.651 ms, e2e 17,096 -> 24,786, tx 10,109 -> 13,812.
                    # Only big batches go to the thread, so the loop keeps serving.
                    t0, c0 = time.perf_counter_ns(), time.thread_time_ns()
                    _write_index(batch.qentries)
                    new_segs, touched = self._write_batch(plan, sync, dirty, batch.newest_ms)
                    self.stats["loop_disk_wait_ns"] += time.perf_counter_ns() - t0 - (time.thread_time_ns() - c0)
                else:
                    # the log bytes in the writer thread; meanwhile the index entries here
                    # (index descriptors are the loop's: see storage.queue_index)
                    job = loop.run_in_executor(self._executor, self._write_batch, plan, sync, dirty, batch.newest_ms)
                    try:
                        _write_index(batch.qentries)
                    except BaseException:
                        job.add_done_callback(_retrieve)
                        raise
                    new_segs, touched = await job
                for seg in new_segs:
                    self._log.register(seg)
                self._publish(batch, touched, [data for *_, data in plan], sync, len(plan), len(touched) + len(dirty))
            except BaseException as exc:
                self._fail(exc, batch)
                raise
            finally:
                self._inflight = None
        if self._prealloc and nbytes <= _INLINE_BYTES:
            self._maybe_zero_fill()

    def _publish(self, batch: _Batch, touched: list, datas: list[bytes], sync: bool, writes: int, fsyncs: int) -> None:
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

    def _maybe_zero_fill(self) -> None:
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

    async def _wait_zero_job(self) -> None:
        job = self._zero_job
        if job is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.shield(job)

    def _write_batch(
        self, plan: list, sync: bool, dirty: list[Segment], now_ms: int
    ) -> tuple[list[Segment], list[tuple[Segment, int]]]:
        """Write a batch's log bytes (creating the segments it starts) and with ``sync``
        fdatasync them and the ``dirty`` segments; its index entries are written apart."""
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
            self.fsync_seconds.observe((time.perf_counter_ns() - t0) / 1e9)
        return new_segs, touched

    def _fail(self, exc: BaseException, *batches: _Batch) -> None:
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

    async def flush(self) -> None:
        """Write and fsync everything appended so far."""
        if self._closed or self._failed is not None:
            return
        fut = self._batch_future(self._batch)
        self._batch.force_sync = True
        await fut

    async def _timed_fsync(self) -> None:
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

    async def _sync_written(self, final: bool = False, index: bool = False) -> tuple[int, list]:
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
        # (the index files can take tens of ms to sync after 5 s of writes)
        pos, queues = await self._sync_written(final=final, index=True)
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

    def _marker(self, pos: int) -> bytes | None:
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

    def _bundle_of(self, pos: int) -> Record:
        """The decoded bundle holding the member at ``pos`` (KeyError: not a written position)."""
        if pos >= self._written_end:
            raise KeyError(pos)
        marker = self._marker(pos)
        if marker is None:
            raise CorruptRecordError(f"position {pos} is not a bundle member")
        return self._bundle_at(pos, marker)

    def _bundle_at(self, pos: int, marker: bytes) -> Record:
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

    def iter_log(self, from_pos: int = 0) -> Iterator[Record]:
        """Written records from ``from_pos`` (a record start, or before the first segment) in order."""
        return self._log.iter_records(from_pos, self._written_end)

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
                out.append((first + i, member_record(bundle, pos)))  # type: ignore[arg-type]
                i += 1
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

    # ------------------------------------------------------------------ recent-record cache
    def _cache_add(self, groups: list[list[Any]], datas: list[bytes]) -> None:
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

    def _cache_set_head(self, head: int) -> None:
        if head > 256 and head * 2 > len(self._rc_starts):
            del self._rc_starts[:head]
            del self._rc_ends[:head]
            del self._rc_chunks[:head]
            head = 0
        self._rc_head = head
        self._rc_lo = self._rc_starts[head] if head < len(self._rc_starts) else 1 << 62

    def _cache_drop_below(self, pos: int) -> None:
        """Forget cached chunks that start below ``pos`` (their segment was deleted)."""
        head = self._rc_head
        while head < len(self._rc_starts) and self._rc_starts[head] < pos:
            self._rc_bytes -= len(self._rc_chunks[head][0])
            self._rc_chunks[head] = None  # type: ignore[call-overload]
            head += 1
        self._cache_set_head(head)

    def _cache_chunk(self, pos: int) -> tuple | None:
        """The cache chunk holding ``pos``: ``(lo, hi, data, record starts, segment base,
        segment end, next segment base)``, or None if ``pos`` is not cached."""
        k = bisect.bisect_right(self._rc_starts, pos, self._rc_head) - 1
        if k < self._rc_head or pos >= self._rc_ends[k]:
            return None
        data, starts = self._rc_chunks[k]
        lg = self._log
        seg = lg.find(pos)
        return (self._rc_starts[k], self._rc_ends[k], data, starts, seg.base, seg.base + seg.size, lg.next_base(seg))

    def _cached_record(self, chunk: tuple, pos: int) -> Record:
        """Decode the record at ``pos`` from ``chunk`` (bytes this process wrote: no CRC check)."""
        lo, _hi, data, starts, base, seg_end, next_base = chunk
        j = bisect.bisect_left(starts, pos)
        off = pos - lo
        if j == len(starts) or starts[j] != pos:
            if data[off : off + 4] == b"\0\0\0\0":  # a bundle member
                return member_record(self._bundle_at(pos, data[off : off + MEMBER.size]), pos)
            raise CorruptRecordError(f"position {pos} is not a record start")
        return read_checked(data, off, len(data) - off, self.segment_size - (pos - base), pos, seg_end, next_base, False)

    def _cache_read(self, pos: int) -> Record | None:
        """The cached record at ``pos``, or None if ``pos`` is not in the cache."""
        chunk = self._cache_chunk(pos)
        return None if chunk is None else self._cached_record(chunk, pos)

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
        async with self._sync_lock, self._io_lock:
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
                    seg.close()
                    self._io.unlink(seg.path)
                self._io.fsync_dir(lg.dir)
                self._cache_drop_below(first)
                self._bundles.clear()
                self._bundles_bytes = 0
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


def _write_index(qentries: dict[QueueIndexFile, list[Any]]) -> None:
    """Write a batch's packed index entries, one ``pwrite`` per queue (event loop)."""
    for q, (first, entries) in qentries.items():
        q.write_entries(first, entries)


def fit_open_indexes(wanted: int) -> int:
    """``wanted``, or a quarter of the process's descriptor limit if that is smaller (the
    rest is for log segments, metadata and sockets)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on POSIX
        return wanted
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    inf = resource.RLIM_INFINITY
    room = inf if inf in (soft, hard) else max(soft, hard)
    if room == inf or wanted <= room // 4:
        return wanted
    fit = max(8, room // 4)
    log.warning("storage: max_open_indexes %d lowered to %d, a quarter of the descriptor limit %d",
                wanted, fit, room)
    return fit


def _consecutive(items: list[tuple[int, bytes]]) -> bool:
    return all(items[k][0] == items[0][0] + k for k in range(len(items)))
