"""A check-back nobody has to write: a transaction log kept in the application's own database.

How this works
--------------
The application records the half message's ``msg_id`` in a small table of its own
database, ``halfmq_tx_log``, *inside its local transaction* (anywhere before COMMIT)::

    await record_commit(conn, message.msg_id)        # row (msg_id, 'COMMITTED')

A check-back (``TxLogChecker.check``) then tries to insert a ``ROLLED_BACK`` row for the
same id, in a transaction of its own:

* the insert wins: the local transaction never committed, and now it never can (its own
  insert would hit the primary key, so ``record_commit`` raises ``AlreadyRolledBackError``
  and the application's transaction rolls back). Answer ROLLBACK.
* the insert hits the primary key: read the row. ``COMMITTED`` → COMMIT; ``ROLLED_BACK``
  (an earlier check decided) → ROLLBACK.

A check cannot overtake a local transaction that is still running, which is the mistake
hand-written checks make ("no row yet, so ROLLBACK" while the transaction is about to
commit). In MySQL/MariaDB (InnoDB) the check's insert waits on the row lock of the
uncommitted ``COMMITTED`` row until that transaction ends. In SQLite the check takes the
database's write lock (``BEGIN IMMEDIATE``) and waits (busy timeout) until a writing
transaction ends. If the wait times out the answer is UNKNOWN and the broker asks again at
its next scan; nothing is decided on a guess.

Drivers: ``aiosqlite`` and ``aiomysql`` connections (the dialect is found from the
connection's type). All SQL is parameterised; table names are validated identifiers.

The three lines a user writes::

    class Transfer(TxLogListener):                       # check_local_transaction: done
        async def execute_local_transaction(self, message, arg):
            ...                                          # inside the local transaction:
            await record_commit(conn, message.msg_id)    # in the transaction
    TransactionProducer(addr, group="g", listener=Transfer(TxLogChecker.sqlite("app.db")))

``TxLogBatchListener`` is the same for a ``BatchTransactionListener``: its
``execute_local_transaction_batch`` calls ``record_commit`` once per message of the batch,
in the one transaction that commits them all. If a check-back already rolled one of them
back, that call raises ``AlreadyRolledBackError``, the whole transaction rolls back and
the batch's transactions are left to check-back, which then answers ROLLBACK for each:
none of them has its row, so the database and the broker agree.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sqlite3
from collections.abc import AsyncIterator, Callable
from typing import Any

from producer_sdk.transaction import TransactionListener
from producer_sdk.tx_batches import BatchTransactionListener
from protocol import HalfMQError, LocalTransactionState, Message

__all__ = [
    "TX_LOG_TABLE",
    "COMMITTED",
    "ROLLED_BACK",
    "AlreadyRolledBackError",
    "TxLogChecker",
    "TxLogListener",
    "TxLogBatchListener",
    "create_tx_log",
    "record_commit",
    "sql_dialect",
]

log = logging.getLogger("halfmq.local_tx")

#: Default name of the transaction-log table.
TX_LOG_TABLE = "halfmq_tx_log"
#: ``state`` written by ``record_commit`` inside the application's transaction.
COMMITTED = "COMMITTED"
#: ``state`` written by a check-back that found no committed transaction.
ROLLED_BACK = "ROLLED_BACK"

SQLITE = "sqlite"
MYSQL = "mysql"

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_MYSQL_DUPLICATE_KEY = 1062
_MYSQL_LOCK_WAIT_TIMEOUT = 1205
_MYSQL_DEADLOCK = 1213


class AlreadyRolledBackError(HalfMQError):
    """``record_commit`` found a ``ROLLED_BACK`` marker: a check-back already answered ROLLBACK.

    The broker will never deliver this message, so the local transaction must roll back
    (raising out of it does exactly that).
    """


# --------------------------------------------------------------------------- dialect layer
# Shared with ``consumer_sdk.dedup``; SQL is written with ``?`` placeholders.


def sql_dialect(conn: Any) -> str:
    """Return ``"sqlite"`` for an aiosqlite connection, ``"mysql"`` for an aiomysql one.

    Raises ``TypeError`` for any other object.
    """
    module = type(conn).__module__
    if module.startswith("aiosqlite"):
        return SQLITE
    if module.startswith("aiomysql"):
        return MYSQL
    raise TypeError(f"unsupported connection type {type(conn).__qualname__} from {module}: "
                    "pass an aiosqlite or aiomysql connection")


def check_identifier(name: str) -> str:
    """Return ``name`` if it is a plain SQL identifier; ``ValueError`` otherwise."""
    if not isinstance(name, str) or not _IDENT.match(name):
        raise ValueError(f"not a plain SQL identifier: {name!r}")
    return name


async def execute(conn: Any, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Run one parameterised statement (``?`` placeholders) and return its rows (maybe none)."""
    if sql_dialect(conn) == SQLITE:
        cur = await conn.execute(sql, params)
        try:
            return list(await cur.fetchall())
        finally:
            await cur.close()
    async with conn.cursor() as cur:
        await cur.execute(sql.replace("?", "%s"), params)
        return list(await cur.fetchall())


