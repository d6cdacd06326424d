"""Cluster engine features, measured through ``JetStreamEngine`` on a local 3-node cluster.

How this works
--------------
``python -m benchmarks.cluster_features`` starts a ``LocalCluster`` (3 nodes, ``sync_interval:
always``) and one ``JetStreamEngine`` in this process, and drives the engine through its
boundary with in-memory sessions (no gateway socket in between), three cells in one run:

1. **scheduled**: ``--scheduled`` messages, due one after the other over ``--spread``
   seconds from ``--lead`` seconds on, all sent (batches of 100) before the first is due;
   each one's *lateness* is its arrival at the consumer minus its due time (one clock).
   A negative lateness would be an early delivery.
2. **fifo**: ``--groups`` message groups × ``--per-group`` messages, sent interleaved;
   one FIFO push member (prefetch 256) acks each message as it arrives and checks the
   order per group; messages/s from the first delivery to the last ack.
3. **pull**: ``--pull`` messages received in batches of 32 (invisible 30 s) and acked
   with one SETTLE per batch, in a loop; messages/s.

Printed and written to ``--out-dir``/``cluster-features-latest.{txt,json}``. The exit
status is 1 if a scheduled message came early or any message is missing or out of order.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["main"]


class _Session:
    """A minimal in-process ``Session``: replies, errors and deliveries land in lists."""

    _ids = itertools.count(1)

    def __init__(self, role: str) -> None:
        self.conn_id = f"bench{next(self._ids)}"
        self.client_id, self.role, self.group, self.peer = self.conn_id, role, None, "127.0.0.1:0"
        self.closed = False
        self.writable = True
        self.answers: dict[int, asyncio.Future[Any]] = {}
        self.deliveries: list[tuple[float, list[Any]]] = []
        self.delivered = asyncio.Event()
        self._rid = itertools.count(1)

    def call(self) -> tuple[int, asyncio.Future[Any]]:
        rid = next(self._rid)
        fut = self.answers[rid] = asyncio.get_running_loop().create_future()
        return rid, fut

    def output_room(self) -> int:
        return 1 << 30

    def reply(self, rid: int, payload: Any) -> None:
        fut = self.answers.pop(rid, None)
        if fut is not None and not fut.done():
            fut.set_result(payload)

    def error(self, rid: int, exc: Exception) -> None:
        fut = self.answers.pop(rid, None)
        if fut is not None and not fut.done():
            fut.set_exception(exc)

    def deliver(self, items: list[list[Any]]) -> None:
        now = time.time() * 1000
        self.deliveries.extend((now, item) for item in items)
        self.delivered.set()

    def request(self, op: int, payload: Any) -> asyncio.Future[Any]:
        return asyncio.get_running_loop().create_future()

    def flush(self) -> None:
        pass


class _Sub:
    def __init__(self, group: str, topic: str, fifo: bool = False, prefetch: int = 256) -> None:
        self.group, self.topic, self.tags, self.start = group, topic, "*", "earliest"
        self.prefetch, self.max_reconsume_times, self.fifo = prefetch, 16, fifo


def _q(values: list[float], p: float) -> float:
    values = sorted(values)
    return round(values[min(len(values) - 1, max(0, int(p * len(values) + 0.5) - 1))], 1)


async def _send(engine: Any, p: _Session, topic: str, rows: list[list[Any]]) -> dict[str, Any]:
    rid, fut = p.call()
    engine.send(p, rid, topic, rows, False)
    return await fut  # type: ignore[no-any-return]


async def _scheduled(engine: Any, n: int, spread: float, lead: float) -> dict[str, Any]:
    p, c = _Session("producer"), _Session("consumer")
    rid, fut = c.call()
    engine.subscribe(c, rid, _Sub("bench", "bench-scheduled", prefetch=4096))
    await fut
    base = int(time.time() * 1000 + lead * 1000)
    due: dict[str, int] = {}
    for k in range(0, n, 100):
        dues = [base + int((k + i) * spread * 1000 / n) for i in range(min(100, n - k))]
        rows: list[list[Any]] = [[b"x", None, [], {}, 0, {"at": at}] for at in dues]
        r = await _send(engine, p, "bench-scheduled", rows)
        for at, (pos, _q0, _off) in zip(dues, r["r"], strict=True):
            due[r["p"] + f"{pos:016X}"] = at
    sent_before_due_ms = base - time.time() * 1000
    deadline = time.monotonic() + lead + spread + 60
    while len(c.deliveries) < n and time.monotonic() < deadline:
        c.delivered.clear()
        await asyncio.wait([asyncio.ensure_future(c.delivered.wait())], timeout=1.0)
        engine.ack(c, 0, [(t, True) for _a, (t, _w) in c.deliveries[-512:]])
    late = [a - due[w[0]] for a, (_t, w) in c.deliveries if w[0] in due]
    return {"messages": n, "received": len(late), "spread_s": spread,
            "all_sent_ms_before_first_due": round(sent_before_due_ms), "early": sum(1 for v in late if v < 0),
            "lateness_ms": {"min": _q(late, 0.0), "p50": _q(late, 0.5), "p99": _q(late, 0.99),
                            "max": _q(late, 1.0)} if late else None}


async def _fifo(engine: Any, groups: int, per_group: int) -> dict[str, Any]:
    p, c = _Session("producer"), _Session("consumer")
    topic = "bench-fifo"
    for i in range(per_group):
        rows: list[list[Any]] = [[b"%d" % i, None, [], {}, 0, {"group": f"g{g}"}] for g in range(groups)]
        for k in range(0, len(rows), 500):
            await _send(engine, p, topic, rows[k:k + 500])
    rid, fut = c.call()
    engine.subscribe(c, rid, _Sub("bench-fifo", topic, fifo=True))
    await fut
    total, done, next_i = groups * per_group, 0, [0] * groups
    disorder = 0
    start = None
    deadline = time.monotonic() + 600
    while done < total and time.monotonic() < deadline:
        c.delivered.clear()
        batch = c.deliveries[done:]
        if not batch:
            await asyncio.wait([asyncio.ensure_future(c.delivered.wait())], timeout=1.0)
            continue
        start = start or time.monotonic()
        for _a, (_t, w) in batch:
            g = int(w[11]["g"][1:])
            disorder += int(w[2]) != next_i[g]
            next_i[g] = int(w[2]) + 1
        done += len(batch)
        engine.ack(c, 0, [(t, True) for _a, (t, _w) in batch])
    elapsed = time.monotonic() - (start or time.monotonic())
    return {"groups": groups, "per_group": per_group, "received": done, "out_of_order": disorder,
            "msgs_per_s": round(done / elapsed) if elapsed > 0 else None}


async def _pull(engine: Any, n: int) -> dict[str, Any]:
    p, c = _Session("producer"), _Session("consumer")
    topic = "bench-pull"
    for k in range(0, n, 500):
        await _send(engine, p, topic, [[b"x", None, [], {}, 0] for _ in range(min(500, n - k))])
    got = 0
    start = time.monotonic()
    deadline = start + 600
    while got < n and time.monotonic() < deadline:
        rid, fut = c.call()
        engine.receive(c, rid, group="bench-pull", topic=topic, tags=None, max_messages=32,
                       invisible_ms=30_000, wait_ms=2000)
        items = (await fut)["m"]
        if items:
            rid, fut = c.call()
            engine.settle(c, rid, "bench-pull", [[h, "ack", 0] for h, _w in items])
            await fut
        got += len(items)
    elapsed = time.monotonic() - start
    return {"messages": n, "received": got, "batch": 32, "msgs_per_s": round(got / elapsed)}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Start the cluster and the engine, run the three cells, stop; returns the results."""
    from broker.config import BrokerConfig
    from broker.engines.jetstream.engine import JetStreamEngine
    from broker.engines.jetstream.local_cluster import LocalCluster

    with tempfile.TemporaryDirectory(prefix="halfmq-cluster-bench-") as tmp:
        cluster = LocalCluster(Path(tmp), nodes=3).start()
        try:
            engine = JetStreamEngine(BrokerConfig(ack_timeout=60.0), urls=cluster.urls, replicas=3,
                                     monitor_urls=cluster.monitor_urls)
            await engine.start()
            try:
                return {
                    "settings": {"nodes": 3, "sync_interval": "always", "replicas": 3,
                                 "machine": f"{platform.machine()}, {platform.python_version()}"},
                    "scheduled": await _scheduled(engine, args.scheduled, args.spread, args.lead),
                    "fifo": await _fifo(engine, args.groups, args.per_group),
                    "pull": await _pull(engine, args.pull),
                }
            finally:
                await engine.stop()
        finally:
            cluster.stop()


