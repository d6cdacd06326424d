"""Fixtures for the helper tests: one throw-away database per test, SQLite and MySQL."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import pytest

MYSQL_URL = os.environ.get("HALFMQ_TEST_MYSQL", "mysql://root:@127.0.0.1:3306/test")


def _mysql_params() -> dict[str, Any]:
    u = urlsplit(MYSQL_URL)
    return {"host": u.hostname or "127.0.0.1", "port": u.port or 3306,
            "user": u.username or "root", "password": u.password or ""}


async def _mysql_admin(sql: str) -> None:
    import aiomysql

    conn = await aiomysql.connect(**_mysql_params(), autocommit=True, connect_timeout=3)
    try:
        async with conn.cursor() as cur:
            await cur.execute("SET SESSION sql_notes = 0")  # no "doesn't exist" warnings
            await cur.execute(sql)
    finally:
        conn.close()


class SqlDatabase:
    """A database of one kind; ``connect()`` yields a fresh connection with no open transaction."""

    def __init__(self, kind: str, path: str = "", mysql_db: str = "") -> None:
        self.kind = kind
        self.path = path
        self.mysql_db = mysql_db
        self.pool: Any = None

    @contextlib.asynccontextmanager
    async def connect(self, timeout: float = 5.0) -> AsyncIterator[Any]:
        if self.kind == "sqlite":
            import aiosqlite

            async with aiosqlite.connect(self.path, timeout=timeout, isolation_level=None) as c:
                yield c
        else:
            import aiomysql

            conn = await aiomysql.connect(**_mysql_params(), db=self.mysql_db, autocommit=False)
            try:
                yield conn
            finally:
                conn.close()

    def checker(self, lock_timeout: float = 5.0):
        from producer_sdk.local_tx import TxLogChecker

        if self.kind == "sqlite":
            return TxLogChecker.sqlite(self.path, lock_timeout=lock_timeout)
        return TxLogChecker(self.connect, lock_timeout=lock_timeout)


@pytest.fixture(params=["sqlite", "mysql"])
async def sqldb(request: pytest.FixtureRequest, tmp_path) -> AsyncIterator[SqlDatabase]:
    if request.param == "sqlite":
        yield SqlDatabase("sqlite", path=str(tmp_path / "app.db"))
        return
    try:
        import aiomysql  # noqa: F401
    except ImportError:
        pytest.skip("aiomysql is not installed")
    name = "halfmq_t_" + uuid.uuid4().hex[:12]
    try:
        await _mysql_admin(f"CREATE DATABASE {name}")
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"MySQL/MariaDB not reachable at {MYSQL_URL} ({exc}); "
                    "set HALFMQ_TEST_MYSQL=mysql://user:pass@host:port/db")
    try:
        yield SqlDatabase("mysql", mysql_db=name)
    finally:
        await _mysql_admin(f"DROP DATABASE IF EXISTS {name}")
