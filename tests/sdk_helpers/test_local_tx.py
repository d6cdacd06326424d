"""producer_sdk.local_tx: the transaction log and the ready-made, race-free check-back."""

from __future__ import annotations

import asyncio

import pytest

from producer_sdk import LocalTransactionState, Message
from producer_sdk.local_tx import (
    AlreadyRolledBackError,
    TxLogListener,
    create_tx_log,
    execute,
    record_commit,
)

COMMIT = LocalTransactionState.COMMIT
ROLLBACK = LocalTransactionState.ROLLBACK
UNKNOWN = LocalTransactionState.UNKNOWN


async def _setup(db) -> None:
    async with db.connect() as conn:
        await create_tx_log(conn)
        await create_tx_log(conn)  # idempotent
        await execute(conn, "CREATE TABLE work (id VARCHAR(64) PRIMARY KEY)")
        await conn.commit()


async def _begin(conn, kind: str) -> None:
    if kind == "sqlite":
        await conn.execute("BEGIN IMMEDIATE")
    else:
        await conn.begin()


async def _still_waiting(task: asyncio.Task, for_seconds: float = 0.3) -> bool:
    """True if ``task`` has not finished within ``for_seconds`` (a bounded negative check)."""
    done, _ = await asyncio.wait({task}, timeout=for_seconds)
    return not done


async def test_no_local_transaction_means_rollback_and_blocks_a_late_commit(sqldb):
    await _setup(sqldb)
    checker = sqldb.checker()
    assert await checker.check("MSG-1") is ROLLBACK
    assert await checker.check("MSG-1") is ROLLBACK  # asked again: same answer
    async with sqldb.connect() as conn:
        await _begin(conn, sqldb.kind)
        await execute(conn, "INSERT INTO work (id) VALUES (?)", ("MSG-1",))
        with pytest.raises(AlreadyRolledBackError):
            await record_commit(conn, "MSG-1")
        await conn.rollback()
        assert await execute(conn, "SELECT COUNT(*) FROM work") == [(0,)]


async def test_committed_local_transaction_means_commit(sqldb):
    await _setup(sqldb)
    async with sqldb.connect() as conn:
        await _begin(conn, sqldb.kind)
        await execute(conn, "INSERT INTO work (id) VALUES (?)", ("MSG-2",))
        await record_commit(conn, "MSG-2")
        await record_commit(conn, "MSG-2")  # twice in the same transaction: harmless
        await conn.commit()
    checker = sqldb.checker()
    assert await checker.check("MSG-2") is COMMIT
    assert await checker.check("MSG-2") is COMMIT


@pytest.mark.parametrize("outcome", ["commit", "rollback"])
async def test_check_during_open_transaction_waits_for_its_end(sqldb, outcome):
    await _setup(sqldb)
    checker = sqldb.checker(lock_timeout=10)
    async with sqldb.connect() as conn:
        await _begin(conn, sqldb.kind)
        await execute(conn, "INSERT INTO work (id) VALUES (?)", ("MSG-3",))
        await record_commit(conn, "MSG-3")
        task = asyncio.create_task(checker.check("MSG-3"))
        assert await _still_waiting(task), "the check answered while the transaction was open"
        if outcome == "commit":
            await conn.commit()
        else:
            await conn.rollback()
        answer = await asyncio.wait_for(task, 10)
    assert answer is (COMMIT if outcome == "commit" else ROLLBACK)
    # the answer stands: a later check says the same, a late commit attempt is refused
    assert await checker.check("MSG-3") is answer
    if outcome == "rollback":
        async with sqldb.connect() as conn:
            await _begin(conn, sqldb.kind)
            with pytest.raises(AlreadyRolledBackError):
                await record_commit(conn, "MSG-3")
            await conn.rollback()


