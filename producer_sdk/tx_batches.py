"""Local transactions in batches: ``BatchTransactionListener`` and the producer's runner.

How this works
--------------
A listener that defines ``execute_local_transaction_batch(batch)`` gets the local
transactions of many ``send_in_transaction`` calls in one call, as ``(message, arg)``
pairs, and returns one ``LocalTransactionState`` per pair, in order. It can then do all of
them in one database transaction and commit once: the commit (an fsync with SQLite's or
most databases' defaults) is shared, as the broker's group commit shares its fdatasync.

:class:`TransactionBatches` runs them one batch at a time. A transaction whose half
message is stored joins the pending list; the first one schedules a start for the end of
the loop iteration, so the halves acknowledged by one reply frame (a window of sends) go
together. While a batch runs (in one of the producer's listener threads for a plain
``def``, on the loop with ``execute_workers=0``, awaited for an ``async def``) the next
halves gather, and the next batch takes all of them, up to :data:`BATCH_MAX`: batches grow
with load. Each caller then reports its own outcome (END_TX), as with the one-at-a-time
listener.

If the batch call raises, every transaction of the batch is UNKNOWN: each caller gets the
exception and the broker's check-back decides (``check_local_transaction``, one message at
a time). A result that is not one state per pair is treated the same way (``TypeError``).
A batch runs in a context of its own (an empty ``contextvars.Context``): it serves many
callers, so no caller's context variables are visible to it. ``close()`` (the producer's)
lets a batch already running finish; the transactions still waiting for one are not run:
their callers get ``BrokerUnavailableError`` and check-back decides.
"""

from __future__ import annotations

import abc
import asyncio
import contextvars
import inspect
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from protocol import BrokerUnavailableError, LocalTransactionState, Message

__all__ = ["BATCH_MAX", "BatchTransactionListener", "TransactionBatches"]

log = logging.getLogger("halfmq.producer")

#: The most local transactions handed to one ``execute_local_transaction_batch`` call.
BATCH_MAX = 1024


class BatchTransactionListener(abc.ABC):
    """Runs local transactions in batches for a ``TransactionProducer`` (group commit), and
    checks them one at a time.

    Both methods may be ``async def`` or plain ``def`` (as for ``TransactionListener``).
    """

    @abc.abstractmethod
    def execute_local_transaction_batch(
        self, batch: Sequence[tuple[Message, Any]]
    ) -> Sequence[LocalTransactionState] | Awaitable[Sequence[LocalTransactionState]]:
        """Run the local transactions of the stored half messages in ``batch`` (pairs of
        the message and the ``arg`` its caller passed); return one outcome per pair, in
        order. Raising means UNKNOWN for every one of them."""

    @abc.abstractmethod
    def check_local_transaction(
        self, message: Message
    ) -> LocalTransactionState | Awaitable[LocalTransactionState]:
        """Tell the broker the outcome of the transaction of half ``message`` (check-back)."""


class TransactionBatches:
    """Runs the pending local transactions one batch at a time (see the module docstring).

    ``run(pairs)`` calls the listener's ``execute_local_transaction_batch`` and returns its
    result or an awaitable of it (the producer decides where: awaited, in its listener
    threads, or on the loop). ``to_state`` turns each returned value into a
    ``LocalTransactionState``.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, run: Callable[[list[tuple[Message, Any]]], Any],
                 to_state: Callable[[Any, str], LocalTransactionState]) -> None:
        self._loop = loop
        self._runner = run
        self._to_state = to_state
        self._pending: list[tuple[Message, Any, asyncio.Future[LocalTransactionState]]] = []
        self._scheduled = False
        self._running = False
        self._closed = False
        #: batches run so far and the local transactions in them (for inspection)
        self.batches = 0
        self.transactions = 0

    def submit(self, message: Message, arg: Any) -> asyncio.Future[LocalTransactionState]:
        """Queue one local transaction; the future gets its state or the batch's exception."""
        fut: asyncio.Future[LocalTransactionState] = self._loop.create_future()
        if self._closed:
            fut.set_exception(_closed_error())
            return fut
        self._pending.append((message, arg, fut))
        if not self._running and not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._start)
        return fut

    def close(self) -> None:
        """Run no more batches: the transactions waiting for one fail (see the module docstring)."""
        self._closed = True
        pending, self._pending = self._pending, []
        for _, _, fut in pending:
            if not fut.done():
                fut.set_exception(_closed_error())

    def _start(self) -> None:
        self._scheduled = False
        if self._running or self._closed:
            return
        pending = self._pending
        if len(pending) > BATCH_MAX:
            batch, self._pending = pending[:BATCH_MAX], pending[BATCH_MAX:]
        else:
            batch, self._pending = pending, []
        batch = [item for item in batch if not item[2].done()]  # (a caller cancelled)
        if not batch:
            if self._pending:
                self._start()
            return
        self._running = True
        self._loop.create_task(self._run(batch), context=contextvars.Context())

    async def _run(self, batch: list[tuple[Message, Any, asyncio.Future[LocalTransactionState]]]) -> None:
        pairs = [(m, a) for m, a, _ in batch]
        try:
            try:
                value = self._runner(pairs)
                if inspect.isawaitable(value):
                    value = await value
                states = self._states(value, len(pairs))
            except Exception as exc:
                log.warning("execute_local_transaction_batch raised for %d transactions (msg_ids %s ... "
                            "%s): %r; outcome UNKNOWN, check-back will decide", len(batch),
                            batch[0][0].msg_id, batch[-1][0].msg_id, exc)
                for _, _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
            else:
                for (_, _, fut), state in zip(batch, states, strict=True):
                    if not fut.done():
                        fut.set_result(state)
            self.batches += 1
            self.transactions += len(batch)
        finally:
            self._running = False
            if self._pending and not self._scheduled:
                self._scheduled = True
                self._loop.call_soon(self._start)

    def _states(self, value: Any, n: int) -> list[LocalTransactionState]:
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != n:
            got = f"{len(value)} values" if isinstance(value, Sequence) else repr(value)
            raise TypeError(f"execute_local_transaction_batch returned {got} for {n} transactions; "
                            f"it must return one LocalTransactionState per transaction, in order")
        to_state = self._to_state
        return [v if type(v) is LocalTransactionState else to_state(v, "execute_local_transaction_batch")
                for v in value]


def _closed_error() -> BrokerUnavailableError:
    return BrokerUnavailableError("the producer was closed before this local transaction ran; "
                                  "it was not run, and check-back will decide its half message")
