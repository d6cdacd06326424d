"""One harness for every system: the same loops, payloads, clocks and bookkeeping.

How this works
--------------
A *cell* is one scenario of one system in one round. For each cell the system's
``Server`` prepares a fresh place (a new halfmq broker with a new data dir, a new queue,
stream or redis-server), the harness starts worker processes (``benchmarks/e2e.py``) for
the producer and, where the scenario has one, the consumer, says GO, samples the CPU of
server and client processes and the server's RSS with psutil while they run, collects
their results and tears the cell down. Rounds interleave systems (A B C A B C …) so a
slow minute of the machine hurts everyone alike; each number is reported as the median
over rounds with its min–max.

Scenarios (1 KiB bodies): ``publish`` (durable publish with confirmation, window 256),
``latency`` (one publish at a time), ``e2e`` (producer and consumer processes, consumer
acks each message; msgs/s from first publish to last ack), ``tx`` (halfmq: half → no-op
local transaction → commit → deliver → ack, at full rate and again at half that rate),
``batch`` (``send_batch`` of 100). Limits measured in the same run: the data disk's
1 KiB write+fsync rate and SQLite's commit rate (``benchmarks.limits``) and the
pure-Python echo ceiling (``benchmarks/echo.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from benchmarks.limits import fsync_rate, machine_info, sqlite_commit_rate
from benchmarks.monitor import Monitor
from benchmarks.report import (
    _fmt_ms,
    _fmt_rate,
    _median_minmax,
    _saturation,
    goals,
    goals_by_round,
    render_chart,
    render_markdown,
    summarize,
)

__all__ = [
    "SCENARIOS", "SYSTEMS", "Settings", "make_server", "run_comparison",
    "percentile", "fsync_rate", "machine_info",
]

SCENARIOS = ("publish", "latency", "e2e", "tx", "batch", "fifo", "pull",
             "publish-users", "e2e-users", "e2e-users-default", "pull-users", "tx-users", "tx-users-wal",
             "tx-users-inline", "tx-users-batch", "tx-users-batch-wal")
#: The scenarios written as applications write them (see USERS_CONSUMER and benchmarks/e2e.py).
USERS_SCENARIOS = ("publish-users", "e2e-users", "e2e-users-default", "pull-users", "tx-users", "tx-users-wal",
                   "tx-users-inline", "tx-users-batch", "tx-users-batch-wal")
#: The users' transactional scenarios: the producer mode each runs (see benchmarks/e2e.py).
TX_USERS_MODES = {"tx-users": "tx-sqlite", "tx-users-wal": "tx-sqlite-wal", "tx-users-inline": "tx-sqlite-inline",
                  "tx-users-batch": "tx-sqlite-batch", "tx-users-batch-wal": "tx-sqlite-batch-wal"}
#: The consumer an application configures by the documentation: 64 listener calls at a
#: time, 1,024 messages prefetched.
USERS_CONSUMER = {"prefetch": 1024, "concurrency": 64}


def push_consumer_defaults() -> dict[str, int]:
    """``PushConsumer``'s own ``prefetch`` and ``concurrency`` defaults (``e2e-users-default``:
    the consumer of an application that sets neither)."""
    import inspect

    from consumer_sdk import PushConsumer

    params = inspect.signature(PushConsumer).parameters
    return {"prefetch": params["prefetch"].default, "concurrency": params["concurrency"].default}
SYSTEMS = ("halfmq-sync", "halfmq-async", "halfmq-grpc", "halfmq-secure", "halfmq-trace", "halfmq-cluster",
           "rabbitmq", "nats", "redis", "redis-everysec")
LINE_LIMIT = 1 << 28



@dataclass
class Settings:
    duration: float = 2.5
    warmup: float = 0.5
    count: int = 0
    window: int = 256
    batch: int = 100
    batch_window: int = 4
    prefetch: int = 256
    size: int = 1024
    rounds: int = 3
    workdir: str | None = None
    drain_timeout: float = 30.0
    profile: str | None = None  # None | "cprofile" | "py-spy"
    out_dir: str = field(default_factory=lambda: os.path.join(os.path.dirname(__file__), "results"))


def make_server(name: str, *, profile_dir: str | None = None, profiler: str = "cprofile") -> Any:
    """The harness-side ``Server`` of system ``name`` (halfmq: optionally profiled)."""
    if name in ("halfmq-sync", "halfmq-async"):
        from benchmarks.systems.halfmq import Server

        return Server(name.split("-", 1)[1], profile_dir=profile_dir, profiler=profiler)
    if name == "halfmq-grpc":
        from benchmarks.systems.halfmq_grpc import Server as GrpcServer

        return GrpcServer(profile_dir=profile_dir, profiler=profiler)
    if name == "halfmq-secure":
        from benchmarks.systems.halfmq import Server

        return Server("sync", profile_dir=profile_dir, profiler=profiler, secure=True)
    if name == "halfmq-trace":
        from benchmarks.systems.halfmq import Server

        return Server("sync", profile_dir=profile_dir, profiler=profiler, trace=True)
    if name == "halfmq-cluster":
        from benchmarks.systems.halfmq_cluster import Server as ClusterServer

        return ClusterServer()
    if name == "rabbitmq":
        from benchmarks.systems.rabbitmq import Server  # type: ignore[assignment]
    elif name == "nats":
        from benchmarks.systems.nats_js import Server  # type: ignore[assignment]
    elif name in ("redis", "redis-everysec"):
        from benchmarks.systems.redis_streams import Server as RedisServer

        return RedisServer("everysec" if name == "redis-everysec" else "always")
    elif name == "echo":
        from benchmarks.echo import Server  # type: ignore[assignment]
    else:
        raise ValueError(f"unknown system {name!r}; known: {', '.join(SYSTEMS)}")
    return Server()


# -- statistics -----------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """The ``q``-quantile (0..1) of an already sorted list (nearest rank); None if empty."""
    if not sorted_values:
        return None
    idx = min(len(sorted_values) - 1, max(0, int(q * len(sorted_values) + 0.5) - 1))
    return sorted_values[idx]


def _lat_stats(lat_us: list[int]) -> dict[str, Any]:
    values = sorted(lat_us)
    out: dict[str, Any] = {"samples": len(values)}
    for key, q in (("p50", 0.5), ("p99", 0.99), ("p999", 0.999)):
        v = percentile(values, q)
        out[key] = None if v is None else v / 1000.0  # ms
    return out


# -- machine and limits ---------------------------------------------------------------


# -- processes ------------------------------------------------------------------------


class Worker:
    """One ``benchmarks.e2e worker`` subprocess and its line protocol."""

    def __init__(self, proc: asyncio.subprocess.Process, role: str) -> None:
        self.proc = proc
        self.role = role
        self.ready = asyncio.Event()
        self.progress = 0
        self.result: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.stderr_tail = b""
        self._reader = asyncio.create_task(self._read())
        self._err_reader = asyncio.create_task(self._read_err())

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while True:
            line = await self.proc.stdout.readline()
            if not line:
                break
            text = line.decode(errors="replace").rstrip("\n")
            if text == "READY":
                self.ready.set()
            elif text.startswith("P "):
                self.progress = int(text[2:])
            elif text.startswith("R ") and not self.result.done():
                self.result.set_result(json.loads(text[2:]))
        if not self.result.done():
            await asyncio.sleep(0.1)  # let stderr be read
            self.result.set_exception(RuntimeError(
                f"{self.role} worker exited without a result: "
                f"{self.stderr_tail.decode(errors='replace')[-1500:]}"))

    async def _read_err(self) -> None:
        assert self.proc.stderr is not None
        while True:
            chunk = await self.proc.stderr.read(65536)
            if not chunk:
                break
            self.stderr_tail = (self.stderr_tail + chunk)[-8000:]

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        with contextlib.suppress(Exception):
            self.proc.stdin.write((line + "\n").encode())

    async def wait_ready(self, timeout: float = 30.0) -> None:
        waiter: asyncio.Future[Any] = asyncio.ensure_future(self.ready.wait())
        done, _ = await asyncio.wait({waiter, self.result}, timeout=timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
        if waiter not in done:
            waiter.cancel()
            if self.result.done():
                self.result.result()  # raises the worker's failure
            raise RuntimeError(f"{self.role} worker not ready after {timeout}s: "
                               f"{self.stderr_tail.decode(errors='replace')[-1500:]}")

    async def wait_result(self, timeout: float) -> dict[str, Any]:
        return await asyncio.wait_for(asyncio.shield(self.result), timeout)

    async def kill(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.proc.wait(), 5)
        for t in (self._reader, self._err_reader):
            t.cancel()


async def spawn_worker(module: str, role: str, conn: dict[str, Any],
                       params: dict[str, Any]) -> Worker:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "benchmarks.e2e", "worker", "--system", module, "--role", role,
        "--conn", json.dumps(conn), "--params", json.dumps(params),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, limit=LINE_LIMIT,
    )
    return Worker(proc, role)


async def run_flow(server: Any, conn: dict[str, Any], producers: list[dict[str, Any]],
                   consumers: list[dict[str, Any]], *, drain_timeout: float = 30.0,
                   on_tick: Any = None) -> dict[str, Any]:
    """Start consumers (each subscribed before anything is sent), then producers; GO; wait
    for the producers' results, then until the consumers received what was sent; STOP."""
    module = server.client_module
    workers: list[Worker] = []
    try:
        cons = []
        for params in consumers:
            w = await spawn_worker(module, "consumer", conn, params)
            workers.append(w)
            w.send("GO")
            cons.append(w)
        for w in cons:
            await w.wait_ready()
        prods = []
        for params in producers:  # a producer may name its own client module ("system")
            w = await spawn_worker(params.get("system", module), "producer", conn, params)
            workers.append(w)
            prods.append(w)
        for w in prods:
            await w.wait_ready()
        clients = {"producer": [w.pid for w in prods]}
        if cons:
            clients["consumer"] = [w.pid for w in cons]
        monitor = Monitor(server.server_pids(), clients, server_loop=server.server_cpu_capacity <= 100.0)
        io0 = await server.loop_disk_wait_seconds()
        monitor.start()
        for w in prods:
            w.send("GO")
        budget = max(float(p.get("duration", 3)) + float(p.get("warmup", 0)) for p in producers)
        if any(p.get("count") for p in producers):
            budget = 3600.0
        tick_task = asyncio.create_task(_ticker(on_tick, prods, cons)) if on_tick else None
        prod_results = [await w.wait_result(budget + 60) for w in prods]
        cons_results: list[dict[str, Any]] = []
        drained = True
        if cons:
            sent = sum(r["sent"] for r in prod_results)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + drain_timeout
            while sum(w.progress for w in cons) < sent:
                if loop.time() > deadline or any(w.result.done() for w in cons):
                    drained = False
                    break
                await asyncio.sleep(0.02)
            for w in cons:
                w.send("STOP")
            cons_results = [await w.wait_result(30) for w in cons]
        if tick_task is not None:
            tick_task.cancel()
        mon = monitor.stop()
        io1 = await server.loop_disk_wait_seconds()
        if io0 is not None and io1 is not None:
            mon["cpu"]["server_disk_wait"] = 100.0 * (io1 - io0) / mon["wall"]
        return {"producers": prod_results, "consumers": cons_results, "drained": drained,
                "monitor": mon, "rss_samples": monitor.rss_samples}
    finally:
        for w in workers:
            await w.kill()


