"""consumer_sdk.dedup: the consumer's work and its key in one local transaction."""

from __future__ import annotations

import asyncio

import pytest

from consumer_sdk.dedup import apply_once, claim_key, create_dedup_table
from producer_sdk.local_tx import execute


async def _setup(db) -> None:
    async with db.connect() as conn:
        await create_dedup_table(conn)
        await create_dedup_table(conn)  # idempotent
        await execute(conn, "CREATE TABLE counter (id INTEGER PRIMARY KEY, n INTEGER NOT NULL)")
        await execute(conn, "INSERT INTO counter (id, n) VALUES (1, 0)")
        await conn.commit()


async def _count(db) -> int:
    async with db.connect() as conn:
        rows = await execute(conn, "SELECT n FROM counter WHERE id = 1")
        await conn.commit()
        return rows[0][0]


async def _increment(conn) -> None:
    await execute(conn, "UPDATE counter SET n = n + 1 WHERE id = 1")


async def test_apply_once_twice_applies_once(sqldb):
    await _setup(sqldb)
    async with sqldb.connect() as conn:
        assert await apply_once(conn, "tx-1", _increment) is True
        assert await apply_once(conn, "tx-1", _increment) is False
        assert await apply_once(conn, "tx-2", _increment) is True
    assert await _count(sqldb) == 2


async def test_failed_work_records_nothing_and_can_be_retried(sqldb):
    await _setup(sqldb)

    async def failing(conn):
        await _increment(conn)
        raise RuntimeError("account 3 does not exist")

    async with sqldb.connect() as conn:
        with pytest.raises(RuntimeError):
            await apply_once(conn, "tx-1", failing)
        assert await _count(sqldb) == 0
        assert await apply_once(conn, "tx-1", _increment) is True
    assert await _count(sqldb) == 1


async def test_concurrent_duplicates_apply_once(sqldb):
    await _setup(sqldb)
    entered = asyncio.Event()
    release = asyncio.Event()

    async def slow(conn):
        entered.set()
        await release.wait()
        await _increment(conn)

    async def attempt():
        async with sqldb.connect(timeout=10) as conn:
            return await apply_once(conn, "tx-1", slow)

    first = asyncio.create_task(attempt())
    await asyncio.wait_for(entered.wait(), 10)
    second = asyncio.create_task(attempt())
    done, _ = await asyncio.wait({second}, timeout=0.3)
    assert not done, "the duplicate did not wait for the first transaction"
    release.set()
    results = await asyncio.wait_for(asyncio.gather(first, second), 15)
    assert sorted(results) == [False, True]
    assert await _count(sqldb) == 1


async def test_claim_key_inside_own_transaction(sqldb):
    await _setup(sqldb)
    async with sqldb.connect() as conn:
        if sqldb.kind == "sqlite":
            await conn.execute("BEGIN IMMEDIATE")
        else:
            await conn.begin()
        assert await claim_key(conn, "k") is True
        assert await claim_key(conn, "k") is False
        await conn.commit()
        with pytest.raises(ValueError):
            await claim_key(conn, "")
