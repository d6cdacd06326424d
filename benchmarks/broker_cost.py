"""What a feature costs the broker per message: instructions or CPU time, through real sockets.

How this works
--------------
For each variant — ``plain``, ``secure`` (SCRAM login + TLS, as ``halfmq-secure`` in the
harness) and ``trace`` (``--trace``) — and each scenario, a broker process with
``--flush async`` (no disk wait in the figure) is started in a temporary directory, under
``valgrind --tool=cachegrind`` unless ``--cpu``. A producer in this process sends messages
of 1 KiB as applications do (a task per ``send``, 256 in flight); in ``e2e`` a
``PushConsumer(concurrency=64, prefetch=1024)`` of this process receives and acks every
one; ``tx`` is ``e2e`` with a ``TransactionProducer`` whose local transaction commits at
once (each message a half SEND and an END_TX). Under cachegrind each cell is run twice, with ``--count`` and ``--short`` messages, and
the broker stopped: the difference of the instructions it wrote, over the difference of
counts, is the broker's cost per message without its start, the handshake, the login and
the stop. With ``--cpu`` the cell runs once and the broker's CPU time
(``/proc/PID/schedstat`` of its main thread, the event loop) is read when the clients are
connected and again after the last ack, over ``--count``. Every variant is compared to
``plain`` of the same run.

Instruction counts do not move with the machine's other load, so small differences can
be trusted; CPU time is what a user pays, but moves with the load (and cachegrind's
instruction count weighs a ``rep movsb`` copy by its bytes). The client side is not
measured.

``python -m benchmarks.broker_cost [--variants plain,secure,trace] [--scenarios publish,e2e,tx]
[--count N] [--short N] [--cpu]``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Awaitable, Callable
from typing import Any

from benchmarks.lone_bench import _instructions

__all__ = ["broker_cost_main"]

BODY = b"x" * 1024
WINDOW = 256
VARIANTS = ("plain", "secure", "trace")
SCENARIOS = ("publish", "e2e", "tx")
START_TIMEOUT = 180.0  # a broker under cachegrind starts about 50 times slower


def _cpu_ns(pid: int) -> int:
    """A process's CPU time so far, in ns (its main thread's; the broker's loop)."""
    with open(f"/proc/{pid}/schedstat") as f:
        return int(f.read().split()[0])


async def _cell(variant: str, scenario: str, count: int, cpu: bool, workdir: str) -> int:
    """Run one broker through one cell; its instructions, or its CPU nanoseconds."""
    from benchmarks.systems.halfmq import READY_PREFIX, _NoopTransaction, _Secure
    from consumer_sdk import ConsumeResult, PushConsumer
    from producer_sdk import Producer, TransactionListener, TransactionProducer

    sec = _Secure() if variant == "secure" else None
    data_dir = tempfile.mkdtemp(prefix="data-", dir=workdir)
    out = os.path.join(workdir, f"cachegrind.{variant}.{scenario}.{count}")
    if sec is not None:
        from broker.security.cli import add_users_offline

        await add_users_offline(data_dir, {sec.USER: (sec.PASSWORD, sec.GRANTS)})
    cmd = [] if cpu else ["valgrind", "--tool=cachegrind", "--cache-sim=no", f"--cachegrind-out-file={out}"]
    cmd += [sys.executable, "-m", "broker", "--port", "0", "--http-port", "0", "--data-dir", data_dir,
            "--flush", "async", *(sec.broker_args() if sec else []), *(["--trace"] if variant == "trace" else [])]
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        stdin=asyncio.subprocess.DEVNULL, env=dict(os.environ, PYTHONHASHSEED="0"))
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), START_TIMEOUT)).decode()
        if not line.startswith(READY_PREFIX):
            raise RuntimeError(f"the broker did not start: {line!r}")
        address = dict(f.split("=", 1) for f in line[len(READY_PREFIX):].split())["tcp"]
        login: dict[str, Any] = {}
        if sec is not None:
            import ssl

            login = {"user": sec.USER, "password": sec.PASSWORD,
                     "tls": ssl.create_default_context(cafile=sec.ca_file)}
        received = 0
        all_in = asyncio.Event()

        async def on_message(_message: Any) -> ConsumeResult:
            nonlocal received
            received += 1
            if received >= count:
                all_in.set()
            return ConsumeResult.SUCCESS

        async with contextlib.AsyncExitStack() as stack:
            consumer = None
            if scenario != "publish":
                consumer = await stack.enter_async_context(PushConsumer(
                    address, group="cost", topic="t", listener=on_message, concurrency=64, prefetch=1024, **login))
            send: Callable[[str, bytes], Awaitable[Any]]
            if scenario == "tx":
                class Noop(_NoopTransaction, TransactionListener):
                    pass

                tx_producer = await stack.enter_async_context(TransactionProducer(
                    address, group="cost_tx", listener=Noop(), **login))
                send = tx_producer.send_in_transaction
            else:
                send = (await stack.enter_async_context(Producer(address, **login))).send
            start = _cpu_ns(proc.pid) if cpu else 0
            slots = asyncio.Semaphore(WINDOW)

            async def one() -> None:
                async with slots:
                    await send("t", BODY)

            await asyncio.gather(*(one() for _ in range(count)))
            if consumer is not None:
                await asyncio.wait_for(all_in.wait(), 30 + count / 50)
                await consumer.close()  # every ack answered: the broker has them all
        spent = _cpu_ns(proc.pid) - start if cpu else 0
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), START_TIMEOUT)
        return spent if cpu else _instructions(out)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        shutil.rmtree(data_dir, ignore_errors=True)
        if sec is not None:
            shutil.rmtree(sec.dir, ignore_errors=True)


