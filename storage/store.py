"""MessageStore: the log, the queue indexes, group commit, recovery and retention.

How this works
--------------
A :class:`MessageStore` owns a data directory: log segments (:mod:`storage.log`), one
index file per queue (:mod:`storage.queue_index`, opened through a bounded cache of
descriptors) and metadata (:mod:`storage.metadata`); every file operation goes through a
:class:`storage.fileio.FileIO`. Its parts, each with its own "how this works":

- :mod:`storage.appending` — ``append``/``append_one``/``append_batch``: records encoded
  into the current batch in call order, bundles;
- :mod:`storage.writer` — the writer task and group commit, zero-filling ahead, failure;
- :mod:`storage.handoff` — big synced batches handed to the writer thread unwaited;
- :mod:`storage.cache` — reads, the recent-record cache and decoded bundles;
- :mod:`storage.recovery` — checkpoints, the clean marker and the scan at open;
- :mod:`storage.retention` — deleting old segments.

This module opens and closes the store and holds the state those parts share.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

import msgpack

from .appending import Appending, StoreClosedError, _Batch
from .cache import CACHE_BYTES as CACHE_BYTES
from .cache import Reads
from .fileio import REAL, FileIO
from .handoff import HandOff
from .histogram import BATCH_RECORDS_BUCKETS, FSYNC_SECONDS_BUCKETS, Histogram
from .lock import DataDirLock
from .log import SegmentLog
from .metadata import Metadata
from .queue_index import DEFAULT_OPEN_INDEXES, IndexFiles
from .recovery import CHECKPOINT_KEY as CHECKPOINT_KEY
from .recovery import CLEAN_MARKER as CLEAN_MARKER
from .recovery import EPOCH_KEY, SEGMENT_SIZE_KEY, Recovery
from .retention import RETENTION_INTERVAL, Retention
from .writer import Writer

__all__ = ["MessageStore", "StoreClosedError"]

log = logging.getLogger(__name__)

CHECKPOINT_INTERVAL = 5.0


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


class MessageStore(Appending, Writer, HandOff, Reads, Recovery, Retention):
    """A durable segmented log with per-queue indexes. Create with :meth:`open`."""

    def __init__(self) -> None:  # use MessageStore.open()
        # loop_disk_wait_ns: time the event loop spent in the fdatasyncs done on it, waiting
        # for the disk (off the CPU, so the process's CPU time does not show it, and it
        # serves nothing meanwhile; its writes go to the page cache and are not counted)
        # records: messages stored (a bundle counts its members); bundles: bundle records
        # handed_off: batches written and synced by the writer thread while the writer went on
        self.stats = {
            "fsyncs": 0, "writes": 0, "records": 0, "batches": 0, "bundles": 0, "ref_records": 0, "handed_off": 0, "loop_disk_wait_ns": 0
        }
        # how long each batch's fdatasyncs took (one observation per batch or timed sync;
        # an O_DSYNC write handed off counts whole), and how many records each batch held
        self.fsync_seconds = Histogram(FSYNC_SECONDS_BUCKETS)
        self.batch_records = Histogram(BATCH_RECORDS_BUCKETS)
        self._closed = True
        self._failed = None
        self._guard = None
        self._tasks = []
        self._writer_task = None
        self._wake = None
        self._queues = {}
        self._io = REAL  # every file operation (see storage.fileio)
        self._files = IndexFiles(DEFAULT_OPEN_INDEXES)  # open index descriptors, bounded
        self._inflight = None
        self._singles = None
        self._sealed = deque()  # full batches, before the current one
        self._handed = deque()  # batches handed to the writer thread, oldest first
        self._dirty_segs = set()
        self._close_lock = asyncio.Lock()
        self._lock = None
        self._executor = None
        self._zero_executor = None
        self._zero_job = None
        self._zero_from = 1 << 62  # global position where the running zero-fill starts
        self._prealloc = True
        self._last_checkpoint = -1
        # recent-record cache: chunk i covers [_rc_starts[i], _rc_ends[i]) with bytes and record starts
        self._rc_starts = []
        self._rc_ends = []
        self._rc_chunks = []
        self._rc_head = 0
        self._rc_bytes = 0
        self._rc_lo = 1 << 62  # lowest cached position
        self._rc_limit = CACHE_BYTES
        self._topic_bytes = {}
        # IndexTarget without ref_pos -> (target, queue file, topic bytes, tag, ref_pos,
        # ref_size, queue_id, topic length): what append() needs of it
        self._targets = {}
        self._packb = msgpack.Packer(use_bin_type=True).pack
        self._bundles = {}  # recently decoded bundles by position
        self._bundles_bytes = 0

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
                assert self._executor is not None and self._zero_executor is not None
                assert self._lock is not None  # (all set by a successful open)
                self._executor.shutdown(wait=True)
                self._zero_executor.shutdown(wait=True)
                await self.metadata.close()
                self._release_files()
                self._lock.release()

    def _release_files(self) -> None:
        if hasattr(self, "_log"):
            self._log.close()
        self._files.close_all()
        self._queues.clear()

    async def _periodic(self, interval: float, fn: Callable[[], Any]) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await fn()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("storage: periodic task %s failed", getattr(fn, "__name__", fn))


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