def main(argv: list[str] | None = None) -> int:
    """Parse the flags, run, print and write the results; returns the exit status."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.cluster_features", description=__doc__.split("\n")[0])
    ap.add_argument("--scheduled", type=int, default=2000, help="scheduled messages (default 2000)")
    ap.add_argument("--spread", type=float, default=2.0, help="seconds over which they come due (2)")
    ap.add_argument("--lead", type=float, default=3.0, help="seconds before the first is due (3)")
    ap.add_argument("--groups", type=int, default=1000, help="FIFO message groups (1000)")
    ap.add_argument("--per-group", type=int, default=5, help="messages per FIFO message group (5)")
    ap.add_argument("--pull", type=int, default=5000, help="messages pulled in batches of 32 (5000)")
    ap.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    res = asyncio.run(run(args))
    text = json.dumps(res, indent=2)
    print(text)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cluster-features-latest.json").write_text(text + "\n")
    s, f, p = res["scheduled"], res["fifo"], res["pull"]
    summary = (f"scheduled: {s['received']}/{s['messages']} due over {s['spread_s']} s, lateness ms "
               f"{s['lateness_ms']}, early {s['early']}\n"
               f"fifo: {f['groups']} groups x {f['per_group']}, {f['msgs_per_s']} msgs/s, "
               f"out of order {f['out_of_order']}\n"
               f"pull: batches of 32, {p['msgs_per_s']} msgs/s ({p['received']}/{p['messages']})\n")
    (out / "cluster-features-latest.txt").write_text(summary)
    print(summary, end="")
    ok = (s["early"] == 0 and s["received"] == s["messages"] and f["out_of_order"] == 0
          and f["received"] == f["groups"] * f["per_group"] and p["received"] == p["messages"])
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
