"""``BatchTransactionListener``: local transactions handed over in batches (one database
commit for many transactions), against a real broker: outcomes per transaction, batches
that grow with what is in flight, failures left to check-back, the thread / loop / async
variants, and a producer killed -9 between its batch's commit and its outcomes."""

from __future__ import annotations

import asyncio
import contextvars
import sqlite3
import sys
import threading

import pytest

from consumer_sdk import PushConsumer
from producer_sdk import BatchTransactionListener, LocalTransactionState, TransactionProducer
from producer_sdk.tx_batches import BATCH_MAX
from tests.conftest import ROOT, wait_for
from tests.sdk.schedule_helpers import Arrivals, admin

pytestmark = pytest.mark.timeout(60)

COMMIT, ROLLBACK, UNKNOWN = (LocalTransactionState.COMMIT, LocalTransactionState.ROLLBACK,
                             LocalTransactionState.UNKNOWN)
WHO: contextvars.ContextVar[str] = contextvars.ContextVar("who", default="nobody")


def _create_db(path: str) -> None:
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE transfers (msg_id TEXT PRIMARY KEY, batch INTEGER)")


def _rows(path: str) -> dict[str, int]:
    with sqlite3.connect(path) as db:
        return dict(db.execute("SELECT msg_id, batch FROM transfers").fetchall())


class SqliteBatches(BatchTransactionListener):
    """One SQLite transaction per batch: a row per committed transaction (the arg
    ``"rollback"`` rolls one back, ``"unknown"`` leaves it to check-back), one commit."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sizes: list[int] = []
        self.seen: list[tuple[str, str]] = []  # (context variable, thread name) per batch
        self._db: sqlite3.Connection | None = None

    def execute_local_transaction_batch(self, batch):
        if self._db is None:
            self._db = sqlite3.connect(self.path, check_same_thread=False)
        self.sizes.append(len(batch))
        self.seen.append((WHO.get(), threading.current_thread().name))
        states = []
        with self._db:
            for message, arg in batch:
                if arg == "rollback":
                    states.append(ROLLBACK)
                elif arg == "unknown":
                    states.append("UNKNOWN")  # a string is taken too, as from execute_local_transaction
                else:
                    self._db.execute("INSERT INTO transfers VALUES (?, ?)", (message.msg_id, len(self.sizes)))
                    states.append(COMMIT)
        return states

    def check_local_transaction(self, message):
        with sqlite3.connect(self.path) as db:
            row = db.execute("SELECT 1 FROM transfers WHERE msg_id = ?", (message.msg_id,)).fetchone()
        return COMMIT if row else ROLLBACK


async def _send_all(p: TransactionProducer, topic: str, args: list[object]) -> list:
    async def one(i: int, arg: object):
        WHO.set(f"caller-{i}")
        return await p.send_in_transaction(topic, b"%d" % i, arg=arg)

    return await asyncio.gather(*(one(i, a) for i, a in enumerate(args)))


@pytest.mark.parametrize("workers", [None, 0])
async def test_batches_commit_each_transaction_once_and_grow_with_what_is_in_flight(broker, tmp_path, workers):
    """300 transactions at once, a plain ``def`` batch listener in a thread (or on the loop
    with ``execute_workers=0``): far fewer calls than transactions, each transaction's own
    outcome reported (commits delivered and in the database, rollbacks neither, an UNKNOWN
    one resolved by check-back), no caller's context seen by a batch."""
    db = str(tmp_path / "bank.sqlite")
    _create_db(db)
    listener = SqliteBatches(db)
    rec = Arrivals()
    args: list[object] = ["rollback" if i % 10 == 3 else "unknown" if i == 7 else None for i in range(300)]
    async with PushConsumer(broker.address, group="txb_c", topic=f"txb-{workers}", listener=rec), \
            TransactionProducer(broker.address, group=f"txb_p{workers}", listener=listener,
                                execute_workers=workers) as p:
        results = await _send_all(p, f"txb-{workers}", args)
        assert [r.state for r in results] == [
            ROLLBACK if a == "rollback" else UNKNOWN if a == "unknown" else COMMIT for a in args]
        rows = _rows(db)
        committed = {r.msg_id for r, a in zip(results, args, strict=True) if a is None}
        assert set(rows) == committed
        assert sum(listener.sizes) == 300 and p._batches is not None and p._batches.transactions == 300
        assert len(listener.sizes) < 30 and max(listener.sizes) > 10, listener.sizes
        assert {who for who, _ in listener.seen} == {"nobody"}  # a batch is no one caller's
        names = {name for _, name in listener.seen}
        assert names == ({threading.current_thread().name} if workers == 0 else {"halfmq-tx-0"})
        # the UNKNOWN one has no row: check-back rolls it back; the commits are delivered
        await wait_for(lambda: set(rec.ids()) >= committed, timeout=20, what="the committed transactions delivered")
        unknown = results[7].msg_id

        def resolved() -> bool:
            status, view = admin(broker.http_url, f"/api/messages/{unknown}")
            return status == 200 and view.get("transaction", {}).get("state") == "ROLLED_BACK"

        await wait_for(resolved, timeout=20, what="check-back to roll back the UNKNOWN transaction")
    assert set(rec.ids()) == committed


