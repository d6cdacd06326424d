"""The outbox's database layer: three drivers behind one small interface, and their SQL.

How this works
--------------
``SqlConn`` wraps one connection of ``aiosqlite``, ``aiomysql`` or ``asyncpg`` (the
dialect is found from the connection's type) and offers ``fetch``, ``execute``,
``insert_id``, ``begin``, ``commit``, ``rollback``. SQL is written once with ``?``
placeholders and translated: ``%s`` for aiomysql, ``$1..$n`` for asyncpg. No statement
here contains a literal ``?`` or ``%``, so the translation is a plain substitution.

``Dialect`` holds what differs between the databases: the DDL of the outbox table, the
SQL expression for "now" on the database's clock (milliseconds since the epoch), and
whether the database can claim rows with ``SELECT ... FOR UPDATE SKIP LOCKED``
(PostgreSQL 9.5+, MySQL 8.0.1+, MariaDB 10.6+; not SQLite).

Times in the table are milliseconds on the *database's* clock (``created_at``,
``done_at``, ``lease_until``). Every relay compares them with the same clock, so relays on
machines whose clocks disagree still agree on when a lease ends or a row is old enough to
delete.
"""

from __future__ import annotations

import re
import sqlite3
from typing import Any

from producer_sdk.local_tx import check_identifier, is_lock_timeout, sql_dialect

__all__ = [
    "SQLITE",
    "MYSQL",
    "POSTGRES",
    "Dialect",
    "SqlConn",
    "dialect_of",
    "has_skip_locked",
    "is_lock_conflict",
    "is_undefined_table",
]

SQLITE = "sqlite"
MYSQL = "mysql"
POSTGRES = "postgres"

_PG_PLACEHOLDER = re.compile(r"\?")


def dialect_of(conn: Any) -> str:
    """Return ``"sqlite"``, ``"mysql"`` or ``"postgres"`` for an aiosqlite, aiomysql or
    asyncpg connection (an asyncpg pool's connection too); ``TypeError`` for anything else."""
    if isinstance(conn, SqlConn):
        return conn.dialect
    if type(conn).__module__.startswith("asyncpg"):
        return POSTGRES
    return sql_dialect(conn)  # "sqlite" / "mysql", or TypeError


def _to_postgres(sql: str) -> str:
    counter = iter(range(1, 1_000_000))
    return _PG_PLACEHOLDER.sub(lambda _m: f"${next(counter)}", sql)


