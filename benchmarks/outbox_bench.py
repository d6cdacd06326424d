"""Outbox relay throughput: rows/s from insert to acknowledged send, on SQLite and PostgreSQL.

How this works: an embedded broker (fresh data directory, ``--flush sync``: a send is
acknowledged after its fsync) runs in this process, on uvloop. For each database and each
round a fresh outbox table is made, and two scenarios run:

* ``drain`` — ``--rows`` rows are inserted first (transactions of 500 rows); then one relay
  starts: rows/s from its start until the broker acknowledged the last row (its
  ``send_batch`` returned), and until the last row is recorded SENT.
* ``live`` — ``--writers`` application tasks (SQLite: one) insert the rows with ``Outbox.add`` in
  transactions of ``--tx-rows`` rows, as fast as they can, while ``--relays`` relays run:
  rows/s from the first insert to the last acknowledgement, and per row the time from
  its transaction's commit to the broker's acknowledgement (p50 / p99; when the writers
  outrun the relay this is mostly time spent in the backlog).
* ``paced`` — one writer in another ``Outbox`` object (as if in another process: no
  in-process wake-up) adds one row per transaction at ``--paced-rate`` rows/s; commit→ack
  p50 / p99: the wake-up latency (PostgreSQL: NOTIFY; SQLite and MySQL: the 100 ms poll).

Rounds interleave the databases; the table shows the median of the rounds and their range.
The application, the relays and the broker share one process and one event loop here, so
the figures are a floor for a relay in a process of its own. Reports:
``benchmarks/results/outbox-latest.{md,json}`` (``--out-dir``).

    python benchmarks/outbox_bench.py [--rows 20000] [--dbs sqlite,postgres] [--rounds 3]
        [--postgres postgresql://postgres@127.0.0.1:5432/postgres] [--mysql mysql://root:@127.0.0.1:3306/test]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from broker import Broker, BrokerConfig  # noqa: E402
from producer_sdk import Outbox, Producer  # noqa: E402
from producer_sdk.outbox import OUTBOX_ID, OutboxRelay  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


# -- databases ---------------------------------------------------------------------------------


class Database:
    """One database kind: ``url`` for ``Outbox.from_url``, fresh tables per cell."""

    def __init__(self, kind: str, url: str) -> None:
        self.kind, self.url = kind, url

    def outbox(self) -> Outbox:
        return Outbox.from_url(self.url, table="bench_" + uuid.uuid4().hex[:10])

    async def drop(self, outbox: Outbox) -> None:
        async with outbox.connection() as conn:
            await conn.execute(f"DROP TABLE IF EXISTS {outbox.table.t}")
            if self.kind == "mysql":
                await conn.commit()


async def _postgres(url: str) -> tuple[Database, str]:
    import asyncpg  # type: ignore[import-untyped]

    name = "halfmq_bench_" + uuid.uuid4().hex[:10]
    conn = await asyncpg.connect(url, timeout=5)
    try:
        await conn.execute(f"CREATE DATABASE {name}")
    finally:
        await conn.close()
    u = urlsplit(url)
    return Database("postgres", urlunsplit((u.scheme, u.netloc, "/" + name, "", ""))), name


async def _drop_postgres(url: str, name: str) -> None:
    import asyncpg  # type: ignore[import-untyped]

    conn = await asyncpg.connect(url, timeout=5)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await conn.close()


# -- the scenarios ----------------------------------------------------------------------------


class AckClock(Producer):
    """A producer noting when the broker acknowledged each outbox row (by ``OUTBOX_ID``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.acked: dict[int, float] = {}
        self.expected = 0
        self.all_acked = asyncio.Event()

    async def send_batch(self, topic: str, items: Iterable[Any]) -> list[Any]:
        items = list(items)
        results = await super().send_batch(topic, items)
        now = time.monotonic()
        for item in items:
            self.acked.setdefault(int(item["properties"][OUTBOX_ID]), now)
        if self.expected and len(self.acked) >= self.expected:
            self.all_acked.set()
        return results


async def _insert(outbox: Outbox, rows: int, tx_rows: int, body: bytes, start: int,
                  commits: dict[int, float] | None = None) -> None:
    """One application writer: ``rows`` rows in transactions of ``tx_rows``."""
    async with outbox.connection() as conn:
        done = 0
        while done < rows:
            n = min(tx_rows, rows - done)
            await conn.begin()
            ids = [await outbox.add(conn.raw, "bench", body, keys=[f"k{start + done + i}"])
                   for i in range(n)]
            await conn.commit()
            if commits is not None:
                now = time.monotonic()
                commits.update((i, now) for i in ids)
            done += n


async def _wait_recorded(outbox: Outbox, rows: int) -> None:
    while (await outbox.status()).sent < rows:
        await asyncio.sleep(0.01)


async def _relays(outbox: Outbox, producers: list[AckClock], batch_size: int) -> list[asyncio.Task[None]]:
    relays = [OutboxRelay(outbox, p, batch_size=batch_size, cleanup_interval=3600.0)
              for p in producers]
    return [asyncio.create_task(r.run()) for r in relays]


async def _stop(tasks: list[asyncio.Task[None]]) -> None:
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def drain(db: Database, outbox: Outbox, address: str,
                args: argparse.Namespace) -> dict[str, float]:
    body = os.urandom(args.size)
    await _insert(outbox, args.rows, 500, body, 0)
    producer = AckClock(address)
    await producer.start()
    producer.expected = args.rows
    t0 = time.monotonic()
    tasks = await _relays(outbox, [producer], args.batch_size)
    try:
        await asyncio.wait_for(producer.all_acked.wait(), args.timeout)
        acked = time.monotonic() - t0
        await asyncio.wait_for(_wait_recorded(outbox, args.rows), args.timeout)
        recorded = time.monotonic() - t0
    finally:
        await _stop(tasks)
        await producer.close()
    return {"acked_per_s": args.rows / acked, "recorded_per_s": args.rows / recorded}


async def live(db: Database, outbox: Outbox, address: str,
               args: argparse.Namespace) -> dict[str, float]:
    body = os.urandom(args.size)
    producers = [AckClock(address) for _ in range(args.relays)]
    for p in producers:
        await p.start()
    ack_all = asyncio.Event()

    def merged() -> dict[int, float]:
        out: dict[int, float] = {}
        for p in producers:
            out.update(p.acked)
        return out

    async def watch() -> None:
        while len(merged()) < args.rows:
            await asyncio.sleep(0.002)
        ack_all.set()

    tasks = await _relays(outbox, producers, args.batch_size)
    commits: dict[int, float] = {}
    writers = 1 if db.kind == "sqlite" else args.writers  # SQLite has one writer at a time
    per_writer = args.rows // writers
    t0 = time.monotonic()
    try:
        watcher = asyncio.create_task(watch())
        await asyncio.gather(*(
            _insert(outbox, per_writer if w < writers - 1 else args.rows - per_writer * w,
                    args.tx_rows, body, w * per_writer, commits) for w in range(writers)))
        inserted = time.monotonic() - t0
        await asyncio.wait_for(ack_all.wait(), args.timeout)
        acked = time.monotonic() - t0
        watcher.cancel()
        await asyncio.wait_for(_wait_recorded(outbox, args.rows), args.timeout)
    finally:
        await _stop(tasks)
        for p in producers:
            await p.close()
    acks = merged()
    latencies = sorted((acks[i] - commits[i]) * 1000 for i in commits)
    return {"acked_per_s": args.rows / acked, "inserted_per_s": args.rows / inserted,
            "p50_ms": latencies[len(latencies) // 2],
            "p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]}


async def paced(db: Database, outbox: Outbox, address: str,
                args: argparse.Namespace) -> dict[str, float]:
    body = os.urandom(args.size)
    writer = Outbox.from_url(db.url, table=outbox.table.t)  # no in-process wake-up
    producer = AckClock(address)
    await producer.start()
    producer.expected = args.paced_rows
    tasks = await _relays(outbox, [producer], args.batch_size)
    commits: dict[int, float] = {}
    try:
        async with writer.connection() as conn:
            t0 = time.monotonic()
            for n in range(args.paced_rows):
                await asyncio.sleep(max(0.0, t0 + n / args.paced_rate - time.monotonic()))
                await conn.begin()
                row_id = await writer.add(conn.raw, "bench", body, keys=[f"p{n}"])
                await conn.commit()
                commits[row_id] = time.monotonic()
        await asyncio.wait_for(producer.all_acked.wait(), args.timeout)
    finally:
        await _stop(tasks)
        await producer.close()
    latencies = sorted((producer.acked[i] - t) * 1000 for i, t in commits.items())
    return {"p50_ms": latencies[len(latencies) // 2],
            "p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]}


# -- the run -----------------------------------------------------------------------------------


def _median(values: list[float]) -> str:
    return f"{statistics.median(values):,.0f}" + (
        f" ({min(values):,.0f}–{max(values):,.0f})" if len(values) > 1 else "")


def _median_ms(values: list[float]) -> str:
    return f"{statistics.median(values):.1f}"


def report(cells: dict[str, dict[str, list[dict[str, float]]]], args: argparse.Namespace,
           meta: dict[str, Any]) -> str:
    lines = [f"# outbox relay, {meta['time']}", "",
             f"{meta['cpus']} CPUs, load average {meta['load_before']} before and "
             f"{meta['load_after']} after; Python {meta['python']}; embedded broker "
             f"--flush sync; {args.rows:,} rows of {args.size} B per cell; batch "
             f"{args.batch_size}; live: {args.writers} writer(s) (SQLite: 1), {args.tx_rows} rows per "
             f"transaction, {args.relays} relay(s); paced: {args.paced_rows} rows, one per "
             f"transaction, at {args.paced_rate:g}/s from another Outbox object; median of "
             f"{args.rounds} round(s) (min–max)",
             "", "| database | drain: acked rows/s | drain: recorded rows/s | live: acked rows/s "
             "| live: inserted rows/s | live commit→ack p50 / p99 ms | paced commit→ack p50 / "
             "p99 ms |",
             "|---|---:|---:|---:|---:|---|---|"]
    for kind, runs in cells.items():
        d, v, p = runs["drain"], runs["live"], runs["paced"]
        lines.append(
            f"| {kind} | {_median([r['acked_per_s'] for r in d])} | "
            f"{_median([r['recorded_per_s'] for r in d])} | "
            f"{_median([r['acked_per_s'] for r in v])} | "
            f"{_median([r['inserted_per_s'] for r in v])} | "
            f"{_median_ms([r['p50_ms'] for r in v])} / {_median_ms([r['p99_ms'] for r in v])} | "
            f"{_median_ms([r['p50_ms'] for r in p])} / {_median_ms([r['p99_ms'] for r in p])} |")
    return "\n".join(lines) + "\n"


async def main(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """Run every cell; return the report's text and the JSON payload."""
    meta: dict[str, Any] = {"time": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                            "cpus": os.cpu_count(), "python": platform.python_version(),
                            "load_before": " ".join(f"{x:.2f}" for x in os.getloadavg())}
    kinds = [k.strip() for k in args.dbs.split(",") if k.strip()]
    with tempfile.TemporaryDirectory(prefix="halfmq-outbox-bench-") as tmp:
        dbs: list[Database] = []
        pg_name = None
        for kind in kinds:
            if kind == "sqlite":
                db = Database("sqlite", f"sqlite:{Path(tmp) / 'app.db'}")
                async with Outbox.from_url(db.url).connection() as conn:
                    await conn.fetch("PRAGMA journal_mode=WAL")
                dbs.append(db)
            elif kind == "postgres":
                db, pg_name = await _postgres(args.postgres)
                dbs.append(db)
            elif kind == "mysql":
                dbs.append(Database("mysql", args.mysql))
            else:
                raise SystemExit(f"unknown database {kind!r}: sqlite, postgres or mysql")
        cells: dict[str, dict[str, list[dict[str, float]]]] = {
            db.kind: {"drain": [], "live": [], "paced": []} for db in dbs}
        config = BrokerConfig(data_dir=str(Path(tmp) / "broker"), port=0, http_port=0)
        try:
            async with Broker(config) as broker:
                for round_no in range(args.rounds):
                    for db in dbs:
                        for scenario, run in (("drain", drain), ("live", live), ("paced", paced)):
                            outbox = db.outbox()
                            await outbox.create_table()
                            try:
                                result = await run(db, outbox, broker.address, args)
                            finally:
                                await db.drop(outbox)
                            cells[db.kind][scenario].append(result)
                            if not args.quiet:
                                print(f"round {round_no + 1} {db.kind} {scenario}: "
                                      + ", ".join(f"{k} {v:,.1f}" for k, v in result.items()),
                                      flush=True)
        finally:
            if pg_name:
                await _drop_postgres(args.postgres, pg_name)
    meta["load_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    settings = {k: v for k, v in vars(args).items() if k != "out_dir"}
    return report(cells, args, meta), {"meta": meta, "settings": settings, "cells": cells}


def write_reports(out_dir: str, text: str, payload: dict[str, Any]) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "outbox-latest.md").write_text(text)
    (out / "outbox-latest.json").write_text(json.dumps(payload, indent=2))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dbs", default="sqlite,postgres",
                   help="databases to measure: sqlite, postgres, mysql [sqlite,postgres]")
    p.add_argument("--rows", type=int, default=20_000, help="rows per cell [20000]")
    p.add_argument("--size", type=int, default=1024, help="message body bytes [1024]")
    p.add_argument("--batch-size", type=int, default=500, help="relay batch size [500]")
    p.add_argument("--tx-rows", type=int, default=10,
                   help="live: rows per application transaction [10]")
    p.add_argument("--writers", type=int, default=4,
                   help="live: concurrent application writers (SQLite: always 1) [4]")
    p.add_argument("--relays", type=int, default=1, help="live: relays running [1]")
    p.add_argument("--paced-rows", type=int, default=500, help="paced: rows [500]")
    p.add_argument("--paced-rate", type=float, default=100.0, help="paced: rows/s [100]")
    p.add_argument("--rounds", type=int, default=3, help="rounds, databases interleaved [3]")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds a cell may take [300]")
    p.add_argument("--postgres", default=os.environ.get(
        "HALFMQ_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres"),
        help="a PostgreSQL server; a database is created for the run and dropped")
    p.add_argument("--mysql", default=os.environ.get(
        "HALFMQ_TEST_MYSQL", "mysql://root:@127.0.0.1:3306/test"),
        help="a MySQL/MariaDB database (tables are created and dropped in it)")
    p.add_argument("--out-dir", default=str(RESULTS), help=f"reports go here [{RESULTS}]")
    p.add_argument("-q", "--quiet", action="store_true", help="no line per cell")
    return p


if __name__ == "__main__":
    import uvloop

    arguments = build_parser().parse_args()
    report_text, report_payload = uvloop.run(main(arguments))
    print(report_text)
    write_reports(arguments.out_dir, report_text, report_payload)