async def begin(conn: Any) -> None:
    """Start a write transaction: ``BEGIN IMMEDIATE`` (SQLite: takes the write lock) or ``BEGIN``."""
    if sql_dialect(conn) == SQLITE:
        await conn.execute("BEGIN IMMEDIATE")
    else:
        await conn.begin()


def is_duplicate_key(exc: BaseException) -> bool:
    """Whether ``exc`` is a primary-key / unique violation of either driver."""
    if isinstance(exc, sqlite3.IntegrityError):
        return True
    return _mysql_errno(exc) == _MYSQL_DUPLICATE_KEY


def is_lock_timeout(exc: BaseException) -> bool:
    """Whether ``exc`` means "gave up waiting for another transaction's lock"."""
    if isinstance(exc, sqlite3.OperationalError):
        text = str(exc).lower()
        return "locked" in text or "busy" in text
    return _mysql_errno(exc) in (_MYSQL_LOCK_WAIT_TIMEOUT, _MYSQL_DEADLOCK)


def _mysql_errno(exc: BaseException) -> int | None:
    try:
        import pymysql
    except ImportError:  # pragma: no cover - aiomysql not installed
        return None
    if isinstance(exc, pymysql.err.MySQLError) and exc.args and isinstance(exc.args[0], int):
        return exc.args[0]
    return None


async def create_table(conn: Any, ddl: str) -> None:
    """Run a ``CREATE TABLE IF NOT EXISTS`` and commit (MySQL: without the "exists" note)."""
    if sql_dialect(conn) == MYSQL:
        await execute(conn, "SET @halfmq_notes = @@session.sql_notes, @@session.sql_notes = 0")
        try:
            await execute(conn, ddl + " ENGINE=InnoDB")
        finally:
            await execute(conn, "SET @@session.sql_notes = @halfmq_notes")
    else:
        await execute(conn, ddl)
    await conn.commit()


# --------------------------------------------------------------------------- the table


def _tx_log_ddl(table: str) -> str:
    return (f"CREATE TABLE IF NOT EXISTS {check_identifier(table)} ("
            "msg_id VARCHAR(64) NOT NULL PRIMARY KEY, "
            "state VARCHAR(16) NOT NULL, "
            "created_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP)")


async def create_tx_log(conn: Any, *, table: str = TX_LOG_TABLE) -> None:
    """Create the transaction-log table if it is missing (and commit).

    Columns: ``msg_id VARCHAR(64) PRIMARY KEY``, ``state VARCHAR(16)`` (``COMMITTED`` or
    ``ROLLED_BACK``), ``created_at TIMESTAMP``. Call it once at start-up, outside any
    open transaction.
    """
    await create_table(conn, _tx_log_ddl(table))


