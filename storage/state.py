"""The attributes of :class:`storage.store.MessageStore`, declared once for all its parts.

How this works
--------------
``MessageStore`` is assembled from one mixin per concern (appending, writer, hand-off,
cache, recovery, retention). Each mixin reads and sets the store's attributes; declaring
them here, in a base class every mixin shares, gives each attribute one type that every
part is checked against. Declarations only: nothing here exists at run time beyond the
class itself, and ``MessageStore.__init__``/``open`` set the values.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .appending import _Batch, _Singles
    from .fileio import FileIO
    from .handoff import _Handed
    from .histogram import Histogram
    from .lock import DataDirLock
    from .log import Segment, SegmentLog
    from .metadata import Metadata
    from .model import IndexTarget, Record
    from .queue_index import IndexFiles, QueueIndexFile

__all__ = ["StoreState"]


class StoreState:
    """Types of the store's attributes (see the module docstring)."""

    epoch: int
    metadata: Metadata
    stats: dict[str, int]
    fsync_seconds: Histogram
    batch_records: Histogram
    data_dir: Path
    segment_size: int
    recovered_clean: bool
    recovered_refs_tail: list[int]
    _sync: bool
    _flush_interval: float
    _retention: float
    _clock: Callable[[], float]
    _loop: asyncio.AbstractEventLoop
    _log: SegmentLog
    _index_root: Path
    _io: FileIO
    _files: IndexFiles
    _queues: dict[tuple[str, int], QueueIndexFile]
    _closed: bool
    _failed: BaseException | None
    _guard: Callable[[], int] | None
    _tasks: list[asyncio.Task[None]]
    _writer_task: asyncio.Task[None] | None
    _wake: asyncio.Future[None] | None
    _batch: _Batch
    _inflight: _Batch | None
    _singles: _Singles | None
    _sealed: deque[_Batch]
    _handed: deque[_Handed]
    _dirty_segs: set[Segment]
    _close_lock: asyncio.Lock
    _io_lock: asyncio.Lock
    _sync_lock: asyncio.Lock
    _lock: DataDirLock | None
    _executor: concurrent.futures.ThreadPoolExecutor | None
    _zero_executor: concurrent.futures.ThreadPoolExecutor | None
    _zero_job: asyncio.Future[None] | None
    _zero_from: int
    _prealloc: bool
    _last_checkpoint: int
    _written_end: int
    _synced_end: int
    _next_pos: int
    _seg_limit: int
    # the recent-record cache (see storage.cache)
    _rc_starts: list[int]
    _rc_ends: list[int]
    _rc_chunks: list[tuple[bytes, list[int]]]
    _rc_head: int
    _rc_bytes: int
    _rc_lo: int
    _rc_limit: int
    _topic_bytes: dict[str, bytes]
    _targets: dict[IndexTarget, tuple[Any, ...]]
    _packb: Callable[[Any], bytes]
    _bundles: dict[int, Record]
    _bundles_bytes: int
