"""The halfmq end-to-end benchmark (``python -m benchmarks.e2e``): publish, one-at-a-time
latency, producers and consumers together, transactional sends beside normal ones, and the
broker's RSS under a backlog with a slow consumer, for each flush mode.

How this works
--------------
Each step is a flow of the harness (``benchmarks.harness.run_flow``: worker processes,
CPU and RSS sampling) against a fresh halfmq broker; the steps' numbers are collected into
one dict and rendered as a text table.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
from typing import Any

from benchmarks.harness import (
    Settings,
    _cell_metrics,
    _consumer_params,
    _e2e_numbers,
    _install_uvloop,
    _lat_stats,
    _producer_params,
    fsync_rate,
    machine_info,
    run_flow,
)
from benchmarks.report import _fmt_ms

__all__ = ["run_e2e_steps", "render_e2e_steps"]


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