async def _ticker(on_tick: Any, prods: list[Worker], cons: list[Worker]) -> None:
    while True:
        on_tick(sum(w.progress for w in prods), sum(w.progress for w in cons))
        await asyncio.sleep(0.1)


# -- scenarios ------------------------------------------------------------------------


def _producer_params(s: Settings, **over: Any) -> dict[str, Any]:
    p = {"mode": "publish", "window": s.window, "duration": s.duration, "warmup": s.warmup,
         "count": s.count, "batch": s.batch, "size": s.size}
    p.update(over)
    return p


def _consumer_params(s: Settings, **over: Any) -> dict[str, Any]:
    p = {"prefetch": s.prefetch}
    p.update(over)
    return p


def _cell_metrics(flow: dict[str, Any], server: Any) -> dict[str, Any]:
    mon = flow["monitor"]
    return {"cpu": {k: round(v, 1) for k, v in mon["cpu"].items()},
            "saturated": _saturation(mon["cpu"], server.server_cpu_capacity),
            "capacity": server.server_cpu_capacity,
            "rss_mb": None if mon["rss_max_mb"] is None else round(mon["rss_max_mb"], 1)}


def _e2e_numbers(flow: dict[str, Any]) -> dict[str, Any]:
    prods, cons = flow["producers"], flow["consumers"]
    sent = sum(p["sent"] for p in prods)
    received = sum(c["count"] for c in cons)
    t_first = min(p["t_first"] for p in prods)
    t_last = max((c["t_last"] for c in cons if c["count"]), default=t_first)
    elapsed = max(t_last - t_first, 1) / 1e9
    delivered = min(received, sent)
    lat: list[int] = []
    for c in cons:
        lat.extend(c["lat_us"])
    c_first = min((c["t_first"] for c in cons if c["count"]), default=t_first)
    out = {
        "rate": delivered / elapsed,
        "produce_rate": sum(p["rate"] for p in prods),
        "consume_rate": delivered / max((t_last - c_first) / 1e9, 1e-9),
        "sent": sent, "received": received, "drained": flow["drained"],
        "errors": sum(p["errors"] for p in prods),
    }
    out.update(_lat_stats(lat))
    return out


