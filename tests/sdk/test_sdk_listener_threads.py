"""ListenerThreads (the threads of plain-def listener methods) on their own, and the
TransactionProducer's use of them against a real broker: context, errors, thread limits,
hand-back in batches and threads ended by close()."""

from __future__ import annotations

import asyncio
import contextvars
import threading

import pytest

from producer_sdk import LocalTransactionState, TransactionListener, TransactionProducer
from producer_sdk.listener_threads import DEFAULT_LISTENER_THREADS, ListenerThreads
from tests.conftest import wait_for

pytestmark = pytest.mark.timeout(30)

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


def _threads_named(prefix: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(prefix)]


async def test_results_exceptions_and_context():
    pool = ListenerThreads(asyncio.get_running_loop(), 3, "lt-basic")
    REQUEST_ID.set("r-1")
    assert await pool.run(lambda a, b: (a + b, REQUEST_ID.get(), threading.get_ident()), 2, 3) == (
        5, "r-1", pool._threads[0].ident)
    with pytest.raises(KeyError, match="nope"):
        await pool.run(lambda: {}["nope"])
    with pytest.raises(RuntimeError, match="StopIteration"):
        await pool.run(lambda: next(iter(())))

    def set_var() -> str:
        REQUEST_ID.set("changed in the thread")
        return REQUEST_ID.get()

    assert await pool.run(set_var) == "changed in the thread"
    assert REQUEST_ID.get() == "r-1"  # the thread ran in a copy of the caller's context
    pool.close()
    assert await pool.wait_closed(10)
    for t in pool._threads:
        t.join(10)
    assert not _threads_named("lt-basic")
    with pytest.raises(RuntimeError):
        pool.run(print)


async def test_at_most_size_threads_and_many_results_per_wake_up():
    loop = asyncio.get_running_loop()
    pool = ListenerThreads(loop, 2, "lt-limit")
    gate = threading.Event()
    running: list[int] = []
    lock = threading.Lock()

    def call(i: int) -> int:
        with lock:
            running.append(threading.get_ident())
        gate.wait(10)
        return i

    hand_backs = 0
    real = pool._hand_back

    def counted() -> None:
        nonlocal hand_backs
        hand_backs += 1
        real()

    pool._hand_back = counted  # type: ignore[method-assign]
    futs = [pool.run(call, i) for i in range(200)]
    deadline = loop.time() + 10
    while len(running) < 2 and loop.time() < deadline:
        await asyncio.sleep(0.001)
    assert pool.threads == 2 and len(set(running)) == 2
    gate.set()
    assert await asyncio.gather(*futs) == list(range(200))
    assert len(set(running)) == 2
    assert hand_backs < 200  # results came back several per loop wake-up
    pool.close()
    assert await pool.wait_closed(10)
    for t in pool._threads:
        t.join(10)
    assert not _threads_named("lt-limit")


async def test_a_call_cancelled_before_it_started_is_not_run():
    pool = ListenerThreads(asyncio.get_running_loop(), 1, "lt-cancel")
    gate = threading.Event()
    ran: list[str] = []
    first = pool.run(lambda: gate.wait(10))
    second = pool.run(ran.append, "second")
    second.cancel()
    gate.set()
    assert await first is True
    assert await pool.run(ran.append, "third") is None
    assert ran == ["third"]
    pool.close()
    assert await pool.wait_closed(10)