async def record_commit(conn: Any, msg_id: str, *, table: str = TX_LOG_TABLE) -> None:
    """Record, inside the caller's open transaction on ``conn``, that ``msg_id`` commits.

    Call it anywhere inside the local transaction; early is best on MySQL (a check-back
    then waits for the whole transaction instead of deciding ROLLBACK while it runs,
    which would make this call fail at the end). Returns
    ``None``. Raises ``AlreadyRolledBackError`` if a check-back already answered ROLLBACK
    for this message (the transaction must then roll back, which raising out of it does),
    and whatever the driver raises otherwise. It neither begins nor commits.
    """
    if not isinstance(msg_id, str) or not msg_id or len(msg_id) > 64:
        raise ValueError(f"bad msg_id {msg_id!r}")
    sql = (f"INSERT INTO {check_identifier(table)} (msg_id, state, created_at) "
           "VALUES (?, ?, CURRENT_TIMESTAMP)")
    try:
        await execute(conn, sql, (msg_id, COMMITTED))
    except Exception as exc:
        if not is_duplicate_key(exc):
            raise
        rows = await execute(conn, f"SELECT state FROM {table} WHERE msg_id = ?", (msg_id,))
        if rows and rows[0][0] == COMMITTED:
            return  # recorded already in this very transaction: idempotent
        raise AlreadyRolledBackError(
            f"a check-back already answered ROLLBACK for message {msg_id}; "
            "roll the local transaction back") from None


# --------------------------------------------------------------------------- the checker

Connect = Callable[[], "contextlib.AbstractAsyncContextManager[Any]"]