class SqlConn:
    """One database connection of any supported driver, with ``?`` placeholders.

    ``raw`` is the driver's connection; ``dialect`` is found from it. The wrapper neither
    opens nor closes transactions by itself.
    """

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self.dialect = dialect_of(raw)

    def _sql(self, sql: str) -> str:
        if self.dialect == MYSQL:
            return sql.replace("?", "%s")
        if self.dialect == POSTGRES:
            return _to_postgres(sql)
        return sql

    async def fetch(self, sql: str, params: tuple[Any, ...] | list[Any] = ()) -> list[tuple[Any, ...]]:
        """Run a statement and return all its rows as tuples."""
        if self.dialect == SQLITE:
            cur = await self.raw.execute(sql, tuple(params))
            try:
                return list(await cur.fetchall())
            finally:
                await cur.close()
        if self.dialect == MYSQL:
            async with self.raw.cursor() as cur:
                await cur.execute(self._sql(sql), tuple(params))
                return list(await cur.fetchall())
        return [tuple(r) for r in await self.raw.fetch(self._sql(sql), *params)]

    async def execute(self, sql: str, params: tuple[Any, ...] | list[Any] = ()) -> int:
        """Run a statement; return the number of rows it changed."""
        if self.dialect == SQLITE:
            cur = await self.raw.execute(sql, tuple(params))
            count = cur.rowcount
            await cur.close()
            return int(count)
        if self.dialect == MYSQL:
            async with self.raw.cursor() as cur:
                return int(await cur.execute(self._sql(sql), tuple(params)))
        status = await self.raw.execute(self._sql(sql), *params)
        tail = status.rsplit(" ", 1)[-1] if isinstance(status, str) else ""
        return int(tail) if tail.isdigit() else 0

    async def insert_id(self, sql: str, params: tuple[Any, ...]) -> int:
        """Run an ``INSERT`` of one row and return its generated id (PostgreSQL: the
        statement must end with ``RETURNING id``)."""
        if self.dialect == SQLITE:
            cur = await self.raw.execute(sql, params)
            row_id = cur.lastrowid
            await cur.close()
            return int(row_id)
        if self.dialect == MYSQL:
            async with self.raw.cursor() as cur:
                await cur.execute(self._sql(sql), params)
                return int(cur.lastrowid)
        return int(await self.raw.fetchval(self._sql(sql), *params))

    async def begin(self) -> None:
        """Start a write transaction (SQLite: ``BEGIN IMMEDIATE``, which takes the write lock)."""
        if self.dialect == SQLITE:
            await self.raw.execute("BEGIN IMMEDIATE")
        elif self.dialect == MYSQL:
            await self.raw.begin()
        else:
            await self.raw.execute("BEGIN")

    async def commit(self) -> None:
        if self.dialect == POSTGRES:
            await self.raw.execute("COMMIT")
        else:
            await self.raw.commit()

    async def rollback(self) -> None:
        if self.dialect == POSTGRES:
            await self.raw.execute("ROLLBACK")
        else:
            await self.raw.rollback()

    async def close(self) -> None:
        """Close the driver's connection (errors while closing are not raised)."""
        try:
            if self.dialect == MYSQL:
                self.raw.close()
            else:
                await self.raw.close()
        except Exception:  # noqa: BLE001 - the connection is going away either way
            pass


def has_skip_locked(dialect: str, version: str) -> bool:
    """Whether a server of ``dialect`` reporting ``version`` has ``FOR UPDATE SKIP LOCKED``."""
    if dialect == POSTGRES:
        return True  # 9.5+; older servers are out of support
    if dialect != MYSQL:
        return False
    numbers = [int(n) for n in re.findall(r"\d+", version)[:2]] + [0, 0]
    major, minor = numbers[0], numbers[1]
    if "mariadb" in version.lower():
        return (major, minor) >= (10, 6)
    return (major, minor) >= (8, 0)