class ContextBank(TransactionListener):
    """Plain-def listener: records the context variable and thread it ran with."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def execute_local_transaction(self, message, arg):
        self.seen.append((REQUEST_ID.get(), threading.current_thread().name))
        if isinstance(arg, Exception):
            raise arg
        return LocalTransactionState.COMMIT

    def check_local_transaction(self, message):
        return LocalTransactionState.COMMIT


async def test_producer_plain_def_listener_context_errors_and_close(broker):
    listener = ContextBank()
    p = TransactionProducer(broker.address, group="lt_ctx", listener=listener, execute_workers=2)
    assert TransactionProducer(broker.address, group="lt_ctx", listener=listener).execute_workers == (
        DEFAULT_LISTENER_THREADS)
    with pytest.raises(ValueError):
        TransactionProducer(broker.address, group="lt_ctx", listener=listener, execute_workers=-1)
    async with p:
        async def one(i: int):
            REQUEST_ID.set(f"req-{i}")
            return await p.send_in_transaction("lt-tx", b"x")

        results = await asyncio.gather(*(one(i) for i in range(50)))
        assert all(r.state is LocalTransactionState.COMMIT for r in results)
        assert sorted(c for c, _ in listener.seen) == sorted(f"req-{i}" for i in range(50))
        assert {name for _, name in listener.seen} <= {"halfmq-tx-0", "halfmq-tx-1"}
        with pytest.raises(ZeroDivisionError):  # T5: re-raised
            await p.send_in_transaction("lt-tx", b"x", arg=ZeroDivisionError("boom"))
        threads = list(p._execute_pool._threads)
        assert threads and all(t.is_alive() for t in threads)
    for t in threads:  # close() ended them (each told the loop just before it returned)
        t.join(10)
        assert not t.is_alive()


async def test_execute_workers_0_runs_a_plain_def_listener_on_the_loop(broker):
    """``execute_workers=0``: a plain ``def`` local transaction is called on the event loop
    (no thread is started), sees the caller's context, and its exception is re-raised (T5);
    a listener that returns an awaitable is awaited. The transactions are delivered."""
    from consumer_sdk import ConsumeResult, PushConsumer

    class Both(ContextBank):
        def execute_local_transaction(self, message, arg):
            if arg == "awaitable":
                self.seen.append((REQUEST_ID.get(), threading.current_thread().name))

                async def later():
                    return LocalTransactionState.COMMIT
                return later()
            return super().execute_local_transaction(message, arg)

    listener = Both()
    got: list[bytes] = []

    async def on_message(message):
        got.append(message.body)
        return ConsumeResult.SUCCESS

    before = {t.name for t in threading.enumerate()}
    async with PushConsumer(broker.address, group="lt_inline_c", topic="lt-inline", listener=on_message), \
            TransactionProducer(broker.address, group="lt_inline", listener=listener, execute_workers=0) as p:
        async def one(i: int):
            REQUEST_ID.set(f"req-{i}")
            return await p.send_in_transaction("lt-inline", b"%d" % i, arg="awaitable" if i == 0 else None)

        results = await asyncio.gather(*(one(i) for i in range(20)))
        assert all(r.state is LocalTransactionState.COMMIT for r in results)
        assert sorted(c for c, _ in listener.seen) == sorted(f"req-{i}" for i in range(20))
        assert {name for _, name in listener.seen} == {threading.current_thread().name}
        with pytest.raises(ZeroDivisionError):  # T5: re-raised
            await p.send_in_transaction("lt-inline", b"x", arg=ZeroDivisionError("boom"))
        assert p._execute_pool is None
        assert not _threads_named("halfmq-tx") or {t.name for t in _threads_named("halfmq-tx")} <= before
        await wait_for(lambda: len(got) >= 20, timeout=20, what="the 20 committed transactions delivered")
    assert sorted(got) == sorted(b"%d" % i for i in range(20))  # the failed one: UNKNOWN, not delivered yet


async def test_execute_workers_0_runs_a_window_in_groups_whose_outcomes_go_out_between(broker, monkeypatch):
    """``execute_workers=0`` with 100 transactions whose half replies come back together: at
    most ``_INLINE_PER_ITERATION`` (here 10) listeners run in one loop iteration, and the
    outcomes of the first groups are on their way before the last group runs; every one is
    committed."""
    import producer_sdk.transaction as transaction

    monkeypatch.setattr(transaction, "_INLINE_PER_ITERATION", 10)
    loop = asyncio.get_running_loop()
    iteration = [0]

    def tick() -> None:  # once per loop iteration
        iteration[0] += 1
        handle[0] = loop.call_soon(tick)

    handle = [loop.call_soon(tick)]
    calls: list[tuple[int, int]] = []  # (loop iteration, END_TX batches flushed so far)
    flushed = [0]

    class Bank(TransactionListener):
        def execute_local_transaction(self, message, arg):
            calls.append((iteration[0], flushed[0]))
            return LocalTransactionState.COMMIT

        def check_local_transaction(self, message):
            return LocalTransactionState.COMMIT

    try:
        async with TransactionProducer(broker.address, group="lt_groups", listener=Bank(), execute_workers=0) as p:
            flush = p._flush_outcomes

            def counted() -> None:
                flushed[0] += 1
                flush()

            p._flush_outcomes = counted  # type: ignore[method-assign]
            results = await asyncio.gather(*(p.send_in_transaction("lt-groups", b"%d" % i) for i in range(100)))
    finally:
        handle[0].cancel()
    assert all(r.state is LocalTransactionState.COMMIT for r in results)
    per_iteration: dict[int, int] = {}
    for it, _ in calls:
        per_iteration[it] = per_iteration.get(it, 0) + 1
    assert len(calls) == 100 and max(per_iteration.values()) <= 10, per_iteration
    assert len(per_iteration) >= 10, per_iteration
    assert calls[-1][1] >= 1, "no outcome had gone out before the last group ran"


async def test_execute_workers_0_calls_waiting_listeners_in_order_in_their_callers_context(broker, monkeypatch):
    """Past ``_INLINE_PER_ITERATION`` (here 10) a local transaction waits for a later loop
    iteration: it still runs in send order, sees its caller's context variables, and its
    exception reaches its own caller only (the others commit)."""
    import producer_sdk.transaction as transaction

    monkeypatch.setattr(transaction, "_INLINE_PER_ITERATION", 10)
    who: contextvars.ContextVar[int] = contextvars.ContextVar("who")
    seen: list[tuple[int, bytes]] = []
    queued = [0]  # the most local transactions seen waiting at once

    class Bank(TransactionListener):
        def execute_local_transaction(self, message, arg):
            seen.append((who.get(), message.body))
            queued[0] = max(queued[0], len(p._inline_queue))
            if message.body == b"17":
                raise RuntimeError("the local database refused")
            return LocalTransactionState.COMMIT

        def check_local_transaction(self, message):
            return LocalTransactionState.COMMIT

    async with TransactionProducer(broker.address, group="lt_order", listener=Bank(), execute_workers=0) as p:
        async def one(i: int):
            who.set(i)
            return await p.send_in_transaction("lt-order", b"%d" % i)

        results = await asyncio.gather(*(one(i) for i in range(35)), return_exceptions=True)
    assert seen == [(i, b"%d" % i) for i in range(35)]
    assert queued[0] >= 10, queued  # (the window came back at once: most of it waited)
    assert isinstance(results[17], RuntimeError) and "refused" in str(results[17])
    assert all(r.state is LocalTransactionState.COMMIT for i, r in enumerate(results) if i != 17)
