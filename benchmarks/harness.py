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
1 KiB write+fsync rate and the pure-Python echo ceiling (``benchmarks/echo.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as _dt
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "SCENARIOS", "SYSTEMS", "Settings", "make_server", "run_comparison", "run_e2e_steps",
    "percentile", "fsync_rate", "machine_info",
]

SCENARIOS = ("publish", "latency", "e2e", "tx", "batch", "fifo", "pull",
             "publish-users", "e2e-users", "pull-users", "tx-users")
#: The scenarios written as applications write them (see USERS_CONSUMER and benchmarks/e2e.py).
USERS_SCENARIOS = ("publish-users", "e2e-users", "pull-users", "tx-users")
#: The consumer an application configures by the documentation: 64 listener calls at a
#: time, 1,024 messages prefetched.
USERS_CONSUMER = {"prefetch": 1024, "concurrency": 64}
SYSTEMS = ("halfmq-sync", "halfmq-async", "halfmq-grpc", "halfmq-secure", "halfmq-trace", "halfmq-cluster",
           "rabbitmq", "nats", "redis")
#: A process is called saturated when it used at least this share of its CPU capacity.
SATURATED = 0.85
LINE_LIMIT = 1 << 28

SCENARIO_TITLES = {
    "publish": "publish — durable publish with confirmation, pipelined (window {window})",
    "latency": "latency — one publish at a time, waiting for each confirmation",
    "e2e": "e2e — producer and consumer processes, consumer acks each message",
    "tx": "tx — half → no-op local transaction → commit → deliver → ack",
    "batch": "batch — send_batch of {batch} ({batch_window} batches in flight)",
    "fifo": "fifo — e2e with 1,000 message groups, a FIFO consumer group (one message per group at a time)",
    "pull": "pull — e2e with a SimpleConsumer: receive batches of 32, ack each batch in one request",
    "publish-users": "publish-users — as applications write it: one task per send, {window} in flight, default GC",
    "e2e-users": ("e2e-users — as applications write it: a task per send ({window} in flight); "
                  "PushConsumer(concurrency=64, prefetch=1024) acking each message"),
    "pull-users": ("pull-users — as applications write it: a task per send; SimpleConsumer receiving "
                   "batches of 32 and acking each message with its own request"),
    "tx-users": ("tx-users — as applications write it: a task per send_in_transaction whose local "
                 "transaction inserts a row into SQLite (commit + fsync); PushConsumer(64, 1024)"),
}


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
    elif name == "redis":
        from benchmarks.systems.redis_streams import Server  # type: ignore[assignment]
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


def _median_minmax(values: Iterable[float | None]) -> tuple[float | None, float | None, float | None]:
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None, None
    return statistics.median(vals), min(vals), max(vals)


# -- machine and limits ---------------------------------------------------------------


def _disk_of(path: str) -> str:
    try:
        import psutil

        best = None
        real = os.path.realpath(path)
        for part in psutil.disk_partitions(all=False):
            if real.startswith(part.mountpoint) and (best is None or len(part.mountpoint) > len(best.mountpoint)):
                best = part
        if best is None:
            return "unknown"
        dev = os.path.basename(best.device)
        rota = ""
        with contextlib.suppress(OSError):
            with open(f"/sys/block/{dev}/queue/rotational") as f:
                rota = " (rotational)" if f.read().strip() == "1" else " (non-rotational)"
        return f"{best.device} {best.fstype}{rota} at {best.mountpoint}"
    except Exception:  # noqa: BLE001
        return "unknown"


