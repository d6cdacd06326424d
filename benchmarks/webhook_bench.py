"""Webhook benchmark: deliveries/s from a broker to a local HTTP receiver.

How this works
--------------
Three processes, so their CPU can be told apart: a broker (``python -m broker``, ``--flush
sync`` by default), a receiver (this module with ``--receiver``: an aiohttp server on
uvloop that verifies every request's signature with ``consumer_sdk.WebhookVerifier``,
unless ``--no-verify``, and answers 204), and this process, which sends and measures.

- **drain, concurrency c**: ``--messages`` bodies of ``--size`` bytes are stored first
  (``send_batch``) in a topic of their own; then a webhook with ``start=earliest`` and
  concurrency c is added, and the clock runs from the add until the receiver has counted
  every message: deliveries/s, and the broker's and the receiver's CPU over that time.
- **raw HTTP**: this process POSTs the same number of signed requests straight to the
  receiver, c at a time, with the same client library: the HTTP ceiling of the machine,
  so a drain's rate reads as a share of it.
- **consumer drain**: the same backlog drained by a ``PushConsumer`` over the native
  protocol, in this process, for scale.
- **live**: with a webhook of concurrency 8 (or the first one given) in place, the
  producer sends one message at a time at half that concurrency's drain rate; every body starts with
  ``time.monotonic_ns()`` at send, so the receiver reads send→POST received latency
  (p50/p99) off the body (one clock on Linux).

    python -m benchmarks.webhook_bench [--messages 5000] [--concurrency 1,8,32,64]
        [--size 1024] [--flush sync|async] [--no-verify] [--out-dir benchmarks/results]

Results go to ``<out-dir>/webhook-latest.{txt,json}`` and the table to standard output.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from array import array
from pathlib import Path
from typing import Any

__all__ = ["bench_main"]

ROOT = Path(__file__).resolve().parents[1]
SECRET = "benchmark-secret-0123456789"


# -- the receiver process ----------------------------------------------------------------


def _receiver_main(verify: bool) -> int:
    import uvloop
    from aiohttp import web

    from consumer_sdk import WebhookVerificationError, WebhookVerifier

    verifier = WebhookVerifier(SECRET, max_remembered=1_000_000) if verify else None
    state: dict[str, Any] = {"count": 0, "ids": set(), "lat": array("q"), "refused": 0}

    async def hook(request: web.Request) -> web.Response:
        body = await request.read()
        if verifier is not None:
            try:
                verifier.verify(request.headers, body)
            except WebhookVerificationError:
                state["refused"] += 1
                return web.Response(status=401)
        state["count"] += 1
        state["ids"].add(request.headers.get("halfmq-id"))
        if len(body) >= 8:
            state["lat"].append(time.monotonic_ns() - int.from_bytes(body[:8], "big"))
        return web.Response(status=204)

    async def stats(_request: web.Request) -> web.Response:
        lat = sorted(state["lat"])

        def pct(p: float) -> float | None:
            return round(lat[min(len(lat) - 1, int(p * len(lat)))] / 1e6, 3) if lat else None

        return web.json_response({"count": state["count"], "unique": len(state["ids"]),
                                  "refused": state["refused"], "p50_ms": pct(0.5), "p99_ms": pct(0.99),
                                  "cpu": sum(os.times()[:2])})

    async def reset(_request: web.Request) -> web.Response:
        state.update(count=0, ids=set(), lat=array("q"), refused=0)
        return web.json_response({})

    async def run() -> None:
        app = web.Application()
        app.router.add_post("/hook", hook)
        app.router.add_get("/stats", stats)
        app.router.add_post("/reset", reset)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        print(site._server.sockets[0].getsockname()[1], flush=True)  # type: ignore[union-attr]  # noqa: SLF001
        await asyncio.Event().wait()

    uvloop.run(run())
    return 0


# -- the measuring side ----------------------------------------------------------------------


def _cpu_of(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _Bench:
    def __init__(self, a: argparse.Namespace, http: str, address: str, broker_pid: int, rx_port: int,
                 rx_pid: int) -> None:
        self.a, self.http, self.address = a, http, address
        self.broker_pid, self.rx_pid = broker_pid, rx_pid
        self.rx = f"http://127.0.0.1:{rx_port}"
        self.session: Any = None

    async def _json(self, method: str, url: str, body: Any = None) -> Any:
        async with self.session.request(method, url, json=body) as r:
            data = await r.json()
            if r.status >= 300:
                raise RuntimeError(f"{method} {url}: HTTP {r.status}: {data}")
            return data

    async def _fill(self, topic: str) -> None:
        from benchmarks.e2e import make_body
        from producer_sdk import Producer

        async with Producer(self.address) as p:
            left = self.a.messages
            while left:
                n = min(left, 1000)
                await p.send_batch(topic, [make_body(self.a.size, 0) for _ in range(n)])
                left -= n

    async def _wait_count(self, n: int, timeout: float = 600.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            st = await self._json("GET", f"{self.rx}/stats")
            if st["count"] >= n:
                return st  # type: ignore[no-any-return]
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {st['count']} of {n} deliveries after {timeout}s")
            await asyncio.sleep(0.01)

    async def drain(self, concurrency: int, tag: str) -> dict[str, Any]:
        """Deliveries/s of a backlog through a webhook of ``concurrency``."""
        topic, name = f"whb-{tag}-c{concurrency}", f"whb-{tag}-c{concurrency}"
        await self._fill(topic)
        await self._json("POST", f"{self.rx}/reset")
        cpu_b, cpu_r = _cpu_of(self.broker_pid), _cpu_of(self.rx_pid)
        t0 = time.perf_counter()
        await self._json("POST", f"{self.http}/api/webhooks", {
            "name": name, "topic": topic, "url": f"{self.rx}/hook", "secret": SECRET,
            "concurrency": concurrency, "start": "earliest", "timeout": "10s"})
        st = await self._wait_count(self.a.messages)
        elapsed = time.perf_counter() - t0
        cpu_b, cpu_r = _cpu_of(self.broker_pid) - cpu_b, _cpu_of(self.rx_pid) - cpu_r
        await self._json("DELETE", f"{self.http}/api/webhooks/{name}")
        n = self.a.messages
        return {"scenario": "drain", "concurrency": concurrency, "messages": n, "seconds": round(elapsed, 3),
                "rate": round(n / elapsed), "duplicates": st["count"] - st["unique"], "refused": st["refused"],
                "broker_cpu_pct": round(100 * cpu_b / elapsed, 1), "receiver_cpu_pct": round(100 * cpu_r / elapsed, 1),
                "broker_cpu_us_per_delivery": round(1e6 * cpu_b / n, 1)}

    async def raw_http(self, concurrency: int) -> dict[str, Any]:
        """The HTTP ceiling: this process POSTs signed requests straight to the receiver,
        ``concurrency`` at a time (the same body, headers and client library)."""
        import aiohttp

        from benchmarks.e2e import make_body
        from protocol.webhooks import signature_header

        n = self.a.messages
        body = make_body(self.a.size, 0)
        todo = iter(range(n))
        await self._json("POST", f"{self.rx}/reset")
        cpu_r = _cpu_of(self.rx_pid)

        async def loop(s: aiohttp.ClientSession) -> None:
            for i in todo:
                msg_id, ts = f"{i:024X}", int(time.time() * 1000)
                headers = {"halfmq-id": msg_id, "halfmq-timestamp": str(ts),
                           "halfmq-signature": signature_header([SECRET], msg_id, ts, body)}
                async with s.post(f"{self.rx}/hook", data=body, headers=headers) as r:
                    await r.read()

        t0 = time.perf_counter()
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as s:
            await asyncio.gather(*(loop(s) for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
        cpu_r = _cpu_of(self.rx_pid) - cpu_r
        return {"scenario": "raw HTTP (no broker)", "concurrency": concurrency, "messages": n,
                "seconds": round(elapsed, 3), "rate": round(n / elapsed), "broker_cpu_pct": "-",
                "receiver_cpu_pct": round(100 * cpu_r / elapsed, 1), "broker_cpu_us_per_delivery": "-"}

    async def consumer_drain(self, tag: str) -> dict[str, Any]:
        """The same backlog drained by a PushConsumer (native protocol), for scale."""
        from consumer_sdk import ConsumeResult, PushConsumer

        topic = f"whb-{tag}-consumer"
        await self._fill(topic)
        done = asyncio.Event()
        seen = 0

        async def on_message(_m: Any) -> ConsumeResult:
            nonlocal seen
            seen += 1
            if seen >= self.a.messages:
                done.set()
            return ConsumeResult.SUCCESS

        cpu_b = _cpu_of(self.broker_pid)
        t0 = time.perf_counter()
        async with PushConsumer(self.address, group=topic, topic=topic, listener=on_message, start="earliest"):
            await asyncio.wait_for(done.wait(), 600)
            elapsed = time.perf_counter() - t0
        cpu_b = _cpu_of(self.broker_pid) - cpu_b
        n = self.a.messages
        return {"scenario": "consumer drain", "concurrency": 16, "messages": n, "seconds": round(elapsed, 3),
                "rate": round(n / elapsed), "broker_cpu_pct": round(100 * cpu_b / elapsed, 1),
                "broker_cpu_us_per_delivery": round(1e6 * cpu_b / n, 1)}

    async def live(self, rate: float, concurrency: int, tag: str) -> dict[str, Any]:
        """Send one at a time at ``rate``/s through a webhook of ``concurrency``; latency."""
        from benchmarks.e2e import make_body
        from producer_sdk import Producer

        topic = name = f"whb-{tag}-live"
        n = max(100, min(self.a.messages, int(rate * 5)))
        await self._json("POST", f"{self.http}/api/webhooks", {
            "name": name, "topic": topic, "url": f"{self.rx}/hook", "secret": SECRET, "concurrency": concurrency})
        await self._json("POST", f"{self.rx}/reset")
        async with Producer(self.address) as p:
            t0 = time.perf_counter()
            for i in range(n):
                await p.send(topic, make_body(self.a.size))
                ahead = t0 + (i + 1) / rate - time.perf_counter()
                if ahead > 0:
                    await asyncio.sleep(ahead)
        st = await self._wait_count(n)
        await self._json("DELETE", f"{self.http}/api/webhooks/{name}")
        return {"scenario": "live", "concurrency": concurrency, "messages": n, "rate": round(rate),
                "p50_ms": st["p50_ms"], "p99_ms": st["p99_ms"], "duplicates": st["count"] - st["unique"]}

    async def run(self) -> list[dict[str, Any]]:
        import aiohttp

        out = []
        async with aiohttp.ClientSession() as self.session:
            for rnd in range(self.a.rounds):
                for c in self.a.concurrency:
                    out.append({"round": rnd, **await self.drain(c, f"r{rnd}")})
                    _progress(out[-1])
                    out.append({"round": rnd, **await self.raw_http(c)})
                    _progress(out[-1])
                out.append({"round": rnd, **await self.consumer_drain(f"r{rnd}")})
                _progress(out[-1])
            live_c = 8 if 8 in self.a.concurrency else self.a.concurrency[0]
            base = sorted(r["rate"] for r in out if r["scenario"] == "drain" and r["concurrency"] == live_c)
            out.append({"round": 0, **await self.live(base[len(base) // 2] / 2, live_c, "live")})
            _progress(out[-1])
        return out


def _progress(row: dict[str, Any]) -> None:
    print("  " + json.dumps(row), file=sys.stderr, flush=True)


def _table(rows: list[dict[str, Any]], a: argparse.Namespace, load: tuple[float, float, float]) -> str:
    lines = [f"webhook benchmark: {a.messages} messages of {a.size} B, broker --flush {a.flush}, "
             f"receiver {'verifying signatures' if a.verify else 'not verifying'}, {os.cpu_count()} cores, "
             f"load average before {load[0]:.2f}",
             "",
             "| scenario | concurrency | deliveries/s | seconds | broker CPU % | receiver CPU % | broker CPU µs/delivery | duplicates |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r["scenario"] == "live":
            continue
        lines.append(f"| {r['scenario']} (round {r['round'] + 1}) | {r['concurrency']} | {r['rate']:,} | {r['seconds']} | "
                     f"{r['broker_cpu_pct']} | {r.get('receiver_cpu_pct', '-')} | {r['broker_cpu_us_per_delivery']} | "
                     f"{r.get('duplicates', '-')} |")
    for r in rows:
        if r["scenario"] == "live":
            lines += ["", f"live, concurrency {r['concurrency']}, one send at a time at {r['rate']:,}/s ({r['messages']} messages): "
                          f"send→POST received p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, duplicates {r['duplicates']}"]
    return "\n".join(lines) + "\n"


def _start(cmd: list[str], log: Path) -> tuple[subprocess.Popen[str], str]:
    with open(log, "a") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True)
    assert proc.stdout is not None
    return proc, proc.stdout.readline().strip()


def bench_main(argv: list[str] | None = None) -> int:
    """Run the benchmark (or, with ``--receiver``, be the receiver process)."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.webhook_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=5000)
    p.add_argument("--concurrency", default="1,8,32,64", help="comma-separated (default 1,8,32,64)")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--flush", choices=["sync", "async"], default="sync")
    p.add_argument("--no-verify", dest="verify", action="store_false", help="the receiver skips verification")
    p.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--workdir", default=None, help="where the broker's data goes (default: a temporary directory)")
    p.add_argument("--receiver", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.receiver:
        return _receiver_main(a.verify)
    a.concurrency = [int(c) for c in a.concurrency.split(",") if c]
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(dir=a.workdir) as tmp:
        broker, ready = _start([sys.executable, "-m", "broker", "--data-dir", f"{tmp}/data", "--port", "0",
                                "--http-port", "0", "--flush", a.flush], Path(tmp) / "broker.log")
        rx, port = _start([sys.executable, "-m", "benchmarks.webhook_bench", "--receiver",
                           *([] if a.verify else ["--no-verify"])], Path(tmp) / "receiver.log")
        try:
            parts = dict(x.split("=", 1) for x in ready.split()[3:])
            bench = _Bench(a, "http://" + parts["http"], parts["tcp"], broker.pid, int(port), rx.pid)
            import uvloop

            rows = uvloop.run(bench.run())
        finally:
            for proc in (rx, broker):
                proc.terminate()
                proc.wait(30)
                if proc.stdout is not None:
                    proc.stdout.close()
    text = _table(rows, a, load)
    print(text)
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "webhook-latest.txt").write_text(text)
    (out / "webhook-latest.json").write_text(json.dumps(
        {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_before": load,
         "settings": {"messages": a.messages, "size": a.size, "flush": a.flush, "verify": a.verify},
         "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(bench_main())