async def test_an_async_batch_listener_is_awaited_and_its_failures_are_left_to_check_back(broker):
    """An ``async def`` batch listener is awaited on the loop. A batch that raises leaves
    every transaction in it UNKNOWN: each caller gets the exception and check-back decides;
    a result of the wrong length is refused the same way (``TypeError``)."""
    calls: list[list[bytes]] = []
    mode = ["ok"]

    class Async(BatchTransactionListener):
        async def execute_local_transaction_batch(self, batch):
            calls.append([m.body for m, _ in batch])
            await asyncio.sleep(0)
            if mode[0] == "raise":
                raise RuntimeError("the database refused the batch")
            if mode[0] == "short":
                return [COMMIT] * (len(batch) - 1)
            return [COMMIT for _ in batch]

        async def check_local_transaction(self, message):
            return COMMIT

    rec = Arrivals()
    async with PushConsumer(broker.address, group="txa_c", topic="txa", listener=rec), \
            TransactionProducer(broker.address, group="txa_p", listener=Async()) as p:
        ok = await _send_all(p, "txa", [None] * 20)
        assert all(r.state is COMMIT for r in ok) and len(calls) < 20
        mode[0] = "raise"
        failed = await asyncio.gather(*(p.send_in_transaction("txa", b"f%d" % i) for i in range(5)),
                                      return_exceptions=True)
        assert all(isinstance(e, RuntimeError) and "refused the batch" in str(e) for e in failed), failed
        mode[0] = "short"
        short = await asyncio.gather(*(p.send_in_transaction("txa", b"s%d" % i) for i in range(5)),
                                     return_exceptions=True)
        assert all(isinstance(e, TypeError) and "one LocalTransactionState per transaction" in str(e)
                   for e in short), short
        assert p._execute_pool is None  # no thread for an async listener
        # check-back (COMMIT) settles the ten left UNKNOWN: all 30 delivered
        await wait_for(lambda: len(set(m.body for _, m in rec.messages)) >= 30, timeout=20,
                       what="the UNKNOWN transactions committed by check-back")
    bodies = {m.body for _, m in rec.messages}
    assert bodies == {b"%d" % i for i in range(20)} | {b"f%d" % i for i in range(5)} | {b"s%d" % i for i in range(5)}


async def test_a_batch_holds_at_most_batch_max_transactions(broker, monkeypatch):
    import producer_sdk.tx_batches as tx_batches

    monkeypatch.setattr(tx_batches, "BATCH_MAX", 16)
    sizes: list[int] = []

    class Count(BatchTransactionListener):
        def execute_local_transaction_batch(self, batch):
            sizes.append(len(batch))
            return [COMMIT] * len(batch)

        def check_local_transaction(self, message):
            return COMMIT

    async with TransactionProducer(broker.address, group="txm_p", listener=Count(), execute_workers=0) as p:
        results = await _send_all(p, "txm", [None] * 100)
    assert all(r.state is COMMIT for r in results)
    assert sum(sizes) == 100 and max(sizes) == 16, sizes
    assert BATCH_MAX == 1024


