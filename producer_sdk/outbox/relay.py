"""The outbox relay: claims pending rows, sends them with ``send_batch``, records the outcome.

How this works
--------------
A relay is one loop on one database connection::

    claim a batch -> plan it -> send its runs -> record the outcome -> again at once while
    there is work; else wait for a wake-up (PostgreSQL NOTIFY, an in-process ``add()``,
    or ``poll_interval``)

* **Claiming** (``table.OutboxTable``): with row locks (``FOR UPDATE SKIP LOCKED``) the
  batch is one transaction, open while its rows are sent, committed with their outcome;
  with leases (SQLite) claiming and recording are two short transactions and the rows
  are leased in between. Either way two relays never hold the same row at once.
* **Planning and sending** (``plan``, ``sending``): rows held back for per-key order
  stay pending; poison rows fail alone; runs of one topic go out with ``send_batch`` in id
  order, and the first failed run stops the batch.
* **Confirmed means recorded.** A row is SENT once the broker acknowledged it *and* the
  outcome committed. If the relay dies in between (kill -9), the row is pending again
  (row locks: at once; leases: when the lease runs out) and is sent again: the only
  duplicates are of sends that were never confirmed, and they carry the same keys and
  ``OUTBOX_ID`` for the consumer to de-duplicate (``consumer_sdk.apply_once``).
* **Leases and clocks.** A lease ends at ``lease_until`` on the database's clock, the one
  clock all relays share; a relay on the same machine whose process is gone loses its
  leases at once (``owner``). The holder measures its own lease with a monotonic clock from
  *before* it asked for it, and starts a send only if the send (``send_timeout`` at most)
  ends well inside the lease; it records only rows still leased to it. A relay stopped
  for longer than its lease (a frozen VM) finds its rows taken and records nothing.
* **Cancellation** records what is known (acknowledged rows become SENT) before the
  relay stops; ``stop()`` finishes the current batch first.
* **Errors.** A transient failure (broker unreachable, timeout) leaves the rows pending and
  backs off (``max_backoff``); a database error closes the connection and reconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from producer_sdk.outbox.owner import is_dead_local_owner, owner_id
from producer_sdk.outbox.plan import (
    BatchOutcome,
    OutboxRow,
    PoisonRowError,
    decode_row,
    describe_error,
    hold_back,
)
from producer_sdk.outbox.sending import BatchSender, RelayStats
from producer_sdk.outbox.sql import (
    MYSQL,
    POSTGRES,
    SqlConn,
    has_skip_locked,
    is_lock_conflict,
    is_undefined_table,
)
from producer_sdk.outbox.table import OutboxStatus
from producer_sdk.producer import Producer
from protocol import MAX_SEND_MESSAGES

if TYPE_CHECKING:
    from producer_sdk.outbox.outbox import Outbox

__all__ = ["OutboxRelay", "RelayStats", "OutboxTableMissingError", "CLAIM_MODES", "SKIP_LOCKED", "LEASE"]

log = logging.getLogger("halfmq.outbox")

SKIP_LOCKED = "skip-locked"
LEASE = "lease"
#: ``claim=`` values: ``auto`` picks ``skip-locked`` where the server has it, else ``lease``.
CLAIM_MODES = ("auto", SKIP_LOCKED, LEASE)
#: Rows deleted (or archived) per transaction by the retention clean-up.
CLEANUP_CHUNK = 1000
#: Re-polls after an in-process ``add()`` found nothing yet (its transaction had not committed).
_HINT_RECHECKS = (0.005, 0.02, 0.05)
#: Attempts at recording a batch's outcome when the database reports a lock conflict.
_RECORD_ATTEMPTS = 5
#: Seconds allowed for recording an outcome after the relay was cancelled.
_RECORD_ON_CANCEL_TIMEOUT = 5.0


class OutboxTableMissingError(LookupError):
    """The outbox table does not exist: create it with ``Outbox.create_table()``."""


class _Transient(Exception):
    """A send failed for a reason that is not the rows' fault: back off, keep them pending."""


