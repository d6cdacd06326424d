"""The statements a relay and an operator run on the outbox table.

How this works
--------------
``OutboxTable`` binds a ``Dialect`` to one table and runs, on a ``SqlConn``, every
statement of the outbox's lifecycle::

    PENDING --sent and confirmed--> SENT --retention--> deleted (or moved to the archive)
       |  \\--poison, or max_attempts suspect failures--> FAILED --retry_failed--> PENDING
       |                                                        \\--discard--> DISCARDED
       \\-- (a transient failure leaves it PENDING)

Claiming, two ways (``Dialect`` says which the server supports):

* **Row locks** (PostgreSQL, MySQL 8, MariaDB 10.6+): ``claim_locked`` selects the first
  pending rows ``FOR UPDATE SKIP LOCKED`` inside the relay's transaction, which stays open
  while they are sent and commits the outcome. Another relay skips locked rows; a relay
  that dies (kill -9) loses its connection, the database rolls back, and the rows are
  pending again at once. No clock is involved.
* **Leases** (SQLite, older servers): ``claim_leased`` marks the rows with the relay's
  ``lease_owner`` and ``lease_until = now + lease`` (the database's clock) in a short
  transaction; the outcome is recorded later only for rows whose lease is still ours. A
  row whose lease ran out can be claimed by another relay.

Neither way reads "rows above the last id I saw": a transaction that commits late with a
smaller id is still found, because every pending row is found by its status.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from producer_sdk.outbox.plan import BatchOutcome
from producer_sdk.outbox.sql import MYSQL, POSTGRES, SQLITE, Dialect, SqlConn

__all__ = ["OutboxTable", "OutboxStatus", "FailedRow", "ROW_COLUMNS", "STATUSES"]

#: Columns read for sending, in ``decode_row`` order (plus ``attempts``).
ROW_COLUMNS = "id, topic, order_key, body, tags, msg_keys, properties, attempts"
#: Every column, in table order (the archive has the same columns).
ALL_COLUMNS = ("id, topic, order_key, body, tags, msg_keys, properties, status, attempts, "
               "last_error, lease_owner, lease_until, msg_id, created_at, done_at")
STATUSES = ("PENDING", "SENT", "FAILED", "DISCARDED")
#: Rows per statement when a statement lists ids (keeps every driver under its parameter limit).
_CHUNK = 200


def _marks(n: int) -> str:
    return ", ".join("?" * n)


def _chunks(items: Sequence[Any], size: int = _CHUNK) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


async def _for_ids(conn: SqlConn, sql: str, ids: Iterable[int], before: tuple[Any, ...] = (),
                   after: tuple[Any, ...] = ()) -> int:
    """Run ``sql`` (its ``{ids}`` replaced by one ``?`` per id) for ``ids`` in chunks, with
    ``before`` and ``after`` around each chunk's ids; return the rows changed in all."""
    changed = 0
    for chunk in _chunks(list(ids)):
        changed += await conn.execute(sql.replace("{ids}", _marks(len(chunk))),
                                      (*before, *chunk, *after))
    return changed


@dataclass(frozen=True)
class OutboxStatus:
    """Row counts by status, and the age in seconds of the oldest pending row (``None`` if
    nothing is pending), on the database's clock."""

    pending: int
    sent: int
    failed: int
    discarded: int
    oldest_pending_age: float | None

    def describe(self) -> str:
        age = ("" if self.oldest_pending_age is None
               else f", oldest pending {self.oldest_pending_age:.1f}s old")
        return (f"pending {self.pending}, failed {self.failed}, sent {self.sent}, "
                f"discarded {self.discarded}{age}")


@dataclass(frozen=True)
class FailedRow:
    """A FAILED row as an operator sees it: what it was for, how often it was tried, why
    it failed (``last_error``) and when (``failed_at``, ms on the database's clock)."""

    id: int
    topic: str
    order_key: str | None
    keys: str
    attempts: int
    last_error: str | None
    created_at: int
    failed_at: int | None