async def run_cell(server: Any, scenario: str, cell: str, s: Settings) -> dict[str, Any]:
    """Run one scenario against a fresh place of ``server``; return its numbers."""
    workdir = s.workdir or tempfile.gettempdir()
    conn = await server.start_cell(cell, workdir)
    try:
        if scenario in ("publish", "latency", "batch", "publish-users"):
            if scenario == "publish":
                params = _producer_params(s)
            elif scenario == "publish-users":
                params = _producer_params(s, style="users")
            elif scenario == "latency":
                params = _producer_params(s, window=1)
            else:
                params = _producer_params(s, mode="batch", window=s.batch_window)
            flow = await run_flow(server, conn, [params], [])
            r = flow["producers"][0]
            out = {"rate": r["rate"], "count": r["count"], "errors": r["errors"],
                   "first_error": r["first_error"]}
            out.update(_lat_stats(r["lat_us"]))
            out.update(_cell_metrics(flow, server))
            return out
        if scenario in ("e2e", "fifo", "pull"):
            mode = {"e2e": "publish", "fifo": "fifo", "pull": "publish"}[scenario]
            consumer = _consumer_params(s) if scenario == "e2e" else _consumer_params(s, mode=scenario)
            flow = await run_flow(server, conn, [_producer_params(s, mode=mode, warmup=0.0)],
                                  [consumer], drain_timeout=s.drain_timeout)
            out = _e2e_numbers(flow)
            out.update(_cell_metrics(flow, server))
            return out
        if scenario in ("e2e-users", "e2e-users-default", "pull-users") or scenario in TX_USERS_MODES:
            mode = TX_USERS_MODES.get(scenario, "publish")
            if scenario == "pull-users":
                consumer = _consumer_params(s, style="users", mode="pull-each")
            elif scenario == "e2e-users-default":
                consumer = _consumer_params(s, style="users", **push_consumer_defaults())
            else:
                consumer = _consumer_params(s, style="users", **USERS_CONSUMER)
            flow = await run_flow(server, conn, [_producer_params(s, mode=mode, warmup=0.0, style="users")],
                                  [consumer], drain_timeout=s.drain_timeout)
            out = _e2e_numbers(flow)
            out.update(_cell_metrics(flow, server))
            return out
        if scenario == "tx":
            flow = await run_flow(server, conn, [_producer_params(s, mode="tx", warmup=0.0)],
                                  [_consumer_params(s)], drain_timeout=s.drain_timeout)
            out = _e2e_numbers(flow)
            out.update(_cell_metrics(flow, server))
            half = out["produce_rate"] / 2
            flow2 = await run_flow(server, conn,
                                   [_producer_params(s, mode="tx", warmup=0.0, rate=half)],
                                   [_consumer_params(s)], drain_timeout=s.drain_timeout)
            h = _e2e_numbers(flow2)
            out["half_rate"] = round(half, 1)
            out["half"] = {k: h[k] for k in ("rate", "p50", "p99", "p999", "samples")}
            return out
        raise ValueError(f"unknown scenario {scenario!r}")
    finally:
        await server.stop_cell()


