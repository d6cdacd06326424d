"""Sending one planned relay batch: runs of one topic, row by row when refused, within the lease.

How this works
--------------
``BatchSender.send(rows, outcome, claimed_at)`` cuts the rows into runs of one topic
(``plan.runs``) and sends each with one ``Producer.send_batch``, in id order:

* acknowledged rows go to ``outcome.sent`` (id → msg_id);
* a run refused for a *transient* reason (the broker unreachable, a timeout) stops the
  batch: it and every later row stay pending, and the error is returned (the relay backs
  off);
* a run refused for another reason is sent again row by row, so only the guilty row
  fails: a *poison* error marks it FAILED at once, an unexplained one counts an attempt
  (FAILED after ``max_attempts``); a ``MessageTooLargeError`` for a whole run also halves
  ``max_batch_bytes`` (the broker's limit is smaller than ours);
* a row whose key already has a row left unsent in this batch is left too (per-key order);
* lease mode (``claimed_at`` set): no send starts unless it ends (``send_timeout`` at
  most) within 90 % of the lease, measured on the relay's monotonic clock from before the
  claim.

If the relay is cancelled mid-send, the rows of the send in flight are in no list of
``outcome`` (their send may have been stored); every other row is accounted for.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from producer_sdk.outbox.plan import (
    POISON,
    TRANSIENT,
    BatchOutcome,
    OutboxRow,
    classify,
    describe_error,
    runs,
)
from producer_sdk.producer import Producer
from protocol import MessageTooLargeError

__all__ = ["BatchSender", "RelayStats"]

log = logging.getLogger("halfmq.outbox")


@dataclass
class RelayStats:
    """What a relay did since it started (counters only grow).

    ``sent``: rows recorded SENT; ``failed``: rows marked FAILED; ``retried``: attempts
    counted for rows left pending after a suspect error; ``send_errors``: failed
    ``send_batch`` calls; ``batches``: batches that claimed rows; ``lease_lost``: sent rows
    whose lease had been taken before the send was recorded (they may be sent twice);
    ``removed``: rows deleted or archived by retention; ``last_error``: the latest send or
    database error (``None`` once a batch went through again).
    """

    sent: int = 0
    failed: int = 0
    retried: int = 0
    send_errors: int = 0
    batches: int = 0
    lease_lost: int = 0
    removed: int = 0
    last_error: str | None = None
    started: float = field(default_factory=time.monotonic)


class BatchSender:
    """Sends planned batches through ``producer`` (see the module docstring), counting in
    ``stats``. Options as ``OutboxRelay``'s: ``batch_size``, ``max_batch_bytes`` (may
    shrink), ``lease`` (seconds), ``max_attempts``, ``message_groups``, ``clock``."""

    def __init__(self, producer: Producer, stats: RelayStats, *, batch_size: int,
                 max_batch_bytes: int, lease: float, max_attempts: int,
                 message_groups: bool = False,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.producer = producer
        self.stats = stats
        self.batch_size = batch_size
        self.max_batch_bytes = max_batch_bytes
        self.lease = lease
        self.max_attempts = max_attempts
        self.message_groups = message_groups
        self.clock = clock

    async def send(self, rows: list[OutboxRow], outcome: BatchOutcome,
                    claimed_at: float | None) -> BaseException | None:
        """Send ``rows`` run by run, filling ``outcome``; return the transient error that
        stopped the batch, if any. Every row ends up in one of ``outcome``'s lists, except,
        when cancelled, the rows whose send was in flight (their send may have been stored:
        in lease mode they keep their lease)."""
        in_flight: list[int] = []
        try:
            return await self._send_runs(rows, outcome, claimed_at, in_flight)
        except asyncio.CancelledError:
            done = {*outcome.sent, *outcome.failed, *outcome.retry, *outcome.untouched,
                    *in_flight}
            outcome.untouched.extend(r.id for r in rows if r.id not in done)
            raise

    async def _send_runs(self, rows: list[OutboxRow], outcome: BatchOutcome,
                         claimed_at: float | None, in_flight: list[int]) -> BaseException | None:
        groups = [(run.topic, run.rows) for run in
                  runs(rows, max_count=self.batch_size, max_bytes=self.max_batch_bytes)]
        return await self._send_groups(groups, outcome, claimed_at, in_flight)

    async def _send_groups(self, groups: list[tuple[str, list[OutboxRow]]],
                           outcome: BatchOutcome, claimed_at: float | None,
                           in_flight: list[int]) -> BaseException | None:
        """One ``send_batch`` per group, in order. A group refused for a reason other than
        a transient one is sent again row by row, so only the guilty row fails. Returns
        the transient error that stopped the sends, if any (the rest are left pending)."""
        transient: BaseException | None = None
        for topic, rows in groups:
            batch = []
            for r in rows:
                if transient is not None or outcome.blocks(r) or not self.lease_left(claimed_at):
                    outcome.leave(r)
                else:
                    batch.append(r)
            if not batch:
                continue
            results, exc = await self._send_batch(topic, batch, in_flight)
            if exc is None:
                for r, res in zip(batch, results, strict=True):
                    outcome.sent[r.id] = res.msg_id
            elif classify(exc) == TRANSIENT:
                transient = exc
                for r in batch:
                    outcome.leave(r)
            elif len(batch) == 1:
                self.fail(batch[0], exc, outcome)
            else:
                if isinstance(exc, MessageTooLargeError):
                    size = sum(len(r.body) for r in batch)
                    self.max_batch_bytes = max(1024, size // 2)
                    log.info("outbox relay: the broker refused a batch of %d bytes (%s); "
                             "sending at most %d bytes per batch from now on", size, exc,
                             self.max_batch_bytes)
                transient = await self._send_groups([(r.topic, [r]) for r in batch], outcome,
                                                    claimed_at, in_flight)
        return transient

    async def _send_batch(self, topic: str, batch: list[OutboxRow], in_flight: list[int]
                          ) -> tuple[list[Any], BaseException | None]:
        """``send_batch`` once: ``(results, None)`` or ``([], error)``. While it runs,
        ``in_flight`` holds the rows' ids (left there if cancelled)."""
        in_flight[:] = [r.id for r in batch]
        try:
            results = await self.producer.send_batch(
                topic, [r.item(message_group=self.message_groups) for r in batch])
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - sorted by classify()
            in_flight.clear()
            self.stats.send_errors += 1
            return [], exc
        in_flight.clear()
        return results, None

    def fail(self, row: OutboxRow, exc: BaseException, outcome: BatchOutcome) -> None:
        final = classify(exc) == POISON or row.attempts + 1 >= self.max_attempts
        error = describe_error(exc)
        outcome.fail(row, error, final=final)
        if final:
            log.warning("outbox row %d (topic %s, key %s) FAILED after %d attempt(s): %s; "
                        "later rows of its key wait. Fix it and run "
                        "'halfmq outbox-relay --db URL --retry-failed %d', or discard it "
                        "with '--discard %d'", row.id, row.topic, row.order_key,
                        row.attempts + 1, error, row.id, row.id)

    def lease_left(self, claimed_at: float | None) -> bool:
        """Lease mode: whether a send started now ends well inside our lease."""
        if claimed_at is None:
            return True
        return self.clock() - claimed_at + self.producer.send_timeout < self.lease * 0.9