def machine_info(workdir: str) -> dict[str, Any]:
    """nproc, CPU model, memory, data disk, Python and library versions."""
    info: dict[str, Any] = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "data_disk": _disk_of(workdir),
    }
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    with contextlib.suppress(OSError):
        info["loadavg_1m"] = round(os.getloadavg()[0], 2)
    with contextlib.suppress(Exception):
        import psutil

        info["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    with contextlib.suppress(Exception):
        import uvloop

        info["uvloop"] = uvloop.__version__
    return info


def fsync_rate(directory: str, seconds: float = 1.0, size: int = 1024) -> float:
    """Appends of ``size`` bytes each followed by ``fsync``, per second, in ``directory``."""
    fd, path = tempfile.mkstemp(prefix="fsync-bench-", dir=directory)
    try:
        block = b"\x5a" * size
        n = 0
        end = time.perf_counter() + seconds
        start = time.perf_counter()
        while True:
            os.write(fd, block)
            os.fsync(fd)
            n += 1
            if n % 16 == 0 and time.perf_counter() >= end:
                break
        return n / (time.perf_counter() - start)
    finally:
        os.close(fd)
        os.unlink(path)


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


class Monitor:
    """CPU of server and client processes over a window and the servers' peak RSS.

    CPU is the ``cpu_times`` delta of each process, sampled every 100 ms, divided by the
    time that process was seen alive inside the window (a producer that finished early is
    not diluted by the consumer's drain); a role's CPU is the sum over its processes.
    """

    def __init__(self, server_pids: list[int], clients: dict[str, list[int]]) -> None:
        import psutil

        self.psutil = psutil
        self.procs: dict[str, list[Any]] = {"server": [], **{k: [] for k in clients}}
        for role, pids in (("server", server_pids), *clients.items()):
            for pid in pids:
                with contextlib.suppress(psutil.Error):
                    self.procs[role].append(psutil.Process(pid))
        self.first: dict[int, tuple[float, float]] = {}
        self.last: dict[int, tuple[float, float]] = {}
        self.rss_samples: list[tuple[float, int]] = []
        self._task: asyncio.Task[None] | None = None

    def _poll(self) -> None:
        now = time.perf_counter()
        rss = 0
        for role, procs in self.procs.items():
            for p in procs:
                try:
                    t = p.cpu_times()
                    if role == "server":
                        rss += p.memory_info().rss
                except self.psutil.Error:
                    continue
                sample = (now, t.user + t.system)
                self.first.setdefault(p.pid, sample)
                self.last[p.pid] = sample
        if rss:
            self.rss_samples.append((now - self.t0, rss))

    def _machine(self) -> tuple[float, float, float]:
        t = self.psutil.cpu_times()
        idle = t.idle + getattr(t, "iowait", 0.0)
        total = sum(t)
        return total - idle, getattr(t, "iowait", 0.0), total

    def start(self) -> None:
        self.t0 = time.perf_counter()
        self.machine0 = self._machine()
        self._poll()
        self._task = asyncio.create_task(self._sample())

    async def _sample(self) -> None:
        while True:
            await asyncio.sleep(0.1)
            self._poll()

    def stop(self) -> dict[str, Any]:
        self._poll()
        wall = max(time.perf_counter() - self.t0, 1e-6)
        if self._task is not None:
            self._task.cancel()
        cpu: dict[str, float] = {}
        for role, procs in self.procs.items():
            total = 0.0
            for p in procs:
                if p.pid in self.first:
                    (t0, c0), (t1, c1) = self.first[p.pid], self.last[p.pid]
                    total += 100.0 * (c1 - c0) / max(t1 - t0, 0.05)
            cpu[role] = total
        busy1, iowait1, total1 = self._machine()
        busy0, iowait0, total0 = self.machine0
        ncpu = os.cpu_count() or 1
        span = max(total1 - total0, 1e-6)
        cpu["machine"] = 100.0 * ncpu * (busy1 - busy0) / span
        cpu["iowait"] = 100.0 * ncpu * (iowait1 - iowait0) / span
        ours = sum(v for k, v in cpu.items() if k not in ("machine", "iowait"))
        cpu["others"] = max(cpu["machine"] - ours, 0.0)
        rss = [r for _, r in self.rss_samples]
        return {"cpu": cpu, "wall": wall,
                "rss_max_mb": max(rss) / 2**20 if rss else None,
                "rss_end_mb": rss[-1] / 2**20 if rss else None}


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
        monitor = Monitor(server.server_pids(), clients)
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


def _saturation(cpu: dict[str, float], capacity: float) -> str:
    """Which side ran out of CPU: 'server', 'producer', 'consumer', several, or none."""
    sides = []
    if cpu.get("server", 0.0) >= SATURATED * capacity:
        sides.append("server")
    elif cpu.get("server", 0.0) + cpu.get("server_disk_wait", 0.0) >= SATURATED * capacity:
        # a single event loop busy or blocked in its own disk writes all the time
        sides.append(f"server (event loop: CPU {cpu['server']:.0f}% + waiting for its own disk writes "
                     f"{cpu['server_disk_wait']:.0f}%)")
    for role in ("producer", "consumer"):
        n = 1  # one process per role in the comparison; each is single-threaded Python
        if role in cpu and cpu[role] >= SATURATED * 100.0 * n:
            sides.append(role)
    if sides:
        return "+".join(sides)
    if cpu.get("machine", 0.0) >= SATURATED * 100.0 * (os.cpu_count() or 1):
        return f"machine (all cores busy; {cpu.get('others', 0):.0f}% by other processes)"
    return "none (waiting: disk, network or the other side)"


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
        if scenario in ("e2e-users", "pull-users", "tx-users"):
            mode = {"e2e-users": "publish", "pull-users": "publish", "tx-users": "tx-sqlite"}[scenario]
            consumer = (_consumer_params(s, style="users", mode="pull-each") if scenario == "pull-users"
                        else _consumer_params(s, style="users", **USERS_CONSUMER))
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


# -- the comparison -------------------------------------------------------------------


def _fmt_rate(v: float | None) -> str:
    if v is None:
        return "—"
    return f"{v:,.0f}"


def _fmt_ms(v: float | None) -> str:
    if v is None:
        return "—"
    return f"{v:.3f}" if v < 10 else f"{v:.1f}"


def _fmt_range(lo: float | None, hi: float | None, fmt: Any = _fmt_rate) -> str:
    if lo is None:
        return "—"
    return f"{fmt(lo)}–{fmt(hi)}"


def summarize(cells: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per system and scenario: medians (min–max) over rounds."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for c in cells:
        if c.get("error"):
            continue
        groups.setdefault((c["system"], c["scenario"]), []).append(c)
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for (system, scenario), rows in groups.items():
        res = [r["result"] for r in rows]
        summary: dict[str, Any] = {"rounds": len(res)}
        for key in ("rate", "produce_rate", "consume_rate", "p50", "p99", "p999", "rss_mb"):
            med, lo, hi = _median_minmax(r.get(key) for r in res)
            if med is not None:
                summary[key] = med
                summary[key + "_min"] = lo
                summary[key + "_max"] = hi
        cpu_roles = {k for r in res for k in r.get("cpu", {})}
        summary["cpu"] = {k: statistics.median([r["cpu"].get(k, 0.0) for r in res]) for k in cpu_roles}
        # judged on the median CPU figures, so the label matches the CPU columns
        summary["saturated"] = _saturation(summary["cpu"], res[0].get("capacity", 100.0))
        summary["samples"] = statistics.median([r.get("samples", 0) for r in res])
        if scenario == "tx":
            for key in ("p50", "p99", "rate"):
                med, lo, hi = _median_minmax(r["half"].get(key) for r in res if r.get("half"))
                summary[f"half_{key}"] = med
            summary["half_rate_target"] = statistics.median([r.get("half_rate", 0) for r in res])
        out.setdefault(system, {})[scenario] = summary
    return out


def _get(summary: dict[str, Any], system: str, scenario: str, key: str) -> float | None:
    return summary.get(system, {}).get(scenario, {}).get(key)


def goals(summary: dict[str, Any], limits: dict[str, Any]) -> list[dict[str, Any]]:
    """The goal ratios of the comparison, from this run's medians (halfmq at --flush sync)."""
    hq = "halfmq-sync"
    rows: list[dict[str, Any]] = []

    def ratio(name: str, a: float | None, b: float | None, target: float, higher: bool = True,
              unit: str = "×") -> None:
        if a is None or b is None or b == 0:
            rows.append({"goal": name, "measured": None, "target": target, "unit": unit,
                         "higher_is_better": higher, "result": "n/a"})
            return
        value = a / b
        ok = value >= target if higher else value <= target
        rows.append({"goal": name, "measured": value, "target": target, "unit": unit,
                     "higher_is_better": higher, "result": "pass" if ok else "MISS"})

    def absolute(name: str, value: float | None, target: float, higher: bool, unit: str) -> None:
        if value is None:
            rows.append({"goal": name, "measured": None, "target": target, "unit": unit,
                         "higher_is_better": higher, "result": "n/a"})
            return
        ok = value >= target if higher else value <= target
        rows.append({"goal": name, "measured": value, "target": target, "unit": unit,
                     "higher_is_better": higher, "result": "pass" if ok else "MISS"})

    pub = _get(summary, hq, "publish", "rate")
    e2e = _get(summary, hq, "e2e", "rate")
    peers = (("nats", 2, 1.5), ("redis", 2, 2), ("rabbitmq", 10, 8))
    for peer, t_pub, _ in peers:
        ratio(f"publish ≥ {t_pub}× {peer}", pub, _get(summary, peer, "publish", "rate"), t_pub)
    for peer, _, t_e2e in peers:
        ratio(f"e2e ≥ {t_e2e}× {peer}", e2e, _get(summary, peer, "e2e", "rate"), t_e2e)
    ratio("latency p50 ≤ 1.2× redis", _get(summary, hq, "latency", "p50"),
          _get(summary, "redis", "latency", "p50"), 1.2, higher=False)
    ratio("publish ≥ 30% of echo ceiling", pub, limits.get("echo"), 0.30, unit="share")
    absolute("batch ≥ 200,000 msgs/s", _get(summary, hq, "batch", "rate"), 200_000, True, "msgs/s")
    ratio("tx ≥ 40% of halfmq e2e", _get(summary, hq, "tx", "rate"), e2e, 0.40, unit="share")
    # the absolute goals for halfmq alone on this machine
    absolute("publish ≥ 60,000 msgs/s", pub, 60_000, True, "msgs/s")
    absolute("e2e ≥ 30,000 msgs/s", e2e, 30_000, True, "msgs/s")
    absolute("latency p50 ≤ 0.35 ms", _get(summary, hq, "latency", "p50"), 0.35, False, "ms")
    absolute("latency p99 ≤ 1 ms", _get(summary, hq, "latency", "p99"), 1.0, False, "ms")
    absolute("tx p99 send→deliver ≤ 10 ms at half rate", _get(summary, hq, "tx", "half_p99"),
             10.0, False, "ms")
    return rows


def _fmt_goal_value(row: dict[str, Any]) -> str:
    v = row.get("measured")
    if v is None:
        return "—"
    unit = row.get("unit")
    if unit == "×":
        return f"{v:.2f}×"
    if unit == "share":
        return f"{100 * v:.0f}%"
    if unit == "ms":
        return f"{v:.3f} ms"
    return f"{v:,.0f} msgs/s"


def _fmt_goal_target(row: dict[str, Any]) -> str:
    t = row["target"]
    unit = row.get("unit", "")
    op = "≥" if row.get("higher_is_better", True) else "≤"
    if unit == "×":
        return f"{op} {t}×"
    if unit == "share":
        return f"{op} {100 * t:.0f}%"
    if unit == "ms":
        return f"{op} {t} ms"
    return f"{op} {t:,.0f}"


def _mach(cpu: dict[str, float]) -> str:
    if "machine" not in cpu:
        return "—"
    return f"{cpu['machine']:.0f} ({cpu.get('others', 0):.0f})"


def render_markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    m = report["machine"]
    summ = report["summary"]
    systems = report["systems"]
    durab = report["durability"]
    lines = [
        "# halfmq benchmark: side by side",
        "",
        f"- date: {m['date']}",
        f"- machine: {m['nproc']} cores ({m['cpu']}), {m.get('memory_gb', '?')} GB RAM, "
        f"data disk {m['data_disk']}",
        f"- Python {m['python']}, uvloop {m.get('uvloop', '?')}, every client and server on "
        "uvloop where it has a Python side",
        f"- {s['rounds']} round(s), systems interleaved; each cell "
        + (f"{s['count']:,} messages" if s["count"] else f"{s['duration']} s measured after "
           f"{s['warmup']} s warm-up")
        + f"; {s['size']} B bodies; numbers are the median over rounds (min–max)",
        f"- wall time of the run: {report['wall_s']:.0f} s; 1-min load average before/after: "
        f"{report.get('load_before', '?')} / {m.get('loadavg_1m', '?')} (other work on the "
        "machine shows up here)",
        "",
        "CPU is % of one core over the measurement window (server: the broker process(es); "
        "client: the producer/consumer worker processes; machine: all cores together, max "
        f"{100 * (m['nproc'] or 1)}%, with the part used by processes outside the benchmark). "
        f"*Saturated* names the side at ≥ {SATURATED:.0%} of its capacity (a Python process: "
        "one core; RabbitMQ/NATS: all cores), or the machine when all its cores were busy. "
        "halfmq's broker also reports the time its event loop spent waiting for the disk in "
        "its own writes (it serves nothing meanwhile, and CPU time does not show it): CPU plus "
        "that time at the same threshold also names the server.",
        "",
    ]
    if report.get("skipped"):
        lines.append("Skipped:")
        for name, why in report["skipped"].items():
            lines.append(f"- {name}: {why}")
        lines.append("")
    lim = report["limits_summary"]
    lines += ["## Limits (same run)", "", "| limit | median | min–max |", "|---|---:|---:|"]
    if "fsync" in lim:
        lines.append(f"| data disk: 1 KiB write+fsync per second | {_fmt_rate(lim['fsync']['median'])} "
                     f"| {_fmt_range(lim['fsync']['min'], lim['fsync']['max'])} |")
    if "fsync128k" in lim:
        f = lim["fsync128k"]
        lines.append(f"| data disk: 128 KiB write+fsync per second (one group commit of 128 × 1 KiB) | "
                     f"{_fmt_rate(f['median'])} | {_fmt_range(f['min'], f['max'])} |")
    if "echo" in lim:
        lines.append(f"| pure-Python uvloop echo ceiling, msgs/s (window {s['window']}) | "
                     f"{_fmt_rate(lim['echo']['median'])} | "
                     f"{_fmt_range(lim['echo']['min'], lim['echo']['max'])} |")
    lines.append("")

    for scenario in report["scenarios"]:
        rows = [(name, summ[name][scenario]) for name in systems if scenario in summ.get(name, {})]
        if not rows:
            continue
        lines += [f"## {SCENARIO_TITLES[scenario].format(**s)}", ""]
        if scenario == "latency":
            lines += ["| system | durability | p50 ms | p99 ms | p99.9 ms | p50 min–max | msgs/s | "
                      "server CPU % | client CPU % | machine CPU % (others) | saturated |",
                      "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
            for name, r in rows:
                cpu = r["cpu"]
                lines.append(
                    f"| {name} | {durab[name]} | {_fmt_ms(r.get('p50'))} | {_fmt_ms(r.get('p99'))} | "
                    f"{_fmt_ms(r.get('p999'))} | {_fmt_range(r.get('p50_min'), r.get('p50_max'), _fmt_ms)} | "
                    f"{_fmt_rate(r.get('rate'))} | {cpu.get('server', 0):.0f} | "
                    f"{cpu.get('producer', 0):.0f} | {_mach(cpu)} | {r['saturated']} |")
        elif scenario in ("e2e", "tx", "fifo", "pull", "e2e-users", "pull-users", "tx-users"):
            extra = " p50 @½ rate ms | p99 @½ rate ms |" if scenario == "tx" else ""
            extra_sep = "---:|---:|" if scenario == "tx" else ""
            lines += ["| system | durability | msgs/s | min–max | produce msgs/s | consume msgs/s | "
                      "p50 ms | p99 ms | p99.9 ms |" + extra + " server CPU % | producer CPU % | "
                      "consumer CPU % | machine CPU % (others) | saturated | server RSS MB |",
                      "|---|---|---:|---:|---:|---:|---:|---:|---:|" + extra_sep
                      + "---:|---:|---:|---:|---|---:|"]
            for name, r in rows:
                cpu = r["cpu"]
                half = (f" {_fmt_ms(r.get('half_p50'))} | {_fmt_ms(r.get('half_p99'))} |"
                        if scenario == "tx" else "")
                lines.append(
                    f"| {name} | {durab[name]} | {_fmt_rate(r.get('rate'))} | "
                    f"{_fmt_range(r.get('rate_min'), r.get('rate_max'))} | "
                    f"{_fmt_rate(r.get('produce_rate'))} | {_fmt_rate(r.get('consume_rate'))} | "
                    f"{_fmt_ms(r.get('p50'))} | {_fmt_ms(r.get('p99'))} | {_fmt_ms(r.get('p999'))} |"
                    f"{half} {cpu.get('server', 0):.0f} | {cpu.get('producer', 0):.0f} | "
                    f"{cpu.get('consumer', 0):.0f} | {_mach(cpu)} | {r['saturated']} | "
                    f"{_fmt_rate(r.get('rss_mb'))} |")
        else:
            lines += ["| system | durability | msgs/s | min–max | confirm p50 ms | confirm p99 ms | "
                      "server CPU % | client CPU % | machine CPU % (others) | saturated | server RSS MB |",
                      "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
            for name, r in rows:
                cpu = r["cpu"]
                lines.append(
                    f"| {name} | {durab[name]} | {_fmt_rate(r.get('rate'))} | "
                    f"{_fmt_range(r.get('rate_min'), r.get('rate_max'))} | {_fmt_ms(r.get('p50'))} | "
                    f"{_fmt_ms(r.get('p99'))} | {cpu.get('server', 0):.0f} | "
                    f"{cpu.get('producer', 0):.0f} | {_mach(cpu)} | {r['saturated']} | "
                    f"{_fmt_rate(r.get('rss_mb'))} |")
        lines.append("")
    if report.get("errors"):
        lines += ["## Cells that failed", ""]
        for e in report["errors"]:
            lines.append(f"- round {e['round']}, {e['system']} {e['scenario']}: {e['error']}")
        lines.append("")
    lines += ["## Goals (this run's medians, halfmq at --flush sync)", "",
              "| goal | measured | target | result |", "|---|---:|---:|---|"]
    for g in report["goals"]:
        lines.append(f"| {g['goal']} | {_fmt_goal_value(g)} | {_fmt_goal_target(g)} | {g['result']} |")
    lines.append("")
    return "\n".join(lines)


def render_chart(report: dict[str, Any], path: str) -> str | None:
    """A PNG: msgs/s per system and scenario (log scale, min–max bars) and latency."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    summ = report["summary"]
    systems = [s for s in report["systems"] if s in summ]
    scen = [x for x in ("publish", "e2e", "tx", "batch") if x in report["scenarios"]]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [3, 2]})
    width = 0.8 / max(len(systems), 1)
    for i, name in enumerate(systems):
        xs, ys, lo, hi = [], [], [], []
        for j, sc in enumerate(scen):
            r = summ[name].get(sc)
            if not r or r.get("rate") is None:
                continue
            xs.append(j + (i - (len(systems) - 1) / 2) * width)
            ys.append(r["rate"])
            lo.append(r["rate"] - r["rate_min"])
            hi.append(r["rate_max"] - r["rate"])
        if xs:
            ax1.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=name)
    echo = report["limits_summary"].get("echo", {}).get("median")
    if echo:
        ax1.axhline(echo, color="grey", linestyle="--", linewidth=1, label="echo ceiling")
    ax1.set_xticks(range(len(scen)))
    ax1.set_xticklabels(scen)
    ax1.set_yscale("log")
    ax1.set_ylabel("msgs/s (median, min–max)")
    ax1.set_title("Throughput, 1 KiB bodies")
    ax1.legend(fontsize=8)
    names, p50, p99 = [], [], []
    for name in systems:
        r = summ[name].get("latency")
        if r and r.get("p50") is not None:
            names.append(name)
            p50.append(r["p50"])
            p99.append(r["p99"])
    positions = range(len(names))
    ax2.bar([x - 0.2 for x in positions], p50, 0.4, label="p50")
    ax2.bar([x + 0.2 for x in positions], p99, 0.4, label="p99")
    ax2.set_xticks(list(positions))
    ax2.set_xticklabels(names, rotation=20, fontsize=8)
    ax2.set_yscale("log")
    ax2.set_ylabel("ms")
    ax2.set_title("One-at-a-time publish latency")
    ax2.legend(fontsize=8)
    fig.suptitle(f"halfmq vs peers — {report['machine']['nproc']} cores, {report['machine']['date'][:10]}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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
    report["goals"] = goals(summary, {k: v["median"] for k, v in limits_summary.items()})
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


# -- the halfmq end-to-end benchmark --------- -----------------------------------------


async def _backlog_rss(flush: str, producers: int, window: int, backlog: int, slow_delay: float,
                       workdir: str | None, log: Any) -> dict[str, Any]:
    """Fill a backlog of ``backlog`` messages while a slow consumer reads; sample the
    broker's RSS against the backlog size."""
    from benchmarks.systems.halfmq import Server

    srv = Server(flush)
    conn = await srv.start_cell("backlog", workdir or tempfile.gettempdir())
    samples: list[tuple[int, int, float]] = []
    try:
        import psutil

        proc = psutil.Process(srv.server_pids()[0])
        rss0 = proc.memory_info().rss / 2**20
        per = backlog // producers
        last = [0.0]

        def tick(sent: int, received: int) -> None:
            now = time.perf_counter()
            if now - last[0] >= 0.25:
                last[0] = now
                with contextlib.suppress(psutil.Error):
                    samples.append((sent, received, proc.memory_info().rss / 2**20))

        params = [{"mode": "publish", "window": window, "count": per, "progress": True}
                  for _ in range(producers)]
        flow = await run_flow(srv, conn, params, [{"prefetch": 64, "delay": slow_delay}],
                              drain_timeout=0.0, on_tick=tick)
        rss_end = proc.memory_info().rss / 2**20
    finally:
        await srv.stop_cell()
    sent = sum(p["sent"] for p in flow["producers"])
    received = sum(c["count"] for c in flow["consumers"])

    def rss_at(frac: float) -> float | None:
        target = frac * sent
        best = None
        for s_, _r, rss in samples:
            if s_ >= target:
                return rss
            best = rss
        return best

    return {"backlog": sent - received, "sent": sent, "consumed": received, "rss_start_mb": rss0,
            "rss_25_mb": rss_at(0.25), "rss_50_mb": rss_at(0.5), "rss_end_mb": rss_end,
            "rss_max_mb": max([r for *_, r in samples] + [rss_end]),
            "produce_rate": sum(p["rate"] for p in flow["producers"])}


async def _e2e_steps(flushes: tuple[str, ...], producers: int, consumers: int, window: int,
                   duration: float, backlog: int, slow_delay: float, workdir: str | None,
                   log: Any) -> dict[str, Any]:
    from benchmarks.systems.halfmq import Server

    s = Settings(duration=duration, window=window, workdir=workdir)
    wd = workdir or tempfile.gettempdir()
    out: dict[str, Any] = {"machine": machine_info(wd), "fsync_per_s": fsync_rate(wd),
                           "producers": producers, "consumers": consumers, "window": window,
                           "duration": duration, "modes": {}}
    for flush in flushes:
        srv = Server(flush)
        res: dict[str, Any] = {}
        conn = await srv.start_cell("e2e_publish", wd)
        try:
            flow = await run_flow(srv, conn, [_producer_params(s) for _ in range(producers)], [])
            res["publish"] = {"rate": sum(p["rate"] for p in flow["producers"]),
                              **_cell_metrics(flow, srv)}
        finally:
            await srv.stop_cell()
        log(f"{flush}: publish {res['publish']['rate']:,.0f} msgs/s")
        conn = await srv.start_cell("e2e_latency", wd)
        try:
            flow = await run_flow(srv, conn, [_producer_params(s, window=1)], [])
            res["latency"] = _lat_stats(flow["producers"][0]["lat_us"])
            res["latency"]["rate"] = flow["producers"][0]["rate"]
        finally:
            await srv.stop_cell()
        log(f"{flush}: latency p50 {res['latency']['p50']:.3f} ms p99 {res['latency']['p99']:.3f} ms")
        conn = await srv.start_cell("e2e_flow", wd)
        try:
            flow = await run_flow(srv, conn,
                                  [_producer_params(s, warmup=0.0) for _ in range(producers)],
                                  [_consumer_params(s) for _ in range(consumers)])
            res["e2e"] = {**_e2e_numbers(flow), **_cell_metrics(flow, srv)}
            # the same at half that rate: publish→deliver without a backlog building up
            half = res["e2e"]["produce_rate"] / 2
            flow = await run_flow(srv, conn,
                                  [_producer_params(s, warmup=0.0, rate=half / producers)
                                   for _ in range(producers)],
                                  [_consumer_params(s) for _ in range(consumers)])
            res["e2e_half"] = {**_e2e_numbers(flow), "target_rate": half}
            # transactional sends beside normal ones, same broker
            flow = await run_flow(srv, conn,
                                  [_producer_params(s, mode="tx", warmup=0.0) for _ in range(producers)],
                                  [_consumer_params(s) for _ in range(consumers)])
            res["tx"] = {**_e2e_numbers(flow), **_cell_metrics(flow, srv)}
            half = res["tx"]["produce_rate"] / 2
            flow = await run_flow(srv, conn,
                                  [_producer_params(s, mode="tx", warmup=0.0, rate=half / producers)
                                   for _ in range(producers)],
                                  [_consumer_params(s) for _ in range(consumers)])
            res["tx_half"] = {**_e2e_numbers(flow), "target_rate": half}
        finally:
            await srv.stop_cell()
        log(f"{flush}: e2e {res['e2e']['rate']:,.0f} msgs/s; tx {res['tx']['rate']:,.0f} msgs/s")
        if backlog > 0:
            res["backlog"] = await _backlog_rss(flush, producers, window, backlog, slow_delay,
                                                workdir, log)
            log(f"{flush}: backlog {res['backlog']['backlog']:,} rss max "
                f"{res['backlog']['rss_max_mb']:.0f} MB")
        out["modes"][flush] = res
    return out


def _fmt_cpu(cpu: dict[str, float]) -> str:
    parts = [f"{k} {cpu[k]:.0f}%" for k in ("server", "producer", "consumer") if k in cpu]
    if "machine" in cpu:
        parts.append(f"(machine {cpu['machine']:.0f}%, other processes {cpu.get('others', 0):.0f}%)")
    return "cpu " + " ".join(parts)


def render_e2e_steps(out: dict[str, Any]) -> str:
    m = out["machine"]
    lines = [f"halfmq end to end — {m['date']} — {m['nproc']} cores, disk {m['data_disk']}",
             f"{out['producers']} producer process(es) (window {out['window']}) → broker → "
             f"{out['consumers']} consumer process(es); 1 KiB bodies; {out['duration']} s per step; "
             f"disk: {out['fsync_per_s']:,.0f} 1 KiB write+fsync/s", ""]
    for flush, r in out["modes"].items():
        e, eh, t, th, lat = r["e2e"], r["e2e_half"], r["tx"], r["tx_half"], r["latency"]
        lines += [
            f"--flush {flush}",
            f"  publish (no consumer)     {r['publish']['rate']:>10,.0f} msgs/s   "
            f"{_fmt_cpu(r['publish']['cpu'])}; saturated: {r['publish']['saturated']}",
            f"  one-at-a-time publish     p50 {lat['p50']:.3f} ms  p99 {lat['p99']:.3f} ms  "
            f"p99.9 {lat['p999']:.3f} ms",
            f"  e2e (first publish → last ack) {e['rate']:>8,.0f} msgs/s   produce "
            f"{e['produce_rate']:,.0f}  consume {e['consume_rate']:,.0f}",
            f"  publish→deliver           p50 {_fmt_ms(e['p50'])} ms  p99 {_fmt_ms(e['p99'])} ms  "
            f"p99.9 {_fmt_ms(e['p999'])} ms   broker RSS {e['rss_mb']} MB",
            f"                            {_fmt_cpu(e['cpu'])}; saturated: {e['saturated']}",
            f"  e2e at half rate ({eh['target_rate']:,.0f}/s)  publish→deliver p50 {_fmt_ms(eh['p50'])} ms  "
            f"p99 {_fmt_ms(eh['p99'])} ms  p99.9 {_fmt_ms(eh['p999'])} ms",
            f"  tx e2e                    {t['rate']:>10,.0f} msgs/s ({100 * t['rate'] / max(e['rate'], 1):.0f}% "
            f"of normal e2e)  send→deliver p50 {_fmt_ms(t['p50'])} ms  p99 {_fmt_ms(t['p99'])} ms",
            f"  tx at half rate ({th['target_rate']:,.0f}/s)  send→deliver p50 {_fmt_ms(th['p50'])} ms  "
            f"p99 {_fmt_ms(th['p99'])} ms",
        ]
        b = r.get("backlog")
        if b:
            lines.append(
                f"  backlog {b['backlog']:,} msgs (slow consumer took {b['consumed']:,}): broker RSS "
                f"start {b['rss_start_mb']:.0f} MB, at 25% {b['rss_25_mb'] or 0:.0f} MB, at 50% "
                f"{b['rss_50_mb'] or 0:.0f} MB, end {b['rss_end_mb']:.0f} MB, max {b['rss_max_mb']:.0f} MB")
        lines.append("")
    return "\n".join(lines)


def run_e2e_steps(*, flushes: tuple[str, ...], producers: int, consumers: int, window: int,
                  duration: float, backlog: int, slow_delay: float, workdir: str | None,
                  json_out: str | None, out_dir: str | None = None) -> int:
    """``python -m benchmarks.e2e``: run the end-to-end steps, print them and write
    ``e2e-latest.txt``/``.json`` into ``out_dir`` (default ``benchmarks/results``)."""
    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    _install_uvloop()
    out = asyncio.run(_e2e_steps(flushes, producers, consumers, window, duration, backlog,
                               slow_delay, workdir, log))
    text = render_e2e_steps(out)
    print(text)
    out_dir = out_dir or Settings().out_dir
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "e2e-latest.txt"), "w") as f:
        f.write(text)
    with open(os.path.join(out_dir, "e2e-latest.json"), "w") as f:
        json.dump(out, f, indent=1, default=str)
    if json_out:
        with open(json_out, "w") as f:
            json.dump(out, f, indent=1, default=str)
    return 0
