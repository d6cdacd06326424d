"""Apply a message once: the consumer's work and its de-duplication key in one local transaction.

How this works
--------------
Delivery is at least once (SPEC C1): a message can arrive again after a lost ack, a
consumer crash or a producer's retry. ``apply_once(conn, key, work)`` begins a write
transaction on ``conn``, inserts ``key`` into a de-duplication table and, only if that
insert wins, runs ``await work(conn)`` and commits both together. If the key is already
there the transaction is rolled back and ``apply_once`` returns ``False``: the effect
exists, the listener just acks. If ``work`` raises, everything rolls back (the key too),
so a redelivery tries again.

Two deliveries of the same key at the same moment cannot both apply: the second insert
waits on the first one's row lock (MySQL/MariaDB) or on the write lock (SQLite, the
transaction is ``BEGIN IMMEDIATE``) and then fails on the primary key.

    async def on_message(message):
        async with pool.acquire() as conn:
            await apply_once(conn, message.keys[0], lambda c: credit(c, message))
        return ConsumeResult.SUCCESS

Drivers: ``aiosqlite`` (open it with ``isolation_level=None``) and ``aiomysql``
(``autocommit=False``). All SQL is parameterised; table and column names are validated.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from producer_sdk.local_tx import (
    begin,
    check_identifier,
    create_table,
    execute,
    is_duplicate_key,
)

__all__ = ["CONSUMED_TABLE", "apply_once", "claim_key", "create_dedup_table"]

#: Default name of the de-duplication table.
CONSUMED_TABLE = "halfmq_consumed"


async def create_dedup_table(conn: Any, *, table: str = CONSUMED_TABLE,
                             key_column: str = "msg_key",
                             time_column: str = "created_at") -> None:
    """Create the de-duplication table if it is missing (and commit).

    Columns: ``<key_column> VARCHAR(128) PRIMARY KEY``, ``<time_column> TIMESTAMP``.
    """
    ddl = (f"CREATE TABLE IF NOT EXISTS {check_identifier(table)} ("
           f"{check_identifier(key_column)} VARCHAR(128) NOT NULL PRIMARY KEY, "
           f"{check_identifier(time_column)} TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP)")
    await create_table(conn, ddl)


async def claim_key(conn: Any, key: str, *, table: str = CONSUMED_TABLE,
                    key_column: str = "msg_key", time_column: str = "created_at") -> bool:
    """Insert ``key`` inside the caller's open transaction; ``False`` if it is already there.

    For callers that run their own transaction: claim the key first, do the work only when
    this returns ``True``, then commit. It neither begins nor commits.
    """
    if not isinstance(key, str) or not key or len(key) > 128:
        raise ValueError(f"bad de-duplication key {key!r}")
    sql = (f"INSERT INTO {check_identifier(table)} "
           f"({check_identifier(key_column)}, {check_identifier(time_column)}) "
           "VALUES (?, CURRENT_TIMESTAMP)")
    try:
        await execute(conn, sql, (key,))
    except Exception as exc:
        if is_duplicate_key(exc):
            return False
        raise
    return True


async def apply_once(conn: Any, key: str, work: Callable[[Any], Awaitable[Any]], *,
                     table: str = CONSUMED_TABLE, key_column: str = "msg_key",
                     time_column: str = "created_at") -> bool:
    """Run ``await work(conn)`` and record ``key`` in one transaction, unless ``key`` is recorded.

    ``conn`` must have no open transaction; ``apply_once`` begins, commits or rolls back.
    Returns ``True`` if the work was applied now, ``False`` if ``key`` had been applied
    before (nothing is done). Re-raises whatever ``work`` or the database raises, after
    rolling back (the key is then not recorded, so a redelivery tries again).
    """
    await begin(conn)
    try:
        if not await claim_key(conn, key, table=table, key_column=key_column,
                               time_column=time_column):
            await conn.rollback()
            return False
        await work(conn)
        await conn.commit()
    except BaseException:
        try:
            await conn.rollback()
        except Exception:  # noqa: S110 - the original error is the one to report
            pass
        raise
    return True