async def _run_comparison(systems: list[str], scenarios: list[str], s: Settings,
                          log: Any) -> dict[str, Any]:
    t_start = time.perf_counter()
    load_before = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    workdir = s.workdir or tempfile.gettempdir()
    os.makedirs(s.out_dir, exist_ok=True)
    profile_dir = s.out_dir if s.profile else None
    servers: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    for name in systems:
        srv = make_server(name, profile_dir=profile_dir, profiler=s.profile or "cprofile")
        why = await srv.unavailable()
        if why:
            skipped[name] = why
            log(f"skipping {name}: {why}")
            continue
        servers[name] = srv
    echo = make_server("echo")
    cells: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    limits: dict[str, list[float]] = {"fsync": [], "fsync128k": [], "echo": []}
    for rnd in range(1, s.rounds + 1):
        rate = await asyncio.to_thread(fsync_rate, workdir, 1.0, s.size)
        limits["fsync"].append(rate)
        big = await asyncio.to_thread(fsync_rate, workdir, 0.5, 128 * 1024)
        limits["fsync128k"].append(big)
        log(f"round {rnd}: fsync {rate:,.0f}/s of {s.size} B, {big:,.0f}/s of 128 KiB")
        if "tx-users" in scenarios or "tx-users-batch" in scenarios:
            commits = await asyncio.to_thread(sqlite_commit_rate, workdir, 1.0)
            limits.setdefault("sqlite", []).append(commits)
            log(f"round {rnd}: SQLite alone {commits:,.0f} insert+commit/s")
        if {"tx-users-wal", "tx-users-inline", "tx-users-batch-wal"} & set(scenarios):
            commits = await asyncio.to_thread(sqlite_commit_rate, workdir, 1.0, 6, True)
            limits.setdefault("sqlite-wal", []).append(commits)
            log(f"round {rnd}: SQLite alone, WAL + synchronous=NORMAL, {commits:,.0f} insert+commit/s")
        for scenario in scenarios:
            if scenario == "publish" and "echo" not in skipped:
                try:
                    r = await run_cell(echo, "publish", f"r{rnd}_echo", s)
                    limits["echo"].append(r["rate"])
                    log(f"round {rnd}: echo ceiling {r['rate']:,.0f} msgs/s")
                except Exception as exc:  # noqa: BLE001
                    log(f"round {rnd}: echo failed: {exc}")
            for name, srv in servers.items():
                if scenario not in srv.scenarios:
                    continue
                cell = f"r{rnd}_{scenario}_{name}"
                t0 = time.perf_counter()
                try:
                    result = await run_cell(srv, scenario, cell, s)
                except Exception as exc:  # noqa: BLE001 - a failed cell must not end the run
                    err = f"{type(exc).__name__}: {str(exc)[:500]}"
                    errors.append({"round": rnd, "system": name, "scenario": scenario, "error": err})
                    log(f"round {rnd}: {name} {scenario}: FAILED {err}")
                    continue
                cells.append({"round": rnd, "system": name, "scenario": scenario, "result": result})
                lat = f" p50 {_fmt_ms(result.get('p50'))} ms p99 {_fmt_ms(result.get('p99'))} ms"
                log(f"round {rnd}: {name:13s} {scenario:8s} {_fmt_rate(result.get('rate')):>9s} msgs/s"
                    f"{lat}  cpu {result.get('cpu')} [{time.perf_counter() - t0:.1f}s]")
    summary = summarize(cells)
    limits_summary = {}
    for k, vals in limits.items():
        med, lo, hi = _median_minmax(vals)
        if med is not None:
            limits_summary[k] = {"median": med, "min": lo, "max": hi, "values": vals}
    report = {
        "machine": machine_info(workdir),
        # where the report went is a detail of the machine that ran it, not a setting
        "settings": {k: v for k, v in asdict(s).items() if k not in ("out_dir", "workdir")},
        "systems": list(servers),
        "scenarios": scenarios,
        "durability": {name: srv.durability for name, srv in servers.items()},
        "skipped": skipped,
        "limits_summary": limits_summary,
        "summary": summary,
        "cells": cells,
        "errors": errors,
        "wall_s": time.perf_counter() - t_start,
        "load_before": load_before,
    }
    goal_rows = goals(summary, {k: v["median"] for k, v in limits_summary.items()})
    goals_by_round(cells, limits, goal_rows)
    report["goals"] = goal_rows
    if s.profile:
        report["profiles"] = [p for srv in servers.values() for p in getattr(srv, "profiles", [])]
    return report


