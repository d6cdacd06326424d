"""Retention: whole old segments deleted from the front of the log.

How this works
--------------
Every minute (``RETENTION_INTERVAL``) the store deletes whole segments from the front of
the log whose newest record is older than ``retention`` — never the active one, never one
at or above the broker's guard position (the lowest log position it still needs) — then
moves each queue's ``queue_start`` past the entries pointing into them, drops their
chunks from the recent-record cache and records a checkpoint.

:class:`Retention` is one part of :class:`storage.store.MessageStore` (a mixin).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

from .state import StoreState

if TYPE_CHECKING:
    from .store import MessageStore

__all__ = ["RETENTION_INTERVAL", "Retention"]

log = logging.getLogger("storage.store")

RETENTION_INTERVAL = 60.0


class Retention(StoreState):
    """Retention of :class:`storage.store.MessageStore` (see the module's "How this works")."""

    def set_retention_guard(self: MessageStore, fn: Callable[[], int]) -> None:
        """Register ``fn() -> lowest log position still needed``; retention keeps it and after."""
        self._guard = fn

    async def run_retention(self: MessageStore) -> int:
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
