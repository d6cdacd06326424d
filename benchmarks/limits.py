"""The limits of the machine a benchmark run measures beside its cells.

How this works
--------------
Every run of the harness (``benchmarks.harness``) and of the end-to-end benchmark
(``benchmarks.e2e_steps``) reports, next to its own cells, what the machine itself could
do at that moment, so that its rates can be read as ratios: the data disk's 1 KiB
write+fsync rate (``fsync_rate``), SQLite committing as the transactional cells'
listeners do (``sqlite_commit_rate``), and what the machine is (``machine_info``: CPU,
memory, the data disk and whether it is rotational, Python and uvloop versions, load).
The pure-Python echo ceiling has its own module, ``benchmarks.echo``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import platform
import shutil
import tempfile
import time
from typing import Any

__all__ = ["fsync_rate", "machine_info", "sqlite_commit_rate"]


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


def sqlite_commit_rate(directory: str, seconds: float = 1.0, threads: int = 6, wal: bool = False) -> float:
    """SQLite alone as ``tx-users``' local transaction uses it: ``threads`` threads, each with
    its own connection, inserting one row and committing (default journal mode and
    synchronous setting), per second in ``directory``. ``wal``: as ``tx-users-wal``'s does
    (``journal_mode=WAL``, ``synchronous=NORMAL``)."""
    import threading

    from benchmarks.systems.halfmq import sqlite_connect, sqlite_create

    folder = tempfile.mkdtemp(prefix="sqlite-bench-", dir=directory)
    path = os.path.join(folder, "bank.sqlite")
    sqlite_create(path, wal)
    counts = [0] * threads
    end = time.perf_counter() + seconds

    def work(i: int) -> None:
        db = sqlite_connect(path, wal)
        try:
            n = 0
            while time.perf_counter() < end:
                with db:
                    db.execute("INSERT INTO transfers VALUES (?, ?)", (f"{i}-{n}", 1024))
                n += 1
            counts[i] = n
        finally:
            db.close()

    start = time.perf_counter()
    pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    took = time.perf_counter() - start
    shutil.rmtree(folder, ignore_errors=True)
    return sum(counts) / took