def profile_summary(path: str, kind: str, top: int = 25) -> str:
    """The top costs of one broker profile: cProfile (.prof, by own time and cumulative)
    or py-spy raw collapsed stacks (by own and inclusive samples)."""
    if not os.path.exists(path):
        return f"profile {path}: missing (the broker did not stop cleanly?)"
    lines = [f"## profile {os.path.basename(path)}", ""]
    if kind == "cprofile":
        import io
        import pstats

        for order in ("tottime", "cumulative"):
            buf = io.StringIO()
            pstats.Stats(path, stream=buf).strip_dirs().sort_stats(order).print_stats(top)
            text = buf.getvalue()
            start = text.find("   ncalls")
            lines += [f"by {order}:", "```", text[start if start >= 0 else 0:].rstrip(), "```", ""]
        return "\n".join(lines)
    own: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    with open(path) as f:
        for line in f:
            stack, _, n = line.rstrip("\n").rpartition(" ")
            if not stack or not n.isdigit():
                continue
            count = int(n)
            total += count
            # one entry per function: "func (file.py:LINE)" -> "func (file.py)"
            frames = [re.sub(r":\d+\)$", ")", fr) for fr in stack.split(";")]
            leaf = frames[-1]
            own[leaf] = own.get(leaf, 0) + count
            for fr in set(frames):
                incl[fr] = incl.get(fr, 0) + count
    if not total:
        return f"profile {path}: no samples"
    lines.append(f"{total} samples (py-spy, 250 Hz, busy threads only; a frame inside the event "
                 "loop's own C code shows as its Python caller, e.g. Runner.run)")
    for title, table in (("own time", own), ("inclusive", incl)):
        lines += ["", f"by {title}:", "```"]
        for fr, c in sorted(table.items(), key=lambda kv: -kv[1])[:top]:
            lines.append(f"{100 * c / total:6.1f}%  {fr}")
        lines.append("```")
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], out_dir: str, stem: str = "latest") -> dict[str, str]:
    """Write ``<stem>.md``, ``<stem>.json`` and ``<stem>.png`` into ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"md": os.path.join(out_dir, f"{stem}.md"), "json": os.path.join(out_dir, f"{stem}.json")}
    with open(paths["md"], "w") as f:
        f.write(render_markdown(report))
    with open(paths["json"], "w") as f:
        json.dump(report, f, indent=1, default=str)
    png = render_chart(report, os.path.join(out_dir, f"{stem}.png"))
    if png:
        paths["png"] = png
    return paths


def _install_uvloop() -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def run_comparison(systems: list[str], scenarios: list[str], s: Settings, *,
                   stem: str = "latest", quiet: bool = False) -> tuple[dict[str, Any], dict[str, str]]:
    """Run every scenario for every reachable system, write the report; return both."""
    def log(msg: str) -> None:
        if not quiet:
            print(msg, file=sys.stderr, flush=True)

    _install_uvloop()
    report = asyncio.run(_run_comparison(systems, scenarios, s, log))
    paths = write_report(report, s.out_dir, stem)
    return report, paths
