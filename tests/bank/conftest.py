"""Fixtures for the bank example: both banks' databases (SQLite and MySQL) and the services."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import pytest

MYSQL_URL = os.environ.get("HALFMQ_TEST_MYSQL", "mysql://root:@127.0.0.1:3306/test")


async def _mysql_admin(*statements: str) -> None:
    import aiomysql

    u = urlsplit(MYSQL_URL)
    conn = await aiomysql.connect(host=u.hostname or "127.0.0.1", port=u.port or 3306,
                                  user=u.username or "root", password=u.password or "",
                                  autocommit=True, connect_timeout=3)
    try:
        async with conn.cursor() as cur:
            await cur.execute("SET SESSION sql_notes = 0")  # no "doesn't exist" warnings
            for sql in statements:
                await cur.execute(sql)
    finally:
        conn.close()


async def _mysql_pair() -> AsyncIterator[tuple[str, str]]:
    """Two fresh MySQL databases (dropped afterwards); skips when MySQL is not reachable."""
    try:
        import aiomysql  # noqa: F401
    except ImportError:
        pytest.skip("aiomysql is not installed")
    try:
        await _mysql_admin("SELECT 1")
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"MySQL/MariaDB not reachable at {MYSQL_URL} ({exc}); "
                    "set HALFMQ_TEST_MYSQL=mysql://user:pass@host:port/db")
    u = urlsplit(MYSQL_URL)
    base = "halfmq_t_" + uuid.uuid4().hex[:12]
    root = f"mysql://{u.username or 'root'}:{u.password or ''}@{u.hostname}:{u.port or 3306}/"
    try:
        yield root + base + "_b1", root + base + "_b2"
    finally:
        await _mysql_admin(f"DROP DATABASE IF EXISTS {base}_b1", f"DROP DATABASE IF EXISTS {base}_b2")


@pytest.fixture(params=["sqlite", "mysql"])
async def bank_dbs(request: pytest.FixtureRequest, tmp_path) -> AsyncIterator[tuple[str, str]]:
    """``(bank1_db_url, bank2_db_url)``: two SQLite files, or two fresh MySQL databases."""
    if request.param == "sqlite":
        yield str(tmp_path / "bank1.db"), str(tmp_path / "bank2.db")
        return
    async for pair in _mysql_pair():
        yield pair


@pytest.fixture
async def mysql_bank_dbs() -> AsyncIterator[tuple[str, str]]:
    """Two fresh MySQL databases (the MySQL half of ``bank_dbs``)."""
    async for pair in _mysql_pair():
        yield pair


@pytest.fixture(params=["transaction", "outbox"])
def bank_mode(request: pytest.FixtureRequest) -> str:
    """How bank1 ships the transfer: a transactional message, or an outbox row and its relay."""
    return request.param


@pytest.fixture
async def banks(broker, bank_dbs, bank_mode):
    """bank1 and bank2 running in this process against the ``broker`` subprocess."""
    from examples.bank.bank1 import Bank1Service
    from examples.bank.bank2 import Bank2Service

    db1, db2 = bank_dbs
    bank1 = Bank1Service(db1, broker.address, port=0, mode=bank_mode)
    bank2 = Bank2Service(db2, broker.address, port=0, max_reconsume_times=2)
    async with bank1, bank2:
        yield bank1, bank2
