"""End-to-end scenario (P producers → broker → C consumers) and the worker processes.

How this works
--------------
Every client in a benchmark runs in its own process, ``python -m benchmarks.e2e worker``,
so producer, consumer and server each get their own interpreter and their CPU can be
told apart. A worker talks to the harness over its stdin/stdout, one line each:

    worker → harness   READY                 connected, waiting
    harness → worker   GO                    start the clock
    worker → harness   P <n>                 (consumers) messages received so far
    harness → worker   STOP                  (consumers) finish and report
    worker → harness   R <json>              the result; the worker then exits

The loops below are the same for every system: ``window`` coroutines each publish one
message at a time (so at most ``window`` are unconfirmed) -- or, with ``style: "users"``, as
applications write it: one new task per send, at most ``window`` in flight, and the
interpreter's default garbage-collector settings -- one 1 KiB body per message
whose first 8 bytes are ``time.monotonic_ns()`` at publish (a system-wide clock on Linux,
so a consumer in another process reads publish→receive latency off the body).

Run standalone (``python -m benchmarks.e2e``) it is the halfmq end-to-end benchmark:
publish, one-at-a-time latency, producers and consumers together, transactional
sends beside normal ones, and the broker's RSS under a backlog with a slow consumer
(``--backlog 1000000`` for the full-size run).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib
import inspect
import json
import random
import struct
import sys
import time
from array import array
from typing import Any

__all__ = ["make_body", "BODY_SIZE", "worker_main", "e2e_main"]

BODY_SIZE = 1024
_STAMP = struct.Struct(">q")
_PAD_CACHE: dict[int, bytes] = {}
#: producer modes whose local transaction writes to SQLite (see benchmarks.systems.halfmq)
_TX_SQLITE_MODES = ("tx-sqlite", "tx-sqlite-wal", "tx-sqlite-inline", "tx-sqlite-batch", "tx-sqlite-batch-wal")


def _pad(size: int) -> bytes:
    pad = _PAD_CACHE.get(size)
    if pad is None:
        pad = _PAD_CACHE[size] = random.Random(size).randbytes(max(size - _STAMP.size, 0))
    return pad


def make_body(size: int = BODY_SIZE, stamp: int | None = None) -> bytes:
    """A ``size``-byte body starting with ``stamp`` (default: now, monotonic ns)."""
    return _STAMP.pack(time.monotonic_ns() if stamp is None else stamp) + _pad(size)


def _emit(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def _read_line() -> str:
    loop = asyncio.get_running_loop()
    return (await loop.run_in_executor(None, sys.stdin.readline)).strip()


def _load_client(module: str, conn: dict[str, Any]) -> Any:
    name = module if "." in module else f"benchmarks.systems.{module}"
    mod = importlib.import_module(name)
    return mod.Client(conn)


async def _produce(client: Any, p: dict[str, Any]) -> dict[str, Any]:
    mode = p.get("mode", "publish")  # publish | batch | tx | fifo | one of _TX_SQLITE_MODES
    users = p.get("style") == "users"  # one task per send, as applications write it
    window = int(p.get("window", 256))
    duration = float(p.get("duration", 3.0))
    warmup = float(p.get("warmup", 0.0))
    count = int(p.get("count", 0))  # > 0: exactly this many (no deadline)
    rate = float(p.get("rate", 0.0))  # > 0: paced to this many msgs/s in total
    batch = int(p.get("batch", 100))
    size = int(p.get("size", BODY_SIZE))
    pad = _pad(size)
    pack = _STAMP.pack
    now = time.monotonic_ns
    if mode == "batch":
        publish_batch = client.publish_batch
        per_call = batch
    else:
        publish = {"tx": client.publish_tx,
                   **{m: getattr(client, "publish_tx", None) for m in _TX_SQLITE_MODES},
                   "fifo": getattr(client, "publish_fifo", None)}.get(mode, client.publish)
        per_call = 1

    start = now()
    measure_from = start + int(warmup * 1e9)
    end = measure_from + int(duration * 1e9)
    lat = array("q")
    state = {"issued": 0, "counted": 0, "last": measure_from, "errors": 0}
    first_err: list[str] = []
    interval = 1e9 / rate * per_call if rate > 0 else 0.0

    async def loop_one() -> None:
        while True:
            i = state["issued"]
            if count:
                if i * per_call >= count:
                    return
            elif now() >= end:
                return
            state["issued"] = i + 1
            if interval:
                delay = (start + i * interval - now()) / 1e9
                if delay > 0:
                    await asyncio.sleep(delay)
            t0 = now()
            try:
                if per_call == 1:
                    await publish(pack(t0) + pad)
                else:
                    await publish_batch([pack(t0) + pad for _ in range(per_call)])
            except Exception as exc:  # noqa: BLE001 - count, report the first one
                state["errors"] += 1
                if not first_err:
                    first_err.append(f"{type(exc).__name__}: {exc}")
                continue
            t1 = now()
            if t0 >= measure_from:
                state["counted"] += per_call
                state["last"] = t1
                lat.append(t1 - t0)

    async def send_one(t0: int) -> None:
        try:
            await publish(pack(t0) + pad)
        except Exception as exc:  # noqa: BLE001 - count, report the first one
            state["errors"] += 1
            if not first_err:
                first_err.append(f"{type(exc).__name__}: {exc}")
            return
        finally:
            slots.release()
        t1 = now()
        if t0 >= measure_from:
            state["counted"] += 1
            state["last"] = t1
            lat.append(t1 - t0)

    async def task_per_send() -> None:
        tasks: set[asyncio.Task[None]] = set()
        while True:
            i = state["issued"]
            if count:
                if i >= count:
                    break
            elif now() >= end:
                break
            await slots.acquire()
            state["issued"] = i + 1
            task = asyncio.create_task(send_one(now()))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.wait(tasks)

    slots = asyncio.Semaphore(window)
    reporter = None
    if p.get("progress"):
        async def report() -> None:
            while True:
                _emit(f"P {state['counted']}")
                await asyncio.sleep(0.1)

        reporter = asyncio.ensure_future(report())
    if users and per_call == 1:
        await task_per_send()
    else:
        await asyncio.gather(*(loop_one() for _ in range(window)))
    if reporter is not None:
        reporter.cancel()
    issued_msgs = state["issued"] * per_call
    elapsed = max(state["last"] - measure_from, 1) / 1e9
    return {
        "count": state["counted"], "sent": issued_msgs - state["errors"] * per_call,
        "errors": state["errors"], "first_error": first_err[0] if first_err else None,
        "elapsed": elapsed, "rate": state["counted"] / elapsed,
        "t_first": start, "t_last": state["last"],
        "lat_us": [x // 1000 for x in lat],
    }


async def _consume(client: Any, p: dict[str, Any]) -> dict[str, Any]:
    now = time.monotonic_ns
    unpack = _STAMP.unpack_from
    lat = array("q")
    st = {"n": 0, "first": 0, "last": 0}
    keep = int(p.get("keep_latencies", 2_000_000))

    def on_body(body: bytes) -> None:
        t = now()
        n = st["n"] + 1
        st["n"] = n
        if n == 1:
            st["first"] = t
        st["last"] = t
        if n <= keep:
            lat.append(t - unpack(body)[0])

    # (a peer's client has no "concurrency": its consumer hands messages on one at a time)
    accepted = inspect.signature(client.open_consumer).parameters
    options = {k: p[k] for k in ("mode", "concurrency") if k in p and k in accepted}
    await client.open_consumer(on_body, prefetch=int(p.get("prefetch", 256)),
                               delay=float(p.get("delay", 0.0)), **options)
    _emit("READY")
    stop = asyncio.ensure_future(_read_line())
    reported = -1
    while not stop.done():
        if st["n"] != reported:
            reported = st["n"]
            _emit(f"P {reported}")
        await asyncio.wait([stop], timeout=0.05)
    await client.close()
    return {"count": st["n"], "t_first": st["first"], "t_last": st["last"],
            "lat_us": [x // 1000 for x in lat]}


async def _worker(args: argparse.Namespace) -> None:
    conn = json.loads(args.conn)
    params = json.loads(args.params)
    client = _load_client(args.system, conn)
    if args.role == "consumer":
        line = await _read_line()  # GO: the harness is ready to watch progress
        if line != "GO":
            return
        result = await _consume(client, params)
    else:
        mode = params.get("mode")
        await client.open_producer(**({"transactional": mode} if mode == "tx" or mode in _TX_SQLITE_MODES
                                     else {}))
        _emit("READY")
        if await _read_line() != "GO":
            await client.close()
            return
        try:
            result = await _produce(client, params)
        finally:
            await client.close()
    _emit("R " + json.dumps(result, separators=(",", ":")))


def worker_main(argv: list[str]) -> int:
    """``python -m benchmarks.e2e worker --system MOD --role producer|consumer --conn J --params J``."""
    ap = argparse.ArgumentParser(prog="benchmarks.e2e worker")
    ap.add_argument("--system", required=True, help="module under benchmarks.systems")
    ap.add_argument("--role", choices=("producer", "consumer"), required=True)
    ap.add_argument("--conn", required=True)
    ap.add_argument("--params", default="{}")
    args = ap.parse_args(argv)
    if json.loads(args.params).get("style") != "users":
        # every system's client runs in this same worker with the same settings: fewer young-
        # generation collections, as a tuned production client would have (the "users"
        # scenarios keep the interpreter's defaults, as most applications do)
        gc.freeze()
        gc.set_threshold(50_000, 20, 100)
    try:
        import uvloop

        uvloop.run(_worker(args))
    except ImportError:  # pragma: no cover
        asyncio.run(_worker(args))
    return 0


# -- the halfmq end-to-end benchmark --------- -------------------------------------------


def e2e_main(argv: list[str]) -> int:
    """The halfmq end-to-end scenario; see ``--help``."""

    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.e2e",
        description="halfmq end to end: P producer processes -> broker -> C consumer processes, "
                    "1 KiB bodies; publish, one-at-a-time latency, e2e, tx beside normal sends, "
                    "broker RSS under a backlog with a slow consumer.")
    ap.add_argument("--flush", choices=("sync", "async", "both"), default="both")
    ap.add_argument("--producers", type=int, default=1)
    ap.add_argument("--consumers", type=int, default=1)
    ap.add_argument("--window", type=int, default=256, help="unconfirmed sends per producer")
    ap.add_argument("--duration", type=float, default=3.0, help="seconds of measurement per step")
    ap.add_argument("--backlog", type=int, default=50_000,
                    help="messages of backlog for the RSS step (0 skips it; 1000000 for the full run)")
    ap.add_argument("--slow-consumer-delay", type=float, default=0.005,
                    help="seconds the slow consumer sleeps per message in the RSS step")
    ap.add_argument("--workdir", default=None, help="where broker data dirs go (default: system temp)")
    ap.add_argument("--out-dir", default=None,
                    help="where e2e-latest.txt/.json go (default benchmarks/results)")
    ap.add_argument("--json", default=None, help="also write the results as JSON here")
    args = ap.parse_args(argv)
    flushes = ("sync", "async") if args.flush == "both" else (args.flush,)
    from benchmarks.e2e_steps import run_e2e_steps  # (the harness imports this module's workers)

    return run_e2e_steps(
        flushes=flushes, producers=args.producers, consumers=args.consumers, window=args.window,
        duration=args.duration, backlog=args.backlog, slow_delay=args.slow_consumer_delay,
        workdir=args.workdir, json_out=args.json, out_dir=args.out_dir)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        sys.exit(worker_main(sys.argv[2:]))
    sys.exit(e2e_main(sys.argv[1:]))