class OutboxTable:
    """The statements for one outbox table of one dialect (see the module docstring)."""

    def __init__(self, dialect: Dialect, *, archive_table: str | None = None) -> None:
        self.dialect = dialect
        self.t = dialect.table
        self.now = dialect.now_ms
        self.archive_table = archive_table

    # -- schema ------------------------------------------------------------------------

    async def create(self, conn: SqlConn, *, notify: bool) -> None:
        """Create the table, its indexes, the archive table (if any) and, on PostgreSQL with
        ``notify``, the trigger that wakes relays; then commit. Idempotent."""
        statements = self.dialect.create_statements()
        if self.archive_table:
            statements += self.dialect.create_statements(self.archive_table, indexes=False)
        if notify and self.dialect.name == POSTGRES:
            statements += self.dialect.notify_statements()
        if conn.dialect == MYSQL:  # no "already exists" notes (they surface as warnings)
            await conn.execute("SET @halfmq_notes = @@session.sql_notes, @@session.sql_notes = 0")
        try:
            for sql in statements:
                await conn.execute(sql)
        finally:
            if conn.dialect == MYSQL:
                await conn.execute("SET @@session.sql_notes = @halfmq_notes")
        if conn.dialect != POSTGRES:  # asyncpg: autocommitted, or the caller's transaction
            await conn.commit()

    async def notify_channel(self, conn: SqlConn) -> str | None:
        """PostgreSQL: the channel the insert trigger notifies (``schema.table``), or
        ``None`` if the table is not found on this connection's search path."""
        rows = await conn.fetch(
            "SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.oid = to_regclass(?)", (self.t,))
        return f"{rows[0][0]}.{self.t}" if rows else None

    # -- writing -----------------------------------------------------------------------

    async def insert(self, conn: SqlConn, topic: str, body: bytes, order_key: str | None,
                     tags: str | None, keys_json: str, properties_json: str) -> int:
        """Insert one PENDING row inside the caller's transaction; return its id."""
        blob: bytes | str = body
        body_sql = "?"
        if conn.dialect == MYSQL:  # aiomysql cannot bind bytes with PyMySQL 1.2 (aiomysql#1080)
            blob, body_sql = body.hex(), "UNHEX(?)"
        sql = (f"INSERT INTO {self.t} (topic, order_key, body, tags, msg_keys, properties, "
               f"status, attempts, created_at) VALUES (?, ?, {body_sql}, ?, ?, ?, 'PENDING', 0, "
               f"{self.now})")
        if conn.dialect == POSTGRES:
            sql += " RETURNING id"
        return await conn.insert_id(sql, (topic, order_key, blob, tags, keys_json, properties_json))

    # -- claiming ----------------------------------------------------------------------

    async def claim_locked(self, conn: SqlConn, limit: int) -> list[tuple[Any, ...]]:
        """Inside an open transaction: lock and return up to ``limit`` pending rows that no
        other transaction holds (``FOR UPDATE SKIP LOCKED``), in id order."""
        return await conn.fetch(
            f"SELECT {ROW_COLUMNS} FROM {self.t} WHERE status = 'PENDING' "
            "ORDER BY id LIMIT ? FOR UPDATE SKIP LOCKED", (limit,))

    async def claim_leased(self, conn: SqlConn, limit: int, owner: str,
                           lease_ms: int) -> list[tuple[Any, ...]]:
        """Inside an open write transaction: lease up to ``limit`` pending rows whose lease
        is free or expired to ``owner`` for ``lease_ms`` (database clock); return them."""
        lock = " FOR UPDATE" if conn.dialect != SQLITE else ""
        rows = await conn.fetch(
            f"SELECT {ROW_COLUMNS} FROM {self.t} WHERE status = 'PENDING' "
            f"AND (lease_until IS NULL OR lease_until < {self.now}) ORDER BY id LIMIT ?{lock}",
            (limit,))
        await _for_ids(conn, f"UPDATE {self.t} SET lease_owner = ?, lease_until = {self.now} + ? "
                             "WHERE id IN ({ids})", (r[0] for r in rows), (owner, lease_ms))
        return rows

    async def live_lease_owners(self, conn: SqlConn) -> list[str]:
        """The owners of leases that have not run out on pending rows."""
        rows = await conn.fetch(
            f"SELECT DISTINCT lease_owner FROM {self.t} WHERE status = 'PENDING' "
            f"AND lease_owner IS NOT NULL AND lease_until >= {self.now}")
        return [str(r[0]) for r in rows]

    async def end_leases(self, conn: SqlConn, owner: str) -> int:
        """Inside an open write transaction: end every lease of ``owner`` now (a relay known
        to be dead); return how many rows are free again."""
        return await conn.execute(
            f"UPDATE {self.t} SET lease_owner = NULL, lease_until = NULL "
            "WHERE lease_owner = ? AND status = 'PENDING'", (owner,))

    async def unsent_ids(self, conn: SqlConn, keys: Sequence[str], low: int,
                         high: int) -> dict[str, list[int]]:
        """For each of ``keys``: the smallest unsent (PENDING or FAILED) id below ``low``,
        and every unsent id from ``low`` to ``high`` (a claimed batch's range: bounded by
        the rows claimed by all relays at once)."""
        out: dict[str, list[int]] = {}
        for chunk in _chunks(list(keys), _CHUNK // 2):
            marks = _marks(len(chunk))
            rows = await conn.fetch(
                f"SELECT order_key, MIN(id) FROM {self.t} WHERE status IN ('PENDING', 'FAILED') "
                f"AND order_key IN ({marks}) AND id < ? GROUP BY order_key "
                f"UNION ALL SELECT order_key, id FROM {self.t} WHERE status IN "
                f"('PENDING', 'FAILED') AND order_key IN ({marks}) AND id >= ? AND id <= ?",
                (*chunk, low, *chunk, low, high))
            for key, row_id in rows:
                out.setdefault(key, []).append(int(row_id))
        return out

    # -- recording a batch ---------------------------------------------------------------

    async def record(self, conn: SqlConn, outcome: BatchOutcome, owner: str | None) -> int:
        """Inside an open transaction: mark ``outcome.sent`` SENT (with their msg_id),
        ``outcome.failed`` FAILED, count an attempt for ``outcome.retry`` and release the
        leases of everything else. ``owner`` (lease mode) restricts every change to rows
        still leased to it. Returns how many sent rows were marked (fewer than sent means
        a lease ran out before the send was recorded)."""
        mine, mine_args = ("", ()) if owner is None else (" AND lease_owner = ?", (owner,))
        free = ", lease_owner = NULL, lease_until = NULL"
        marked = 0
        for chunk in _chunks(list(outcome.sent.items())):
            ids = [i for i, _ in chunk]
            case = " ".join("WHEN ? THEN ?" for _ in chunk)
            pairs = [x for pair in chunk for x in pair]
            marked += await conn.execute(
                f"UPDATE {self.t} SET status = 'SENT', done_at = {self.now}, last_error = NULL, "
                f"msg_id = CASE id {case} END{free} WHERE id IN ({_marks(len(ids))}) "
                f"AND status = 'PENDING'{mine}",
                (*pairs, *ids, *mine_args))
        for status, by_error in (("FAILED", outcome.failed), (None, outcome.retry)):
            errors: dict[str, list[int]] = {}
            for row_id, error in by_error.items():
                errors.setdefault(error, []).append(row_id)
            for error, ids in errors.items():
                setter = f"status = 'FAILED', done_at = {self.now}, " if status else ""
                await _for_ids(conn, f"UPDATE {self.t} SET {setter}attempts = attempts + 1, "
                                     f"last_error = ?{free} WHERE id IN ({{ids}}){mine}",
                               ids, (error,), mine_args)
        if owner is not None:
            await self.release(conn, outcome.untouched, owner)
        return marked

    async def release(self, conn: SqlConn, ids: Sequence[int], owner: str) -> None:
        """Give up ``owner``'s leases on ``ids`` (they can be claimed again at once)."""
        await _for_ids(conn, f"UPDATE {self.t} SET lease_owner = NULL, lease_until = NULL "
                             "WHERE id IN ({ids}) AND lease_owner = ?", ids, after=(owner,))

    # -- retention ---------------------------------------------------------------------

    async def expired_ids(self, conn: SqlConn, retention_ms: int, limit: int,
                          skip_locked: bool) -> list[int]:
        """Inside an open transaction: up to ``limit`` SENT or DISCARDED rows finished more
        than ``retention_ms`` ago, locked for deletion."""
        lock = " FOR UPDATE SKIP LOCKED" if skip_locked else ""
        rows = await conn.fetch(
            f"SELECT id FROM {self.t} WHERE status IN ('SENT', 'DISCARDED') "
            f"AND done_at < {self.now} - ? ORDER BY id LIMIT ?{lock}", (retention_ms, limit))
        return [int(r[0]) for r in rows]

    async def remove(self, conn: SqlConn, ids: Sequence[int]) -> int:
        """Inside an open transaction: delete ``ids`` (copying them to the archive table
        first, if there is one); return how many were deleted."""
        if self.archive_table:
            await _for_ids(conn, f"INSERT INTO {self.archive_table} ({ALL_COLUMNS}) SELECT "
                                 f"{ALL_COLUMNS} FROM {self.t} WHERE id IN ({{ids}})", ids)
        return await _for_ids(conn, f"DELETE FROM {self.t} WHERE id IN ({{ids}})", ids)

    # -- operators ---------------------------------------------------------------------

    async def status(self, conn: SqlConn) -> OutboxStatus:
        """Counts per status and the age of the oldest pending row."""
        rows = await conn.fetch(
            f"SELECT status, COUNT(*), MIN(created_at), MAX({self.now}) FROM {self.t} "
            "GROUP BY status")
        counts = {str(r[0]): int(r[1]) for r in rows}
        age = None
        for r in rows:
            if r[0] == "PENDING" and r[2] is not None:
                age = max(0.0, (int(r[3]) - int(r[2])) / 1000.0)
        return OutboxStatus(counts.get("PENDING", 0), counts.get("SENT", 0),
                            counts.get("FAILED", 0), counts.get("DISCARDED", 0), age)

    async def backlog(self, conn: SqlConn) -> tuple[int, int, float | None]:
        """``(pending, failed, oldest pending age in seconds or None)``, read through the
        indexes of unsent rows only (cheap on a large table of sent rows)."""
        rows = await conn.fetch(
            f"SELECT status, COUNT(*), MIN(created_at), MAX({self.now}) FROM {self.t} "
            "WHERE status IN ('PENDING', 'FAILED') GROUP BY status")
        counts = {str(r[0]): int(r[1]) for r in rows}
        ages = [max(0.0, (int(r[3]) - int(r[2])) / 1000.0) for r in rows
                if r[0] == "PENDING" and r[2] is not None]
        return counts.get("PENDING", 0), counts.get("FAILED", 0), (ages[0] if ages else None)

    async def failed_rows(self, conn: SqlConn, limit: int) -> list[FailedRow]:
        """The first ``limit`` FAILED rows, oldest first."""
        rows = await conn.fetch(
            f"SELECT id, topic, order_key, msg_keys, attempts, last_error, created_at, done_at "
            f"FROM {self.t} WHERE status = 'FAILED' ORDER BY id LIMIT ?", (limit,))
        return [FailedRow(int(r[0]), r[1], r[2], r[3], int(r[4]), r[5], int(r[6]),
                          None if r[7] is None else int(r[7])) for r in rows]

    async def retry_failed(self, conn: SqlConn, ids: Sequence[int] | None) -> int:
        """Inside an open transaction: make FAILED rows (all, or ``ids``) PENDING again with
        their attempts reset; return how many."""
        if ids is None:
            return await conn.execute(
                f"UPDATE {self.t} SET status = 'PENDING', attempts = 0, done_at = NULL "
                "WHERE status = 'FAILED'")
        return await _for_ids(conn, f"UPDATE {self.t} SET status = 'PENDING', attempts = 0, "
                                    "done_at = NULL WHERE status = 'FAILED' AND id IN ({ids})", ids)

    async def discard(self, conn: SqlConn, ids: Sequence[int]) -> int:
        """Inside an open transaction: mark FAILED rows ``ids`` DISCARDED (never sent; later
        rows of their keys go on); return how many."""
        return await _for_ids(conn, f"UPDATE {self.t} SET status = 'DISCARDED', done_at = "
                                    f"{self.now} WHERE status = 'FAILED' AND id IN ({{ids}})", ids)