class OutboxRelay:
    """Relays one ``Outbox`` through one ``Producer``; ``await relay.run()`` until cancelled.

    Options (keyword-only, defaults in brackets):

    * ``batch_size`` — rows claimed per batch [500].
    * ``max_batch_bytes`` — bodies per ``send_batch`` call [1 MiB]; halved by itself when
      the broker's message size limit is smaller.
    * ``poll_interval`` — seconds between polls while idle [0.1]; PostgreSQL is also woken
      by NOTIFY at once, and an ``add()`` in the same process wakes a relay too.
    * ``claim`` — ``"auto"``, ``"skip-locked"`` or ``"lease"`` [auto: skip-locked on
      PostgreSQL, MySQL 8 and MariaDB 10.6+, else lease].
    * ``lease`` — seconds a leased row is ours [30]; at least 2 × the producer's
      ``send_timeout``.
    * ``retention`` — seconds SENT and DISCARDED rows are kept before deletion (or the
      archive, see ``Outbox(archive=True)``) [3600]; ``cleanup_interval`` — how often
      that runs [60].
    * ``max_attempts`` — sends of one row failing with an unexplained error before it is
      marked FAILED [10] (a poison row — too large, bad topic — fails at once).
    * ``max_backoff`` — longest pause after an error [5].
    * ``message_groups`` — send each row's order key as its message group, so that a FIFO
      consumer group receives a key's rows in order, too [False] (each message is then a
      log record of its own on the broker: slower than a bundled batch).
    * ``clock`` — monotonic clock for leases and timers [``time.monotonic``].
    """

    def __init__(self, outbox: Outbox, producer: Producer, *, batch_size: int = 500,
                 max_batch_bytes: int = 1 << 20, poll_interval: float = 0.1,
                 claim: str = "auto", lease: float = 30.0, retention: float = 3600.0,
                 cleanup_interval: float = 60.0, max_attempts: int = 10,
                 max_backoff: float = 5.0, message_groups: bool = False,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if claim not in CLAIM_MODES:
            raise ValueError(f"claim must be one of {CLAIM_MODES}, not {claim!r}")
        if batch_size < 1 or max_batch_bytes < 1 or max_attempts < 1:
            raise ValueError("batch_size, max_batch_bytes and max_attempts must be >= 1")
        if batch_size > MAX_SEND_MESSAGES:
            raise ValueError(f"batch_size must be at most {MAX_SEND_MESSAGES} (the messages of one SEND)")
        if poll_interval <= 0 or cleanup_interval <= 0 or max_backoff <= 0 or retention < 0:
            raise ValueError("poll_interval, cleanup_interval and max_backoff must be > 0, "
                             "retention >= 0")
        if lease < 2 * producer.send_timeout:
            raise ValueError(f"lease ({lease}s) must be at least twice the producer's "
                             f"send_timeout ({producer.send_timeout}s)")
        self.outbox = outbox
        self.producer = producer
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.claim = claim
        self.lease = lease
        self.retention = retention
        self.cleanup_interval = cleanup_interval
        self.max_backoff = max_backoff
        self.clock = clock
        self.owner = owner_id()
        self.stats = RelayStats()
        self.sender = BatchSender(producer, self.stats, batch_size=batch_size,
                                  max_batch_bytes=max_batch_bytes, lease=lease,
                                  max_attempts=max_attempts, message_groups=message_groups,
                                  clock=clock)
        #: the claim mode in use once connected (``"skip-locked"`` or ``"lease"``)
        self.mode: str | None = None
        self._conn: SqlConn | None = None
        self._wake = asyncio.Event()
        self._rechecks: list[float] = []
        self._stopping = False
        self._backoff = 0.0
        self._next_cleanup = 0.0
        self._next_takeover = 0.0
        self._error_logged: str | None = None

    # -- control -------------------------------------------------------------------------

    def hint(self) -> None:
        """Rows were added in this process: look soon (their transaction may still be open)."""
        self._rechecks = list(_HINT_RECHECKS)
        self._wake.set()

    def stop(self) -> None:
        """Ask ``run()`` to return after the batch in progress is recorded."""
        self._stopping = True
        self._wake.set()

    async def prepare(self) -> OutboxStatus:
        """Connect to the database and pick the claim mode (``self.mode``) now rather than
        in ``run()``; return the table's status. Raises ``OutboxTableMissingError`` if the
        table does not exist, and the driver's error if the database cannot be reached."""
        conn = await self._connection()
        return await self.outbox.table.status(conn)

    async def run_once(self) -> int:
        """Claim, send and record one batch now (no waiting, no clean-up); return how many
        rows changed state. Errors are raised, not retried; a send that failed for a
        transient reason is noted in ``stats.last_error``, and raised (after the batch was
        recorded) if nothing of the batch was sent."""
        try:
            return await self._batch(await self._connection())
        except _Transient as exc:
            raise exc.__cause__ or exc from None

    async def close(self) -> None:
        """Close the database connection opened by ``prepare()`` or ``run_once()`` (``run()``
        closes its own when it ends)."""
        await self._drop_connection()

    async def run(self) -> None:
        """Relay until cancelled or ``stop()`` is called; returns ``None``.

        Database and broker errors are logged and retried with backoff, never raised.
        Raises ``OutboxTableMissingError`` at once if the outbox table does not exist.
        """
        self._stopping = False
        self.outbox._relays.add(self)
        listener: asyncio.Task[None] | None = None
        try:
            while not self._stopping:
                try:
                    conn = await self._connection()
                    if listener is None and self.outbox.dialect == POSTGRES and self.outbox.notify:
                        channel = await self.outbox.table.notify_channel(conn)
                        listener = asyncio.create_task(self._listen(channel or ""))
                    if self.clock() >= self._next_cleanup:
                        await self._cleanup(conn)
                    self._wake.clear()  # a wake-up from now on means: look again
                    progressed = await self._batch(conn)
                except asyncio.CancelledError:
                    raise
                except OutboxTableMissingError:
                    raise
                except _Transient:
                    await self._pause()
                    continue
                except Exception as exc:  # noqa: BLE001 - the database: reconnect and go on
                    if is_lock_conflict(exc):  # a deadlock while claiming: just try again
                        await self._pause()
                        continue
                    self._note_error(f"database error: {describe_error(exc)}",
                                     traceback=not isinstance(exc, OSError))
                    await self._drop_connection()
                    await self._pause()
                    continue
                self._backoff = 0.0
                if progressed:
                    continue
                await self._idle()
        finally:
            self.outbox._relays.discard(self)
            if listener is not None:
                listener.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await listener
            await self._drop_connection()

    # -- one batch -----------------------------------------------------------------------

    async def _batch(self, conn: SqlConn) -> int:
        """Claim, send and record one batch; return how many rows changed state."""
        table = self.outbox.table
        outcome = BatchOutcome()
        locked = self.mode == SKIP_LOCKED
        claimed_at = None if locked else self.clock()  # before the lease starts: ends early
        await conn.begin()
        try:
            if locked:
                raw = await table.claim_locked(conn, self.batch_size)
            else:
                if self.clock() >= self._next_takeover:
                    await self._take_over_dead_relays(conn)
                raw = await table.claim_leased(conn, self.batch_size, self.owner,
                                               int(self.lease * 1000))
            rows = await self._plan(conn, raw, outcome) if raw else []
            if not raw:
                await conn.rollback()
                return 0
            if not locked:
                await conn.commit()  # the leases; row locks stay held until the outcome
            try:
                transient = await self.sender.send(rows, outcome, claimed_at)
            except asyncio.CancelledError:
                await self._record_on_cancel(conn, outcome, self.owner if not locked else None)
                raise
        except BaseException:
            await self._rollback(conn)
            raise
        marked = await self._record(conn, outcome, None if locked else self.owner,
                                    in_transaction=locked)
        if marked < len(outcome.sent):
            self.stats.lease_lost += len(outcome.sent) - marked
            log.warning("outbox relay %s: %d sent rows were claimed by another relay before "
                        "their send was recorded (%s); they may be sent twice", self.owner,
                        len(outcome.sent) - marked,
                        "their lease ran out" if not locked else "the first record failed")
        return self._after(outcome, marked, transient)

    async def _record(self, conn: SqlConn, outcome: BatchOutcome, owner: str | None, *,
                      in_transaction: bool) -> int:
        """Record a batch's outcome and commit; return how many sent rows were marked.

        A lock conflict (a deadlock with another relay or the application) is retried in a
        fresh transaction: the rows were acknowledged, and recording them is what keeps
        them from being sent again. Rows another relay took meanwhile are left alone.
        """
        for attempt in range(_RECORD_ATTEMPTS):
            try:
                if not in_transaction:
                    await conn.begin()
                marked = await self.outbox.table.record(conn, outcome, owner)
                await conn.commit()
                return marked
            except BaseException as exc:
                await self._rollback(conn)
                if attempt + 1 >= _RECORD_ATTEMPTS or not is_lock_conflict(exc):
                    raise
                log.info("outbox relay: recording a batch met a lock conflict (%s); trying "
                         "again", describe_error(exc))
            in_transaction = False
            await asyncio.sleep(0.005 * 2 ** attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _take_over_dead_relays(self, conn: SqlConn) -> None:
        """Lease mode, inside the claim's transaction: end the leases of relays on this
        machine whose process is gone (``owner``), so their rows go out now rather than
        when the leases run out. Checked every quarter lease (at most every 5 s)."""
        self._next_takeover = self.clock() + min(self.lease / 4, 5.0)
        for holder in await self.outbox.table.live_lease_owners(conn):
            if is_dead_local_owner(holder, me=self.owner):
                freed = await self.outbox.table.end_leases(conn, holder)
                log.info("outbox relay: relay %s is gone; took over its %d leased rows",
                         holder, freed)

    async def _plan(self, conn: SqlConn, raw: Sequence[Sequence[Any]],
                    outcome: BatchOutcome) -> list[OutboxRow]:
        """Decode claimed rows; fail poison ones, hold back rows whose key must wait;
        return the rows to send (ascending ids)."""
        self.stats.batches += 1
        decoded: list[OutboxRow] = []
        poison: dict[int, PoisonRowError] = {}
        keys = {r[2] for r in raw if r[2] is not None}
        unsent = (await self.outbox.table.unsent_ids(conn, sorted(keys), int(raw[0][0]),
                                                     int(raw[-1][0])) if keys else {})
        for r in raw:
            try:
                decoded.append(decode_row(r))
            except PoisonRowError as exc:
                poison[int(r[0])] = exc
                decoded.append(OutboxRow(int(r[0]), str(r[1]), r[2], b"", None, (), {}, int(r[7])))
        _ready, held = hold_back(decoded, unsent)
        held_ids = {row.id for row in held}
        to_send = []
        for row in decoded:  # id order: a failure blocks only later rows of its key
            if row.id in held_ids or outcome.blocks(row):
                outcome.leave(row)
            elif row.id in poison:
                self.sender.fail(row, poison[row.id], outcome)
            else:
                to_send.append(row)
        return to_send

    def _after(self, outcome: BatchOutcome, marked: int,
               transient: BaseException | None) -> int:
        """Count a recorded batch; return how many rows changed state. Raises ``_Transient``
        (back off) if a transient error stopped the batch before anything was sent."""
        self.stats.sent += marked
        self.stats.failed += len(outcome.failed)
        self.stats.retried += len(outcome.retry)
        if marked and self.stats.last_error is not None:
            log.info("outbox relay: sending again after: %s", self.stats.last_error)
            self.stats.last_error = None
            self._error_logged = None
        if transient is not None:
            self._note_error(f"send failed, rows stay pending: {describe_error(transient)}")
            if not outcome.sent:
                raise _Transient() from transient
        return marked + len(outcome.failed) + len(outcome.retry)

    async def _record_on_cancel(self, conn: SqlConn, outcome: BatchOutcome,
                                owner: str | None) -> None:
        """Cancelled mid-batch: record the acknowledged rows (so they are not sent again)."""
        if not (outcome.sent or outcome.failed or outcome.retry or outcome.untouched):
            return

        async def record() -> None:
            if owner is not None:
                await conn.begin()
            await self.outbox.table.record(conn, outcome, owner)
            await conn.commit()

        task = asyncio.ensure_future(record())
        try:
            await asyncio.wait_for(asyncio.shield(task), _RECORD_ON_CANCEL_TIMEOUT)
            self.stats.sent += len(outcome.sent)
        except BaseException as exc:  # noqa: BLE001 - best effort: the rows stay pending
            log.warning("outbox relay cancelled; could not record %d acknowledged rows "
                        "(they will be sent again): %s", len(outcome.sent), exc)

    # -- connection, waiting, clean-up -------------------------------------------------------

    async def _connection(self) -> SqlConn:
        if self._conn is not None:
            return self._conn
        conn = await self.outbox.open_connection()
        try:
            if self.mode is None:
                self.mode = await self._claim_mode(conn)
            pending, failed, _oldest = await self.outbox.table.backlog(conn)
        except Exception as exc:
            await conn.close()
            if is_undefined_table(exc):
                raise OutboxTableMissingError(f"the outbox table {self.outbox.table.t} does not exist in "
                                 f"{self.outbox.describe}; create it with "
                                 "Outbox.create_table()") from None
            raise
        self._conn = conn
        log.info("outbox relay %s connected to %s (table %s, claim %s): %d rows pending, %d "
                 "FAILED", self.owner, self.outbox.describe, self.outbox.table.t, self.mode,
                 pending, failed)
        return conn

    async def _claim_mode(self, conn: SqlConn) -> str:
        if self.claim != "auto":
            return self.claim
        if conn.dialect == MYSQL:
            version = str((await conn.fetch("SELECT VERSION()"))[0][0])
            await conn.commit()
            return SKIP_LOCKED if has_skip_locked(MYSQL, version) else LEASE
        return SKIP_LOCKED if has_skip_locked(conn.dialect, "") else LEASE

    async def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()

    async def _rollback(self, conn: SqlConn) -> None:
        try:
            await asyncio.wait_for(conn.rollback(), 5.0)
        except BaseException:  # noqa: BLE001 - a broken connection: start over
            await self._drop_connection()

    def _note_error(self, text: str, *, traceback: bool = False) -> None:
        self.stats.last_error = text
        if text != self._error_logged:  # once per distinct error, not once per retry
            self._error_logged = text
            log.warning("outbox relay: %s (retrying with backoff up to %.1fs)", text,
                        self.max_backoff, exc_info=traceback)

    async def _pause(self) -> None:
        self._backoff = min(self.max_backoff, max(0.05, self._backoff * 2))
        await asyncio.sleep(self._backoff)

    async def _idle(self) -> None:
        timeout = self._rechecks.pop(0) if self._rechecks else self.poll_interval
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout)

    async def _cleanup(self, conn: SqlConn) -> None:
        """Delete (or archive) SENT and DISCARDED rows older than ``retention``."""
        self._next_cleanup = self.clock() + self.cleanup_interval
        table = self.outbox.table
        removed = 0
        while True:
            await conn.begin()
            try:
                ids = await table.expired_ids(conn, int(self.retention * 1000), CLEANUP_CHUNK,
                                              self.mode == SKIP_LOCKED)
                removed += await table.remove(conn, ids) if ids else 0
                await conn.commit()
            except BaseException:
                await self._rollback(conn)
                raise
            if len(ids) < CLEANUP_CHUNK:
                break
        if removed:
            self.stats.removed += removed
            log.info("outbox relay: %s %d rows sent or discarded more than %.0fs ago",
                     "archived" if table.archive_table else "deleted", removed, self.retention)

    async def _listen(self, channel: str) -> None:
        """PostgreSQL: wake the relay on every NOTIFY from the insert trigger; reconnect."""
        if not channel:
            return
        delay = 0.1
        while True:
            try:
                conn = await self.outbox.open_connection()
                try:
                    closed = asyncio.Event()
                    conn.raw.add_termination_listener(lambda _c, ev=closed: ev.set())
                    await conn.raw.add_listener(channel, lambda *_a: self._wake.set())
                    self._wake.set()  # notifications sent while we were not listening
                    delay = 0.1
                    await closed.wait()
                finally:
                    await conn.close()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - polling goes on meanwhile
                log.warning("outbox relay: LISTEN %s failed (%s); polling every %.2fs until "
                            "it is back", channel, describe_error(exc), self.poll_interval)
            await asyncio.sleep(delay)
            delay = min(self.max_backoff, delay * 2)