class Dialect:
    """The SQL that differs between SQLite, MySQL/MariaDB and PostgreSQL for one table."""

    #: "now" on the database's clock, in milliseconds since the epoch.
    NOW_MS = {
        SQLITE: "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)",
        MYSQL: "CAST(UNIX_TIMESTAMP(NOW(3)) * 1000 AS SIGNED)",
        POSTGRES: "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)",
    }

    def __init__(self, name: str, table: str) -> None:
        if name not in self.NOW_MS:
            raise ValueError(f"unknown SQL dialect {name!r}")
        self.name = name
        self.table = check_identifier(table)
        self.now_ms = self.NOW_MS[name]

    def create_statements(self, table: str | None = None, *, indexes: bool = True) -> list[str]:
        """``CREATE TABLE IF NOT EXISTS`` and its indexes for ``table`` (default: the outbox).

        Columns: ``id`` (ascending, never reused), ``topic``, ``order_key`` (rows of one key
        are sent in ``id`` order), ``body``, ``tags``, ``msg_keys`` and ``properties`` (JSON),
        ``status`` (``PENDING``, ``SENT``, ``FAILED``, ``DISCARDED``), ``attempts``,
        ``last_error``, ``lease_owner`` / ``lease_until`` (SQLite and servers without SKIP
        LOCKED), ``msg_id`` (the broker's id once sent), ``created_at`` / ``done_at`` (ms).
        """
        t = check_identifier(table or self.table)
        if self.name == SQLITE:
            id_col, blob, big = "id INTEGER PRIMARY KEY AUTOINCREMENT", "BLOB", "BIGINT"
        elif self.name == MYSQL:
            id_col, blob, big = "id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY", "LONGBLOB", "BIGINT"
        else:
            id_col, blob, big = "id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY", "BYTEA", "BIGINT"
        columns = (
            f"{id_col}, "
            "topic VARCHAR(127) NOT NULL, "
            "order_key VARCHAR(128) NULL, "
            f"body {blob} NOT NULL, "
            "tags VARCHAR(255) NULL, "
            "msg_keys TEXT NOT NULL, "
            "properties TEXT NOT NULL, "
            "status VARCHAR(10) NOT NULL DEFAULT 'PENDING', "
            "attempts INTEGER NOT NULL DEFAULT 0, "
            "last_error TEXT NULL, "
            "lease_owner VARCHAR(64) NULL, "
            f"lease_until {big} NULL, "
            "msg_id VARCHAR(64) NULL, "
            f"created_at {big} NOT NULL, "
            f"done_at {big} NULL"
        )
        if self.name == MYSQL:
            keys = (f", KEY {t}_status (status, id), KEY {t}_key (order_key, id)"
                    if indexes else "")
            return [f"CREATE TABLE IF NOT EXISTS {t} ({columns}{keys}) ENGINE=InnoDB"]
        statements = [f"CREATE TABLE IF NOT EXISTS {t} ({columns})"]
        if not indexes:
            return statements
        if self.name == POSTGRES:  # partial indexes: sent rows waiting for deletion cost nothing
            statements += [
                f"CREATE INDEX IF NOT EXISTS {t}_pending ON {t} (id) WHERE status = 'PENDING'",
                f"CREATE INDEX IF NOT EXISTS {t}_key ON {t} (order_key, id) "
                "WHERE status IN ('PENDING', 'FAILED')",
                f"CREATE INDEX IF NOT EXISTS {t}_done ON {t} (done_at) "
                "WHERE status IN ('SENT', 'DISCARDED')",
            ]
        else:
            statements += [
                f"CREATE INDEX IF NOT EXISTS {t}_status ON {t} (status, id)",
                f"CREATE INDEX IF NOT EXISTS {t}_key ON {t} (order_key, id)",
            ]
        return statements

    def notify_statements(self) -> list[str]:
        """PostgreSQL: a statement-level trigger that NOTIFYs the channel ``schema.table``
        after inserts (``notify_channel`` finds that name for a relay).

        A notification is delivered only when the inserting transaction commits, and
        several in one transaction are delivered once: the relay wakes as soon as rows
        become visible, without polling.
        """
        t = self.table
        fn = f"{t}_notify"
        return [
            f"CREATE OR REPLACE FUNCTION {fn}() RETURNS trigger LANGUAGE plpgsql AS "
            f"$fn$ BEGIN PERFORM pg_notify(TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME, ''); "
            "RETURN NULL; END $fn$",
            f"DO $do$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = '{fn}' "
            f"AND tgrelid = '{t}'::regclass) THEN CREATE TRIGGER {fn} AFTER INSERT ON {t} "
            f"FOR EACH STATEMENT EXECUTE FUNCTION {fn}(); END IF; END $do$",
        ]


#: PostgreSQL: deadlock_detected, lock_not_available, serialization_failure.
_PG_LOCK_STATES = {"40P01", "55P03", "40001"}


def is_lock_conflict(exc: BaseException) -> bool:
    """Whether ``exc`` is a deadlock or a lock wait that gave up (any driver): the
    transaction was rolled back and may simply be tried again."""
    if is_lock_timeout(exc):  # SQLite busy/locked, MySQL 1205 / 1213
        return True
    return getattr(exc, "sqlstate", None) in _PG_LOCK_STATES


def is_undefined_table(exc: BaseException) -> bool:
    """Whether ``exc`` says the table does not exist (any driver)."""
    if isinstance(exc, sqlite3.OperationalError):
        return "no such table" in str(exc)
    name = type(exc).__name__
    if name == "UndefinedTableError":
        return True
    return bool(exc.args) and exc.args[0] == 1146  # MySQL ER_NO_SUCH_TABLE