@pytest.mark.timeout(180)
async def test_a_producer_killed_between_its_batch_commit_and_the_outcomes_loses_nothing(broker, tmp_path):
    """A producer process commits a batch to SQLite and is SIGKILLed before reporting any of
    its outcomes, with more halves stored and not run yet. Check-back, answered by another
    producer of the group from the same database, settles every one: exactly the
    transactions with a row are committed and delivered, each once; the others are rolled
    back."""
    db = str(tmp_path / "bank.sqlite")
    _create_db(db)
    rec = Arrivals()

    class Checker(BatchTransactionListener):
        def execute_local_transaction_batch(self, batch):
            raise AssertionError("this producer only answers check-backs")

        def check_local_transaction(self, message):
            with sqlite3.connect(db) as conn:
                row = conn.execute("SELECT 1 FROM transfers WHERE msg_id = ?", (message.msg_id,)).fetchone()
            return COMMIT if row else ROLLBACK

    async with PushConsumer(broker.address, group="txk_c", topic="txk", listener=rec):
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.sdk.tx_batch_child", broker.address, db, "txk_p", "txk", "500",
            cwd=ROOT, stderr=asyncio.subprocess.PIPE)
        try:
            _, stderr = await asyncio.wait_for(child.communicate(), 40)
        finally:
            if child.returncode is None:
                child.kill()
                await child.wait()
        code = child.returncode
        assert code == -9, (code, stderr[-2000:].decode(errors="replace"))
        rows = _rows(db)
        last = max(rows.values())
        in_last = {m for m, b in rows.items() if b == last}
        assert len(rows) >= 500 and in_last
        async with TransactionProducer(broker.address, group="txk_p", listener=Checker()):
            async def settled() -> bool:
                # (in a thread: this loop also runs the producer that answers the check-backs)
                status, page = await asyncio.to_thread(admin, broker.http_url, "/api/transactions?state=prepared")
                return status == 200 and not page["transactions"]

            await wait_for(settled, timeout=90, interval=0.2, what="check-back to settle every half message")
            await wait_for(lambda: set(rec.ids()) >= set(rows), timeout=20, what="every committed row delivered")
            committed: set[str] = set()
            after = ""
            while True:
                _, page = admin(broker.http_url, f"/api/transactions?state=committed&limit=1000&after={after}")
                committed |= {t["msg_id"] for t in page["transactions"]}
                if page["next"] is None:
                    break
                after = page["next"]
    assert committed == set(rows)  # the killed batch's too, by check-back
    assert set(rec.ids()) == set(rows), "a transaction delivered without its row, or a row's not delivered"


async def test_close_lets_the_running_batch_finish_and_runs_no_other(broker):
    """``close()`` while a batch runs and five transactions wait for the next: the running
    one finishes (its outcome is left to check-back once the connection is gone), the five
    are not run and their callers get ``BrokerUnavailableError``."""
    from protocol import BrokerUnavailableError

    started, gate = threading.Event(), threading.Event()
    sizes: list[int] = []

    class Slow(BatchTransactionListener):
        def execute_local_transaction_batch(self, batch):
            started.set()
            gate.wait(10)
            sizes.append(len(batch))
            return [COMMIT] * len(batch)

        def check_local_transaction(self, message):
            return COMMIT

    p = TransactionProducer(broker.address, group="txc_p", listener=Slow(), execute_workers=1)
    await p.start()
    first = asyncio.ensure_future(p.send_in_transaction("txc", b"first"))
    await wait_for(started.is_set, what="the first batch to start")
    rest = [asyncio.ensure_future(p.send_in_transaction("txc", b"%d" % i)) for i in range(5)]
    await wait_for(lambda: p._batches is not None and len(p._batches._pending) == 5, what="five waiting")
    closing = asyncio.ensure_future(p.close())
    await wait_for(lambda: p._batches is not None and p._batches._closed, what="close() to begin")
    gate.set()
    await closing
    results = await asyncio.gather(first, *rest, return_exceptions=True)
    assert not isinstance(results[0], Exception), repr(results[0])
    assert results[0].state is COMMIT and sizes == [1], (results, sizes)
    assert all(isinstance(r, BrokerUnavailableError) and "not run" in str(r) for r in results[1:]), results
