"""Hand-off: big synced batches go to the writer thread without being waited for.

How this works
--------------
With ``flush="sync"`` a batch of more than 256 KiB in the active segment is not waited
for: its index entries are written on the loop, its log bytes go to the writer thread as
one ``pwrite`` on an ``O_DSYNC`` descriptor (written and synced in one syscall), and the
writer takes the next batch at once. Several such batches can be in flight; they are
published strictly in order, and any other batch waits until they are. So the disk writes
one batch while the loop encodes the next (see :meth:`HandOff._hand_off`).

:class:`HandOff` is one part of :class:`storage.store.MessageStore` (a mixin).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from .appending import _Batch
from .state import StoreState
from .writer import _pwrite_whole, _write_index

if TYPE_CHECKING:
    from .store import MessageStore

__all__ = ["HandOff"]


def _pwrite_all(pwrite: Callable[..., int], writes: list[tuple[int, int, bytes]]) -> int:
    """``pwrite`` each ``(fd, offset, data)`` whole (the writer thread's job, on ``O_DSYNC``
    descriptors: written and synced); return the time it took in ns."""
    t0 = time.perf_counter_ns()
    for fd, at, data in writes:
        _pwrite_whole(pwrite, fd, data, at)
    return time.perf_counter_ns() - t0


class _Handed:
    """A batch handed to the writer thread: its job and its write plan (see ``_plan``)."""

    __slots__ = ("batch", "job", "plan")

    def __init__(self, batch: _Batch, job: asyncio.Future[int], plan: list) -> None:
        self.batch = batch
        self.job = job
        self.plan = plan



class HandOff(StoreState):
    """The hand-off of :class:`storage.store.MessageStore` (see the module's "How this works")."""

    async def _hand_off(self: MessageStore, batch: _Batch, plan: list) -> None:
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

    def _finish_handed(self: MessageStore) -> None:
        """Publish the oldest handed-off batch, whose job is done (raises its error)."""
        h = self._handed[0]
        self.fsync_seconds.observe(h.job.result() / 1e9)
        touched = [(seg, rel + len(data)) for seg, _, rel, data in h.plan]
        self._publish(h.batch, touched, [data for *_, data in h.plan], True, len(touched), len(touched))
        self._handed.popleft()  # (only now: if anything above raised, the writer fails it)