async def _run(variants: list[str], scenarios: list[str], count: int, short: int, cpu: bool) -> None:
    what = f"ns of CPU, {count:,} messages" if cpu else f"instructions, {count:,} minus {short:,} messages"
    print(f"the broker's cost per message of 1 KiB (--flush async; {what})")
    print(f"{'variant':8} {'scenario':8} {'per message':>12} {'vs plain':>9}", flush=True)
    with tempfile.TemporaryDirectory(prefix="halfmq-cost-") as workdir:
        for scenario in scenarios:
            plain = None
            for variant in variants:
                if cpu:  # counted from the first send to the last ack
                    per = await _cell(variant, scenario, count, cpu, workdir) / count
                else:
                    long_ = await _cell(variant, scenario, count, cpu, workdir)
                    short_ = await _cell(variant, scenario, short, cpu, workdir)
                    per = (long_ - short_) / (count - short)
                if variant == "plain":
                    plain = per
                ratio = f"{per / plain:9.2f}" if plain else f"{'':9}"
                print(f"{variant:8} {scenario:8} {per:12,.0f} {ratio}", flush=True)


def broker_cost_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.broker_cost", description=__doc__.split("\n")[0])
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated: plain, secure, trace")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated: publish, e2e, tx")
    ap.add_argument("--count", type=int, default=8000, help="messages of the long run (default 8000)")
    ap.add_argument("--short", type=int, default=2000,
                    help="messages of the short run, subtracted (default 2000; not with --cpu)")
    ap.add_argument("--cpu", action="store_true", help="CPU time, no valgrind")
    args = ap.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    scenarios = [s for s in args.scenarios.split(",") if s]
    bad = [v for v in variants if v not in VARIANTS] + [s for s in scenarios if s not in SCENARIOS]
    if bad:
        ap.error(f"unknown variant or scenario {bad}")
    if args.count <= 0 or not (args.cpu or 0 < args.short < args.count):
        ap.error("need --count > 0 (and 0 < --short < --count without --cpu)")
    if not args.cpu and shutil.which("valgrind") is None:
        ap.error("valgrind is not installed: install it, or measure CPU time with --cpu")
    if "plain" in variants:  # the baseline first
        variants.remove("plain")
        variants.insert(0, "plain")
    asyncio.run(_run(variants, scenarios, args.count, args.short, args.cpu))
    return 0


if __name__ == "__main__":
    raise SystemExit(broker_cost_main())
