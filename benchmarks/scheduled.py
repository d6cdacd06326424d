"""Scheduled messages: how late are they when 10,000 a second come due?

How this works
--------------
``python -m benchmarks.scheduled`` starts a halfmq broker subprocess (fresh data dir) and,
per phase, a consumer in its own process (``python -m benchmarks.scheduled consumer``),
so that the producer in this process and the consumer do not share a CPU:

1. **plain** (the baseline of the same run): the producer sends plain messages at
   ``--rate`` a second for ``--seconds`` (a ``send_batch`` every 10 ms); the consumer
   measures publish→deliver latency (arrival minus ``born_timestamp``).
2. **scheduled**: the producer first schedules ``--rate`` × ``--seconds`` messages
   (``send_batch`` of ``--batch``), due one after the other at ``--rate`` a second from
   ``--lead`` seconds after the phase starts, so that scheduling is over before the first
   one is due. The consumer measures each one's *lateness*: arrival minus the time it was
   due (``Message.deliver_at``); broker, producer and consumer share the machine's clock.
   A negative lateness would be an early delivery.

The broker's CPU and RSS are sampled with psutil while messages come due. Printed and
written to ``--out-dir``/``scheduled-latest.{txt,json}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["scheduled_main", "run", "consumer_main"]

_PACE = 0.01  # s between two batches of the plain phase


def _summary(values: list[float]) -> dict[str, Any]:
    """Count, early count and quantiles (nearest rank) of latencies in ms."""
    values = sorted(values)
    n = len(values)

    def q(p: float) -> float | None:
        return round(values[min(n - 1, max(0, int(p * n + 0.5) - 1))], 3) if n else None

    return {"received": n, "early": sum(1 for v in values if v < 0), "min": q(0.0), "p50": q(0.5),
            "p99": q(0.99), "p99.9": q(0.999), "max": round(values[-1], 3) if n else None}


async def _consume(address: str, topic: str, count: int) -> None:
    from consumer_sdk import ConsumeResult, PushConsumer

    lat: list[float] = []
    done = asyncio.Event()

    async def on_message(m: Any) -> ConsumeResult:
        now = time.time() * 1000
        lat.append(now - (m.deliver_at if m.deliver_at is not None else m.born_timestamp))
        if len(lat) >= count:
            done.set()
        return ConsumeResult.SUCCESS

    async with PushConsumer(address, group=f"bench-{topic}", topic=topic, listener=on_message,
                            prefetch=1024, concurrency=64):
        print("READY", flush=True)
        await done.wait()
    print("R " + json.dumps(_summary(lat)), flush=True)


def consumer_main(argv: list[str]) -> int:
    """``python -m benchmarks.scheduled consumer ADDRESS TOPIC COUNT``: consume, print a summary."""
    address, topic, count = argv[0], argv[1], int(argv[2])
    _install_uvloop()
    asyncio.run(_consume(address, topic, count))
    return 0


async def _start_consumer(address: str, topic: str, count: int) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "benchmarks.scheduled", "consumer", address, topic, str(count),
        stdout=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL)
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 30)
    if line.strip() != b"READY":
        proc.kill()
        raise RuntimeError(f"consumer did not start: {line!r}")
    return proc


async def _result(proc: asyncio.subprocess.Process, timeout: float) -> dict[str, Any]:
    assert proc.stdout is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return {"received": 0, "error": f"no result within {timeout:.0f} s"}
    await proc.wait()
    return json.loads(line.decode()[2:])  # type: ignore[no-any-return]


async def run(*, rate: int, seconds: float, lead: float, batch: int, flush: str, workdir: str | None,
              size: int) -> dict[str, Any]:
    """One run of both phases (see the module docstring); returns the figures."""
    import psutil

    from benchmarks.systems.halfmq import start_broker
    from producer_sdk import Producer

    total = int(rate * seconds)
    body = b"s" * size
    out: dict[str, Any] = {"rate": rate, "seconds": seconds, "batch": batch, "flush": flush, "size": size,
                           "messages": total}
    broker = await start_broker(flush, workdir=workdir)
    proc = psutil.Process(broker.pid)

    async def watch(until: asyncio.Future[Any]) -> dict[str, Any]:
        """Broker CPU (% of one core) and peak RSS until ``until`` is done."""
        t0, c0 = time.time(), proc.cpu_times()
        rss = proc.memory_info().rss
        while not until.done():
            await asyncio.wait((until,), timeout=0.1)
            rss = max(rss, proc.memory_info().rss)
        c1 = proc.cpu_times()
        cpu = (c1.user + c1.system - c0.user - c0.system) / max(time.time() - t0, 1e-9) * 100
        return {"broker_cpu_percent": round(cpu, 1), "broker_rss_mb_peak": round(rss / (1 << 20), 1)}

    try:
        async with Producer(broker.address, send_timeout=30) as p:
            # 1. plain messages at the same rate: the baseline of this run
            consumer = await _start_consumer(broker.address, "plain", total)
            result = asyncio.ensure_future(_result(consumer, seconds + 60))
            per = max(1, round(rate * _PACE))
            start = time.monotonic()
            sends = []
            for k in range(0, total, per):
                delay = start + (k // per) * _PACE - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                sends.append(asyncio.ensure_future(p.send_batch("plain", [body] * min(per, total - k))))
            await asyncio.gather(*sends)
            out["plain"] = {**await result}
            # 2. scheduled messages coming due at the same rate
            consumer = await _start_consumer(broker.address, "sched", total)
            result = asyncio.ensure_future(_result(consumer, lead + seconds + 60))
            first_due = time.time() + lead
            t0 = time.perf_counter()
            pending = []
            for k in range(0, total, batch):
                items = [{"body": body, "deliver_at": first_due + (k + j) / rate} for j in range(min(batch, total - k))]
                pending.append(asyncio.ensure_future(p.send_batch("sched", items)))
                if len(pending) >= 4:
                    await pending.pop(0)
            await asyncio.gather(*pending)
            send_s = time.perf_counter() - t0
            if time.time() > first_due:
                print(f"warning: scheduling took {send_s:.1f} s, past the first due time; raise --lead",
                      file=sys.stderr)
            await asyncio.sleep(max(0.0, first_due - time.time()))
            load = await watch(result)
            out["scheduled"] = {**await result, "scheduling_msgs_per_s": round(total / send_s), **load}
    finally:
        await broker.stop()
    return out


def _report(res: dict[str, Any]) -> str:
    plain, sched = res["plain"], res["scheduled"]

    def row(name: str, r: dict[str, Any]) -> str:
        return (f"{name:<10} received {r.get('received', 0):>9,}  early {r.get('early')}  "
                f"p50 {r.get('p50')}  p99 {r.get('p99')}  p99.9 {r.get('p99.9')}  max {r.get('max')}"
                + (f"  ({r['error']})" if "error" in r else ""))

    return "\n".join([
        f"# scheduled messages, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
        f"settings: --flush {res['flush']}, {res['messages']:,} messages of {res['size']} B per phase at "
        f"{res['rate']:,}/s for {res['seconds']:g} s; scheduled by send_batch of {res['batch']}",
        "ms: plain = publish->deliver at that rate (baseline), scheduled = arrival - deliver_at",
        row("plain", plain),
        row("scheduled", sched),
        f"scheduling: {sched.get('scheduling_msgs_per_s', 0):,} msgs/s; broker while due: CPU "
        f"{sched.get('broker_cpu_percent')} % of one core, RSS peak {sched.get('broker_rss_mb_peak')} MB",
    ])


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    uvloop.install()


def scheduled_main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m benchmarks.scheduled``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["consumer"]:
        return consumer_main(argv[1:])
    ap = argparse.ArgumentParser(prog="python -m benchmarks.scheduled", description=__doc__.split("\n")[0])
    ap.add_argument("--rate", type=int, default=10_000, help="messages due per second (default 10000)")
    ap.add_argument("--seconds", type=float, default=10.0, help="how long they keep coming due (default 10)")
    ap.add_argument("--lead", type=float, default=8.0,
                    help="seconds from the start of scheduling to the first due time (default 8)")
    ap.add_argument("--batch", type=int, default=1000, help="send_batch size while scheduling (default 1000)")
    ap.add_argument("--size", type=int, default=1024, help="body bytes (default 1024)")
    ap.add_argument("--flush", choices=["sync", "async"], default="sync")
    ap.add_argument("--workdir", default=None, help="where the broker's data dir goes (default: temp dir)")
    ap.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    a = ap.parse_args(argv)
    _install_uvloop()
    res = asyncio.run(run(rate=a.rate, seconds=a.seconds, lead=a.lead, batch=a.batch, flush=a.flush,
                          workdir=a.workdir, size=a.size))
    text = _report(res)
    print(text)
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scheduled-latest.txt").write_text(text + "\n")
    (out / "scheduled-latest.json").write_text(json.dumps(res, indent=2) + "\n")
    sched = res["scheduled"]
    return 0 if sched.get("received") == res["messages"] and not sched.get("early") else 1


if __name__ == "__main__":
    sys.exit(scheduled_main())