async def test_check_gives_up_with_unknown_when_the_transaction_runs_too_long(sqldb):
    await _setup(sqldb)
    checker = sqldb.checker(lock_timeout=1)
    async with sqldb.connect() as conn:
        await _begin(conn, sqldb.kind)
        await record_commit(conn, "MSG-4")
        assert await asyncio.wait_for(checker.check("MSG-4"), 15) is UNKNOWN
        await conn.commit()
    assert await checker.check("MSG-4") is COMMIT


async def test_tx_log_listener_answers_check_backs(sqldb):
    await _setup(sqldb)

    class Listener(TxLogListener):
        async def execute_local_transaction(self, message, arg):  # pragma: no cover
            return COMMIT

    listener = Listener(sqldb.checker())
    async with sqldb.connect() as conn:
        await _begin(conn, sqldb.kind)
        await record_commit(conn, "MSG-5")
        await conn.commit()
    assert await listener.check_local_transaction(Message("MSG-5", "t", b"")) is COMMIT
    assert await listener.check_local_transaction(Message("MSG-6", "t", b"")) is ROLLBACK


async def test_purge_keeps_recent_rows(sqldb):
    await _setup(sqldb)
    checker = sqldb.checker()
    assert await checker.check("MSG-7") is ROLLBACK
    assert await checker.purge(3600) == 0
    assert await checker.check("MSG-7") is ROLLBACK


async def test_bad_identifiers_and_ids_are_refused(sqldb):
    await _setup(sqldb)
    async with sqldb.connect() as conn:
        with pytest.raises(ValueError):
            await record_commit(conn, "x", table="t; DROP TABLE work")
        with pytest.raises(ValueError):
            await record_commit(conn, "")
    with pytest.raises(TypeError):
        await record_commit(object(), "x")


async def test_tx_log_batch_listener_commits_a_batch_in_one_transaction(sqldb, broker):
    """Through a broker: a ``TxLogBatchListener`` records every message of a batch in one
    local transaction; check-back answers COMMIT for those. A batch that fails records
    nothing: its callers get the error and check-back rolls each of its transactions back."""
    import json
    import urllib.request

    from producer_sdk import TransactionProducer, TxLogBatchListener
    from tests.conftest import wait_for

    await _setup(sqldb)
    checker = sqldb.checker()
    sizes: list[int] = []

    class Transfers(TxLogBatchListener):
        async def execute_local_transaction_batch(self, batch):
            sizes.append(len(batch))
            async with sqldb.connect() as conn:
                await _begin(conn, sqldb.kind)
                try:
                    for message, arg in batch:
                        await execute(conn, "INSERT INTO work (id) VALUES (?)", (message.msg_id,))
                        await record_commit(conn, message.msg_id)
                        if arg == "fail":
                            raise RuntimeError("the bank refused the batch")
                except BaseException:
                    await conn.rollback()
                    raise
                await conn.commit()
            return [COMMIT] * len(batch)

    def rolled_back() -> int:
        with urllib.request.urlopen(f"{broker.http_url}/api/transactions?state=rolled_back", timeout=10) as r:
            return len(json.loads(r.read())["transactions"])

    async with TransactionProducer(broker.address, group="txlog_batch", listener=Transfers(checker)) as p:
        done = await asyncio.gather(*(p.send_in_transaction("txlog-batch", b"%d" % i) for i in range(30)))
        assert all(r.state is COMMIT for r in done) and len(sizes) < 30, sizes
        for r in done:
            assert await checker.check(r.msg_id) is COMMIT
        failed = await asyncio.gather(*(p.send_in_transaction("txlog-batch", b"f", arg="fail") for _ in range(3)),
                                      return_exceptions=True)
        assert all(isinstance(e, RuntimeError) for e in failed), failed
        await wait_for(lambda: rolled_back() == 3, timeout=20, what="check-back to roll back the failed batch")
    async with sqldb.connect() as conn:
        assert await execute(conn, "SELECT COUNT(*) FROM work") == [(30,)]