class TxLogChecker:
    """Answers check-backs from the transaction log, race-free.

    Build one with ``TxLogChecker.sqlite(path)`` or ``TxLogChecker.mysql(pool)``, or pass
    ``connect``: a callable returning an async context manager that yields an aiosqlite or
    aiomysql connection with no open transaction (autocommit off for aiomysql;
    ``isolation_level=None`` for aiosqlite).

    Options (keyword-only): ``table`` [``"halfmq_tx_log"``]; ``lock_timeout`` — seconds a
    check waits for a running local transaction before answering UNKNOWN [10.0].
    """

    def __init__(self, connect: Connect, *, table: str = TX_LOG_TABLE,
                 lock_timeout: float = 10.0) -> None:
        self._connect = connect
        self.table = check_identifier(table)
        self.lock_timeout = float(lock_timeout)

    @classmethod
    def sqlite(cls, path: str, *, table: str = TX_LOG_TABLE,
               lock_timeout: float = 10.0) -> TxLogChecker:
        """A checker for the SQLite database file at ``path`` (a connection per check)."""
        import aiosqlite

        @contextlib.asynccontextmanager
        async def connect() -> AsyncIterator[Any]:
            async with aiosqlite.connect(path, timeout=lock_timeout, isolation_level=None) as conn:
                yield conn

        return cls(connect, table=table, lock_timeout=lock_timeout)

    @classmethod
    def mysql(cls, pool: Any, *, table: str = TX_LOG_TABLE,
              lock_timeout: float = 10.0) -> TxLogChecker:
        """A checker taking connections from an ``aiomysql`` pool (``autocommit=False``)."""
        return cls(pool.acquire, table=table, lock_timeout=lock_timeout)

    async def create_table(self) -> None:
        """Create the transaction-log table if it is missing."""
        async with self._connect() as conn:
            await create_tx_log(conn, table=self.table)

    async def check(self, msg_id: str) -> LocalTransactionState:
        """Return COMMIT if the local transaction of ``msg_id`` committed, ROLLBACK if it did
        not (and now never will), UNKNOWN if a running transaction held the lock for longer
        than ``lock_timeout``. Other database errors are raised (the SDK answers UNKNOWN).
        """
        async with self._connect() as conn:
            dialect = sql_dialect(conn)
            try:
                if dialect == MYSQL:  # restored below: the connection may be the app's
                    await execute(conn, "SET @halfmq_lwt = @@session.innodb_lock_wait_timeout, "
                                        "@@session.innodb_lock_wait_timeout = ?",
                                  (max(1, round(self.lock_timeout)),))
                    await conn.commit()
                await begin(conn)
                try:
                    await execute(
                        conn,
                        f"INSERT INTO {self.table} (msg_id, state, created_at) "
                        "VALUES (?, ?, CURRENT_TIMESTAMP)",
                        (msg_id, ROLLED_BACK),
                    )
                except Exception as exc:
                    await _quiet_rollback(conn)
                    if not is_duplicate_key(exc):
                        raise
                else:
                    await conn.commit()
                    log.info("check-back for %s: no committed local transaction, marked ROLLED_BACK",
                             msg_id)
                    return LocalTransactionState.ROLLBACK
                # the row exists and its transaction has ended: read it in a fresh transaction
                rows = await execute(conn, f"SELECT state FROM {self.table} WHERE msg_id = ?",
                                     (msg_id,))
                await conn.commit()
            except Exception as exc:
                if is_lock_timeout(exc):
                    await _quiet_rollback(conn)
                    log.info("check-back for %s: local transaction still running after %.1fs; "
                             "answering UNKNOWN", msg_id, self.lock_timeout)
                    return LocalTransactionState.UNKNOWN
                raise
            finally:
                if dialect == MYSQL:
                    with contextlib.suppress(Exception):
                        await execute(conn, "SET @@session.innodb_lock_wait_timeout = @halfmq_lwt")
        state = rows[0][0] if rows else None
        if state == COMMITTED:
            return LocalTransactionState.COMMIT
        if state == ROLLED_BACK:
            return LocalTransactionState.ROLLBACK
        return LocalTransactionState.UNKNOWN  # pragma: no cover - row deleted meanwhile

    async def purge(self, older_than: float) -> int:
        """Delete log rows older than ``older_than`` seconds; return how many.

        Keep rows at least as long as the broker may still check them
        (``tx_timeout + tx_check_max * tx_check_interval``), or a late check would answer
        ROLLBACK for a committed transaction.
        """
        seconds = int(older_than)
        async with self._connect() as conn:
            if sql_dialect(conn) == SQLITE:
                sql = f"DELETE FROM {self.table} WHERE created_at < datetime('now', ?)"
                params: tuple[Any, ...] = (f"-{seconds} seconds",)
            else:
                sql = f"DELETE FROM {self.table} WHERE created_at < NOW() - INTERVAL ? SECOND"
                params = (seconds,)
            await begin(conn)
            if sql_dialect(conn) == SQLITE:
                cur = await conn.execute(sql, params)
                count = cur.rowcount
                await cur.close()
            else:
                async with conn.cursor() as cur:
                    count = await cur.execute(sql.replace("?", "%s"), params)
            await conn.commit()
            return int(count)


async def _quiet_rollback(conn: Any) -> None:
    with contextlib.suppress(Exception):
        await conn.rollback()


class _TxLogCheck:
    """The ready-made ``check_local_transaction`` of both listeners below."""

    def __init__(self, tx_log: TxLogChecker) -> None:
        self.tx_log = tx_log

    async def check_local_transaction(self, message: Message) -> LocalTransactionState:
        """Answer a check-back from the transaction log (see ``TxLogChecker.check``)."""
        return await self.tx_log.check(message.msg_id)


class TxLogListener(_TxLogCheck, TransactionListener):
    """A ``TransactionListener`` whose ``check_local_transaction`` is ready-made.

    Subclass it and write only ``execute_local_transaction``, calling
    ``record_commit(conn, message.msg_id)`` inside the local transaction before it commits.
    ``tx_log`` is the ``TxLogChecker`` of the same database.
    """


class TxLogBatchListener(_TxLogCheck, BatchTransactionListener):
    """A ``BatchTransactionListener`` whose ``check_local_transaction`` is ready-made.

    Subclass it and write only ``execute_local_transaction_batch``, calling
    ``record_commit(conn, message.msg_id)`` for every message of the batch inside the one
    local transaction before it commits. ``tx_log`` is the ``TxLogChecker`` of the same
    database.
    """
