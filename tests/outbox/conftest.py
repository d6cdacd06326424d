"""Fixtures for the outbox: one throw-away database per test on SQLite, MariaDB/MySQL and
PostgreSQL (each skips with the reason when its server is not reachable).

PostgreSQL: one database per test run (``halfmq_t_<random>``, dropped at the end) and one
schema per test inside it, reached through ``?search_path=`` in the DSN, so parallel runs
and tests never see each other's tables or NOTIFY channels. MySQL: one database per test.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.bank.conftest import MYSQL_URL, _mysql_admin
from tests.outbox.outbox_helpers import OutboxDb

POSTGRES_URL = os.environ.get("HALFMQ_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")


def _with_database(url: str, name: str, query: str = "") -> str:
    u = urlsplit(url)
    return urlunsplit((u.scheme, u.netloc, "/" + name, query, ""))


async def _pg_admin(sql: str, url: str = POSTGRES_URL) -> None:
    import asyncpg

    conn = await asyncpg.connect(url, timeout=3)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def _run_apart(coro) -> None:
    """Run ``coro`` to completion on a loop of its own in another thread (this may be called
    while a test's event loop is running)."""
    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, coro).result()


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """The URL of a PostgreSQL database created for this test run (dropped afterwards)."""
    try:
        import asyncpg  # noqa: F401
    except ImportError:
        pytest.skip("asyncpg is not installed (pip install -e '.[test]')")
    name = "halfmq_t_" + uuid.uuid4().hex[:12]
    try:
        _run_apart(_pg_admin(f"CREATE DATABASE {name}"))
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"PostgreSQL not reachable at {POSTGRES_URL} ({exc}); "
                    "set HALFMQ_TEST_POSTGRES=postgresql://user@host:port/db")
    try:
        yield _with_database(POSTGRES_URL, name)
    finally:
        _run_apart(_pg_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


async def _make_db(kind: str, tmp_path, request: pytest.FixtureRequest) -> AsyncIterator[OutboxDb]:
    if kind == "sqlite":
        path = tmp_path / "app.db"
        db = OutboxDb("sqlite", f"sqlite:{path}")
        await db.set_wal()
        yield db
        return
    if kind.startswith("mysql"):
        name = "halfmq_t_" + uuid.uuid4().hex[:12]
        try:
            await _mysql_admin(f"CREATE DATABASE {name}")
        except Exception as exc:  # noqa: BLE001
            pytest.skip(f"MySQL/MariaDB not reachable at {MYSQL_URL} ({exc}); "
                        "set HALFMQ_TEST_MYSQL=mysql://user:pass@host:port/db")
        try:
            yield OutboxDb("mysql", _with_database(MYSQL_URL, name),
                           claim="lease" if kind == "mysql-lease" else "auto")
        finally:
            await _mysql_admin(f"DROP DATABASE IF EXISTS {name}")
        return
    base = request.getfixturevalue("pg_database")
    schema = "s_" + uuid.uuid4().hex[:12]
    await _pg_admin(f"CREATE SCHEMA {schema}", base)
    try:
        yield OutboxDb("postgres", base + f"?search_path={schema}")
    finally:
        await _pg_admin(f"DROP SCHEMA IF EXISTS {schema} CASCADE", base)


@pytest.fixture(params=["sqlite", "mysql", "postgres"])
async def outbox_db(request: pytest.FixtureRequest, tmp_path) -> AsyncIterator[OutboxDb]:
    """A fresh database of each kind (its outbox table not created yet)."""
    async for db in _make_db(request.param, tmp_path, request):
        yield db


@pytest.fixture(params=["sqlite", "mysql", "mysql-lease", "postgres"])
async def any_claim_db(request: pytest.FixtureRequest, tmp_path) -> AsyncIterator[OutboxDb]:
    """Like ``outbox_db``, plus MariaDB with the lease column instead of SKIP LOCKED."""
    async for db in _make_db(request.param, tmp_path, request):
        yield db


@pytest.fixture
async def server_db(request: pytest.FixtureRequest, tmp_path) -> AsyncIterator[OutboxDb]:
    """Parametrised by the test: ``mysql`` or ``postgres`` (servers with concurrent writers)."""
    async for db in _make_db(request.param, tmp_path, request):
        yield db
