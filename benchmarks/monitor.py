"""CPU, run-queue wait and RSS of a cell's processes, sampled while the cell runs.

How this works
--------------
``Monitor`` takes the server's and the clients' process ids, samples each process's CPU
time (psutil), the run-queue delay of its main thread (``/proc/PID/schedstat``) and the
server's RSS every 100 ms from ``start()`` to ``stop()``, and returns per role the % of one
core used (and, for one-event-loop processes, waited for), with the machine's busy and
iowait share and what other processes used. The harness (``benchmarks.harness``) runs one
per cell; ``benchmarks.report`` turns the figures into the *saturated* label.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from typing import Any

__all__ = ["Monitor"]


def _run_delay(pid: int) -> float | None:
    """Seconds the main thread of ``pid`` has waited on a run queue so far (runnable, but
    not running: every core was busy, or its virtual CPU was still being woken up), from
    ``/proc/PID/schedstat``; None where the kernel does not report it."""
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, ValueError, IndexError):
        return None


class Monitor:
    """CPU of server and client processes over a window and the servers' peak RSS.

    CPU is the ``cpu_times`` delta of each process, sampled every 100 ms, divided by the
    time that process was seen alive inside the window (a producer that finished early is
    not diluted by the consumer's drain); a role's CPU is the sum over its processes. For
    the roles whose process is one event loop (the clients; the server with
    ``server_loop``: halfmq, Redis) the time its main thread waited for a CPU is reported
    the same way, as ``<role>_runq``: a side can be short of CPU without using 100 % of a
    core, when the other processes have the cores.
    """

    def __init__(self, server_pids: list[int], clients: dict[str, list[int]], server_loop: bool = True) -> None:
        import psutil

        self.psutil = psutil
        self.procs: dict[str, list[Any]] = {"server": [], **{k: [] for k in clients}}
        for role, pids in (("server", server_pids), *clients.items()):
            for pid in pids:
                with contextlib.suppress(psutil.Error):
                    self.procs[role].append(psutil.Process(pid))
        self.loop_roles = [r for r in self.procs if r != "server" or server_loop]
        self.first: dict[int, tuple[float, float]] = {}
        self.last: dict[int, tuple[float, float]] = {}
        self.rq_first: dict[int, tuple[float, float]] = {}
        self.rq_last: dict[int, tuple[float, float]] = {}
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
                if role in self.loop_roles:
                    delay = _run_delay(p.pid)
                    if delay is not None:
                        self.rq_first.setdefault(p.pid, (now, delay))
                        self.rq_last[p.pid] = (now, delay)
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
        for role in self.loop_roles:
            spans = [(self.rq_first[p.pid], self.rq_last[p.pid]) for p in self.procs[role] if p.pid in self.rq_first]
            if spans:
                cpu[f"{role}_runq"] = sum(100.0 * (d1 - d0) / max(t1 - t0, 0.05) for (t0, d0), (t1, d1) in spans)
        rss = [r for _, r in self.rss_samples]
        return {"cpu": cpu, "wall": wall,
                "rss_max_mb": max(rss) / 2**20 if rss else None,
                "rss_end_mb": rss[-1] / 2**20 if rss else None}
