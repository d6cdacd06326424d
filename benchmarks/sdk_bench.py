"""The SDKs' own CPU per message, in one process, without a broker or a socket.

How this works
--------------
``producer``: as applications write it -- one task per ``Producer.send`` with at most 256
in flight (a semaphore), the interpreter's default garbage-collector settings -- against a
stand-in for the connection that answers each SEND frame on the next loop iteration.
``consumer``: a ``PushConsumer(concurrency=64)`` whose push handler is fed DELIVER
payloads of 100 messages, one per loop iteration (as the connection's reader would hand
them on), with a listener that returns SUCCESS; its ACK frames go to a stand-in. Neither
encodes nor decodes frames or touches a socket: what is left is the SDK's own work per
message plus the asyncio machinery the pattern needs. ``--floor`` runs the producer
pattern with a bare future in place of ``send`` (what the task, the semaphore and one
future cost alone). ``tx``: the tx-users pattern, a task per
``TransactionProducer.send_in_transaction`` with at most 256 in flight, whose listener is a
plain ``def`` returning COMMIT (the SDK runs it in a worker thread; ``--sqlite``: the
benchmark's listener instead, a row inserted into an SQLite database in WAL mode and
committed; ``--batch``: the batch form of either listener, a ``BatchTransactionListener``,
one SQLite commit per batch), against a stand-in that answers each SEND and END_TX frame
on the next loop iteration. ``--address HOST:PORT`` runs ``producer`` or ``tx`` through the real
connection to a broker running there (``python -m broker --port 7600 --data-dir DIR
--flush async``): frames encoded, written, read and decoded as well; the broker's own work
is in its process. ``--window 1`` sends one message at a time (the latency cell's pattern).
``--workers N`` sets the transactional producer's ``execute_workers`` (0: the listener is
called on the event loop).

Prints the process's CPU time per message (``time.process_time``). On a shared machine
that moves with the other load; run it under ``valgrind --tool=cachegrind
--cache-sim=no`` with two ``--count`` values for instruction counts that do not.

``python -m benchmarks.sdk_bench producer|consumer|tx [--count N] [--floor] [--sqlite]
[--batch] [--window N] [--workers N] [--address HOST:PORT]``
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any

from producer_sdk import LocalTransactionState

__all__ = ["sdk_bench_main"]

WINDOW = 256
PER_FRAME = 100
BODY = b"x" * 1024


def _stand_in(producer: Any) -> None:
    """Make ``producer``'s connection a stand-in that answers each SEND (and END_TX) frame
    on the next loop iteration, without encoding it or touching a socket (the reply is
    handed to the request's callback, or its future, as the reader would)."""
    from protocol import Op

    loop = asyncio.get_running_loop()
    conn = producer._conn
    conn._loop = loop
    conn._ready = True  # handshaken, as far as the producer can tell
    position = 0

    def reply(op: int, payload: Any) -> Any:
        nonlocal position
        if op == Op.END_TX:
            return {"r": [None] * len(payload["items"])}
        rows = []
        for _ in payload["msgs"]:
            position += 1
            rows.append([position, 0, position])
        return {"p": "AC1F0001", "r": rows}

    def request_future(op: int, payload: Any, deadline: float) -> asyncio.Future[Any]:
        fut = loop.create_future()
        loop.call_soon(fut.set_result, reply(op, payload))
        return fut

    def request_callback(op: int, payload: Any, deadline: float, on_reply: Any) -> bool:
        loop.call_soon(on_reply, reply(op, payload), None)  # as the reader would
        return True

    conn.request_future = request_future
    conn.request_callback = request_callback


async def _producer(count: int, floor: bool, address: str | None = None, window: int = WINDOW) -> float:
    from producer_sdk import Producer

    loop = asyncio.get_running_loop()
    if address is not None:  # the real connection to a running broker
        async with Producer(address) as real:
            await real.send("t", BODY)
            return await _send_all(real.send, count, window)
    producer = Producer("127.0.0.1:1")
    _stand_in(producer)
    send: Any = producer.send
    if floor:
        waiting: list[asyncio.Future[Any]] = []

        def answer() -> None:
            batch = waiting[:]
            waiting.clear()

            def resolve() -> None:
                for f in batch:
                    f.set_result(None)

            loop.call_soon(resolve)

        async def bare(topic: str, body: bytes) -> None:
            fut = loop.create_future()
            if not waiting:
                loop.call_soon(answer)
            waiting.append(fut)
            await fut

        send = bare
    return await _send_all(send, count, window)


class _Commit:
    """The cheapest plain ``def`` local transaction: the SDK's hand-off alone."""

    def execute_local_transaction(self, message: Any, arg: Any) -> Any:
        return LocalTransactionState.COMMIT

    def check_local_transaction(self, message: Any) -> Any:
        return LocalTransactionState.COMMIT


class _CommitBatches(_Commit):
    """The cheapest batch listener: COMMIT for every transaction of the batch."""

    def execute_local_transaction_batch(self, batch: Any) -> Any:
        return [LocalTransactionState.COMMIT] * len(batch)


async def _tx(count: int, sqlite: bool, address: str | None = None, window: int = WINDOW,
              workers: int | None = None, batch: bool = False) -> float:
    import os
    import tempfile

    from benchmarks.systems.halfmq import _SqliteBatches, _SqliteTransaction
    from producer_sdk import BatchTransactionListener, TransactionListener, TransactionProducer

    if batch:
        base: type = _SqliteBatches if sqlite else _CommitBatches
        abc_base: type = BatchTransactionListener
    else:
        base = _SqliteTransaction if sqlite else _Commit
        abc_base = TransactionListener

    class Listener(base, abc_base):  # type: ignore[valid-type,misc]
        pass

    with tempfile.TemporaryDirectory(prefix="halfmq-sdk-bench-") as tmp:
        listener = Listener(os.path.join(tmp, "bank.sqlite"), wal=True) if sqlite else Listener()
        producer = TransactionProducer(address or "127.0.0.1:1", group="bench_tx_producer",
                                       listener=listener, send_timeout=30.0, execute_workers=workers)
        if address is None:
            _stand_in(producer)  # no broker: not started
        else:
            await producer.start()
        try:
            await producer.send_in_transaction("t", BODY)
            return await _send_all(producer.send_in_transaction, count, window)
        finally:
            await producer.close()


async def _send_all(send: Any, count: int, window: int = WINDOW) -> float:
    """The pattern: a task per ``send``, at most ``window`` in flight; the CPU it took."""
    slots = asyncio.Semaphore(window)

    async def one() -> None:
        try:
            await send("t", BODY)
        finally:
            slots.release()

    tasks: set[asyncio.Task[None]] = set()
    c0 = time.process_time()
    for _ in range(count):
        await slots.acquire()
        task = asyncio.create_task(one())
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await asyncio.wait(tasks)
    return time.process_time() - c0


async def _consumer(count: int) -> float:
    from consumer_sdk import ConsumeResult, PushConsumer
    from protocol import Op

    loop = asyncio.get_running_loop()
    done = loop.create_future()
    seen = 0

    async def listener(message: Any) -> ConsumeResult:
        nonlocal seen
        seen += 1
        if seen == count:
            done.set_result(None)
        return ConsumeResult.SUCCESS

    consumer = PushConsumer("127.0.0.1:1", group="g", topic="t", listener=listener,
                            concurrency=64, prefetch=1024)
    conn = consumer._conn
    conn._loop = loop
    conn._ready = True
    conn.generation = 1
    conn.send_nowait = lambda op, payload: True  # type: ignore[method-assign]
    consumer._workers = [asyncio.create_task(consumer._work()) for _ in range(consumer.concurrency)]
    frames = []
    offset = 0
    for _ in range(max(count // PER_FRAME, 1)):
        deliveries = []
        for _ in range(PER_FRAME):
            offset += 1
            deliveries.append([offset, [f"AC1F0001{offset:016X}", "t", BODY, None, [], {}, 1, 2, 0, offset, 0]])
        frames.append({"d": deliveries})
    await asyncio.sleep(0)
    c0 = time.process_time()
    for payload in frames:
        consumer._on_push(Op.DELIVER, payload)
        await asyncio.sleep(0)
    await done
    spent = time.process_time() - c0
    for task in consumer._workers:
        task.cancel()
    await asyncio.wait(consumer._workers)
    return spent


def sdk_bench_main(argv: list[str]) -> int:
    """``python -m benchmarks.sdk_bench``; see the module docstring."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.sdk_bench",
                                 description="the SDKs' own CPU per message, in one process")
    ap.add_argument("side", choices=("producer", "consumer", "tx"))
    ap.add_argument("--count", type=int, default=200_000, help="messages (default 200,000)")
    ap.add_argument("--floor", action="store_true",
                    help="producer: a bare future in place of send (the pattern's own cost)")
    ap.add_argument("--address", metavar="HOST:PORT",
                    help="producer: send to the broker running there through the real connection "
                         "(frames encoded and decoded, a socket) instead of the stand-in")
    ap.add_argument("--sqlite", action="store_true",
                    help="tx: the benchmark's listener (a row into SQLite in WAL mode) instead of "
                         "a plain def that returns COMMIT")
    ap.add_argument("--batch", action="store_true",
                    help="tx: the batch form of the listener (BatchTransactionListener)")
    ap.add_argument("--workers", type=int, default=None,
                    help="tx: the producer's execute_workers (default its own; 0: the listener on the "
                         "event loop)")
    ap.add_argument("--window", type=int, default=WINDOW,
                    help=f"producer, tx: sends in flight at most (default {WINDOW}; 1: one at a time)")
    args = ap.parse_args(argv)
    count = max(args.count - args.count % PER_FRAME, PER_FRAME)
    if args.side == "producer":
        runner = _producer(count, args.floor, args.address, args.window)
    elif args.side == "tx":
        runner = _tx(count, args.sqlite, args.address, args.window, args.workers, args.batch)
    else:
        runner = _consumer(count)
    try:
        import uvloop

        spent = uvloop.run(runner)
    except ImportError:  # pragma: no cover
        spent = asyncio.run(runner)
    what = "the pattern alone (--floor)" if args.floor else args.side
    unit = "transaction" if args.side == "tx" else "message"
    print(f"{what}: {spent / count * 1e6:.2f} us of CPU per {unit} ({count:,} {unit}s)")
    return 0


if __name__ == "__main__":
    sys.exit(sdk_bench_main(sys.argv[1:]))
