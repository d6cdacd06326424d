"""``ListenerThreads``: the worker threads that run a listener's plain ``def`` methods.

How this works
--------------
``run(fn, *args)`` (on the event loop) returns a future and puts the call, with a copy of
the caller's context (so ``contextvars`` set by the caller are visible to the listener, as
with ``asyncio.to_thread``), on a ``queue.SimpleQueue``. Up to ``size`` threads, started as
calls need them, take calls from it and run them. A finished call's result (or exception)
is appended to a deque, and only the thread that finds no hand-back already pending wakes
the event loop (``call_soon_threadsafe``): the loop then resolves the futures of every call
that finished meanwhile in one go. Under load that is one loop wake-up (one self-pipe
write, one callback) for many results instead of one each, which is what
``asyncio.to_thread`` costs per call (executor work item, a concurrent future chained to an
asyncio one, a wake-up per result).

The hand-back without a lock: a worker appends its result and then reads ``_wake_pending``;
the loop's ``_hand_back`` clears the flag before it empties the deque. A worker that reads
True appended before a hand-back that has not cleared the flag yet, and that hand-back will
find the result; one that reads False schedules another (at worst one that finds nothing).

A call whose future was cancelled before a thread took it is not run. ``close()`` lets the
calls already queued run and then ends the threads (one ``None`` each
on the queue; each thread tells the loop when it ends). The threads are daemon threads, so
a listener that never returns cannot keep the interpreter from exiting; ``wait_closed``
waits for them up to a timeout.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import os
import queue
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["ListenerThreads", "DEFAULT_LISTENER_THREADS"]

#: Default threads for plain ``def`` local transactions: asyncio's default executor's size.
DEFAULT_LISTENER_THREADS = min(32, (os.cpu_count() or 1) + 4)


class ListenerThreads:
    """Runs plain ``def`` calls in up to ``size`` threads named ``name-N``; results come
    back to ``loop`` in batches (see the module docstring)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, size: int, name: str) -> None:
        if size < 1:
            raise ValueError("a ListenerThreads needs at least one thread")
        self._loop = loop
        self._size = size
        self._name = name
        self._calls: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self._done: collections.deque[tuple[asyncio.Future[Any], Any, BaseException | None]] = collections.deque()
        self._wake_pending = False
        self._threads: list[threading.Thread] = []
        #: calls handed to the threads and not yet handed back (read and written on the loop only)
        self._outstanding = 0
        self._closed = False
        self._running = 0  # threads started and not yet ended (loop only)
        self._all_ended: asyncio.Future[None] | None = None

    @property
    def threads(self) -> int:
        """How many threads were started (at most ``size``)."""
        return len(self._threads)

    def run(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        """Call ``fn(*args)`` in a worker thread, in a copy of the current context; the
        future gets its return value or exception. Raises ``RuntimeError`` once closed."""
        if self._closed:
            raise RuntimeError("the listener threads are closed")
        fut = self._loop.create_future()
        self._calls.put((fut, contextvars.copy_context(), fn, args))
        self._outstanding += 1
        started = len(self._threads)
        if self._outstanding > started and started < self._size:  # every thread is busy
            thread = threading.Thread(target=self._work, name=f"{self._name}-{started}", daemon=True)
            self._threads.append(thread)
            self._running += 1
            thread.start()
        return fut

    def _work(self) -> None:
        get = self._calls.get
        done = self._done
        while True:
            call = get()
            if call is None:
                try:
                    self._loop.call_soon_threadsafe(self._thread_ended)
                except RuntimeError:  # the loop is closed
                    pass
                return
            fut, ctx, fn, args = call
            if fut.done():  # cancelled by its caller before it started: not run
                done.append((fut, None, None))
            else:
                try:
                    done.append((fut, ctx.run(fn, *args), None))
                except BaseException as exc:  # noqa: BLE001 - handed to the caller, as an executor does
                    done.append((fut, None, exc))
            del call, fut, ctx, fn, args
            if not self._wake_pending:
                self._wake_pending = True
                try:
                    self._loop.call_soon_threadsafe(self._hand_back)
                except RuntimeError:  # the loop is closed: nobody waits any more
                    self._wake_pending = False

    def _hand_back(self) -> None:
        """On the loop: resolve the futures of every call finished so far."""
        self._wake_pending = False
        done = self._done
        while done:
            fut, result, exc = done.popleft()
            self._outstanding -= 1
            if fut.done():  # cancelled by its caller
                continue
            if exc is None:
                fut.set_result(result)
            elif isinstance(exc, StopIteration):  # a future cannot hold one
                fut.set_exception(RuntimeError(f"the listener raised {exc!r}"))
            else:
                fut.set_exception(exc)

    def _thread_ended(self) -> None:
        self._running -= 1
        if not self._running and self._all_ended is not None and not self._all_ended.done():
            self._all_ended.set_result(None)

    def close(self) -> None:
        """Let the queued calls run, then end the threads (idempotent; does not wait)."""
        if self._closed:
            return
        self._closed = True
        for _ in self._threads:
            self._calls.put(None)

    async def wait_closed(self, timeout: float) -> bool:
        """After ``close()``: wait up to ``timeout`` seconds for the threads to end; return
        True if they all did (a listener call still running keeps its thread)."""
        if not self._running:
            return True
        if self._all_ended is None:
            self._all_ended = self._loop.create_future()
        try:
            await asyncio.wait_for(asyncio.shield(self._all_ended), timeout)
        except TimeoutError:
            return False
        return True
