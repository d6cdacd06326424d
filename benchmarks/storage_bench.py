"""Storage micro-benchmark: append/read throughput of ``storage.MessageStore`` on one disk.

How this works: every scenario opens a fresh store in a temporary directory on the disk
of ``--dir`` and measures 1 KiB records, built before the timing starts (one row repeats
the 1,024-appender scenario with each record built in the loop); the raw fsync rate of the
same disk (write 1 KiB + fsync in a loop) is measured in the same run, so the sync numbers
can be compared to it. The garbage collector is set up as the broker sets it up.

    python benchmarks/storage_bench.py [--dir DIR] [--count N]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import uvloop  # noqa: E402

from storage import BundleTarget, IndexTarget, MessageStore, NewBundle, NewRecord  # noqa: E402

BODY = b"x" * 1024


def raw_fsync_rate(d: Path, seconds: float = 1.5) -> float:
    path = d / "fsync-probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    n = 0
    t0 = time.perf_counter()
    try:
        while time.perf_counter() - t0 < seconds:
            os.write(fd, BODY)
            os.fsync(fd)
            n += 1
    finally:
        os.close(fd)
        path.unlink()
    return n / (time.perf_counter() - t0)


def raw_write_bandwidth(d: Path, total: int = 512 << 20) -> float:
    """Sustained sequential write of the same disk, bytes/s: ``total`` bytes in 1 MiB
    writes, then one fdatasync (what the disk takes once the page cache is full of dirty data)."""
    path = d / "write-probe"
    chunk = os.urandom(1 << 20)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    t0 = time.perf_counter()
    try:
        for _ in range(total >> 20):
            os.write(fd, chunk)
        os.fdatasync(fd)
    finally:
        os.close(fd)
        path.unlink()
    return total / (time.perf_counter() - t0)


def rec(i: int) -> NewRecord:
    return NewRecord(1, {"i": i}, BODY, IndexTarget("bench", i & 3))


async def sync_concurrent(d: Path, conc: int, count: int, build: bool = False) -> float:
    """``conc`` tasks, each awaiting ``append_one`` in a loop. The records are built
    beforehand, as in the other scenarios, unless ``build``: then each task builds its
    record (a dict, an ``IndexTarget``, a ``NewRecord``) before each append, in the timing."""
    async with MessageStore.open(d, flush="sync") as s:
        per = max(1, count // conc)
        records = [rec(i) for i in range(per)]

        async def worker(w: int) -> None:
            if build:
                for i in range(per):
                    await s.append_one(rec(i))
            else:
                for r in records:
                    await s.append_one(r)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(conc)))
        return per * conc / (time.perf_counter() - t0)


async def async_single(d: Path, count: int) -> float:
    async with MessageStore.open(d, flush="async") as s:
        records = [rec(i) for i in range(1000)]
        t0 = time.perf_counter()
        fut = None
        for i in range(count):
            _, fut = s.append((records[i % 1000],))
            if i % 1000 == 999:
                await fut  # type: ignore[misc]  # keep the pipeline bounded
        await fut  # type: ignore[misc]
        return count / (time.perf_counter() - t0)


async def batches(d: Path, count: int, mode: str, size: int = 1000) -> float:
    async with MessageStore.open(d, flush=mode) as s:
        batch = [rec(i) for i in range(size)]
        n = max(1, count // size)
        t0 = time.perf_counter()
        for _ in range(n):
            await s.append_batch(batch)
        return n * size / (time.perf_counter() - t0)


def read_queues_rate(s: MessageStore, per_entry: bool = False) -> float:
    """Read the 4 bench queues through; records per second. ``per_entry``: the broker's
    consume path (``read_queue``, then ``read(entry.pos)`` per entry) instead of
    ``read_queue_records``."""
    t0 = time.perf_counter()
    n = 0
    for q in range(4):
        off = 0
        while True:
            got: list[Any]
            if per_entry:
                got = s.read_queue("bench", q, off, 512)
                for _, e in got:
                    s.read(e.pos)
            else:
                got = s.read_queue_records("bench", q, off, 512)
            if not got:
                break
            n += len(got)
            off = got[-1][0] + 1
    return n / (time.perf_counter() - t0)


def bundle(q: int, size: int) -> NewBundle:
    """``size`` messages of one queue as one bundle record (what the broker does with a
    ``send_batch``): each member keeps its own header, position, queue offset and index entry."""
    return NewBundle(1, [{"i": i} for i in range(size)], [BODY] * size, BundleTarget("bench", q, [0] * size))


async def bundles(d: Path, count: int, mode: str, per_bundle: int = 100, per_call: int = 10) -> tuple[float, float]:
    """append_batch of ``per_call`` bundles of ``per_bundle`` messages; then read them back."""
    async with MessageStore.open(d, flush=mode) as s:
        call = [bundle(k & 3, per_bundle) for k in range(per_call)]
        n = max(1, count // (per_bundle * per_call))
        t0 = time.perf_counter()
        for _ in range(n):
            await s.append_batch(call)
        rate = n * per_bundle * per_call / (time.perf_counter() - t0)
        return rate, read_queues_rate(s)


async def reads(d: Path, count: int) -> tuple[float, float, float, float]:
    async with MessageStore.open(d, flush="async") as s:
        recs = [rec(i) for i in range(1000)]
        for _ in range(max(1, count // 1000)):
            s.append(recs)
        await s.flush()
        queue_rate = read_queues_rate(s)
        t0 = time.perf_counter()
        m = sum(1 for _ in s.iter_log())
        iter_rate = m / (time.perf_counter() - t0)
        consume_rate = read_queues_rate(s, per_entry=True)
        # the same on the tail just written (what a caught-up consumer reads)
        recs = [rec(i) for i in range(1000)]
        t0 = time.perf_counter()
        n = 0
        for _ in range(max(1, count // 10_000)):
            start = [s.queue_end("bench", q) for q in range(4)]
            await s.append_batch(recs)
            for q in range(4):
                for _, e in s.read_queue("bench", q, start[q], 1000):
                    s.read(e.pos)
                    n += 1
        tail_rate = n / (time.perf_counter() - t0)
        return queue_rate, iter_rate, consume_rate, tail_rate


async def main() -> None:
    # the garbage collector as the broker sets it up (broker/cli.py)
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=".", help="directory on the disk to measure (default: current)")
    ap.add_argument("--count", type=int, default=100_000, help="records per throughput scenario")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="halfmq-bench-", dir=args.dir))
    rows: list[tuple[str, float, str]] = []
    try:
        fs = raw_fsync_rate(root)
        rows.append(("raw write(1 KiB)+fsync / s", fs, ""))
        bw = raw_write_bandwidth(root)
        rows.append(("raw sequential write, 1 KiB/s", bw / 1024, f"{bw / 2**20:,.0f} MiB/s (512 MiB in 1 MiB writes, then one fdatasync)"))
        k = 0

        def fresh() -> Path:
            """A new store directory, after the previous scenario's data left the page cache
            for the disk (os.sync), so that no scenario pays for another's writeback."""
            nonlocal k
            k += 1
            shutil.rmtree(root / f"s{k - 1}", ignore_errors=True)
            os.sync()
            return root / f"s{k}"

        n_sync1 = max(50, min(args.count // 50, int(fs * 2)))
        r1 = await sync_concurrent(fresh(), 1, n_sync1)
        rows.append(("sync, 1 appender", r1, f"{r1 / fs:.1f}x fsync"))
        r64 = await sync_concurrent(fresh(), 64, min(args.count, 64 * 200))
        rows.append(("sync, 64 appenders", r64, f"{r64 / fs:.1f}x fsync"))
        r1k = await sync_concurrent(fresh(), 1024, args.count)
        rows.append(("sync, 1024 appenders", r1k, f"{r1k / fs:.1f}x fsync (goal >= 50x)"))
        r1kb = await sync_concurrent(fresh(), 1024, args.count, build=True)
        rows.append(("sync, 1024 appenders, records built", r1kb, f"{r1kb / fs:.1f}x fsync (record building timed too)"))
        ra = await async_single(fresh(), args.count)
        rows.append(("async, single appends", ra, f"{ra / 150_000:.2f} of goal 150,000/s"))
        rb = await batches(fresh(), args.count * 2, "sync")
        rows.append(("append_batch(1000), sync", rb, f"{rb / 500_000:.2f} of goal 500,000/s"))
        rba = await batches(fresh(), args.count * 2, "async")
        rows.append(("append_batch(1000), async", rba, f"{rba / 500_000:.2f} of goal 500,000/s"))
        rbb, rbr = await bundles(fresh(), args.count * 2, "sync")
        rows.append(("append_batch(10 bundles x 100), sync", rbb, f"{rbb / 500_000:.2f} of goal 500,000/s (messages)"))
        rbba, _ = await bundles(fresh(), args.count * 2, "async")
        rows.append(("append_batch(10 bundles x 100), async", rbba, f"{rbba / 500_000:.2f} of goal 500,000/s (messages)"))
        rows.append(("reads of bundle members", rbr, f"{rbr / 300_000:.2f} of goal 300,000/s (read_queue_records)"))
        rq, ri, rc, rt = await reads(fresh(), args.count * 2)
        rows.append(("reads, read_queue_records", rq, f"{rq / 300_000:.2f} of goal 300,000/s"))
        rows.append(("reads, iter_log", ri, f"{ri / 300_000:.2f} of goal 300,000/s"))
        rows.append(("reads, read_queue + read", rc, f"{rc / 300_000:.2f} of goal 300,000/s"))
        rows.append(("tail: append_batch + read back", rt, "records/s, async, incl. the appends"))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"{'scenario (1 KiB records)':<38} {'per second':>14}  vs goal")
    for name, rate, note in rows:
        print(f"{name:<38} {rate:>14,.0f}  {note}")


if __name__ == "__main__":
    uvloop.run(main())
