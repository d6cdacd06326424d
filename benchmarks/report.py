"""The comparison's report: medians over rounds, the goal ratios, the Markdown tables and
the chart, from the cells that ``benchmarks.harness`` measured.

How this works
--------------
``summarize`` groups the cells by system and scenario and takes the median (min–max) of
each figure over rounds; ``goals`` turns the medians into the project's goal ratios;
``render_markdown`` and ``render_chart`` write them for people. Nothing here measures or
starts anything: it is pure functions of the report dict the harness builds.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Iterable
from typing import Any

__all__ = ["SCENARIO_TITLES", "summarize", "goals", "goals_by_round", "render_markdown", "render_chart"]

#: A process is called saturated when it used at least this share of its CPU capacity.
SATURATED = 0.85

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
    "e2e-users-default": ("e2e-users-default — e2e-users with PushConsumer's default concurrency and "
                          "prefetch (an application that tunes neither)"),
    "tx-users-wal": ("tx-users-wal — tx-users with SQLite in WAL mode, synchronous=NORMAL (a commit "
                     "appends to the WAL without an fsync; a power cut may lose the last commits)"),
    "tx-users-inline": ("tx-users-inline — tx-users-wal with TransactionProducer(execute_workers=0): the "
                        "listener, a plain def, called on the event loop instead of in a thread"),
    "tx-users-batch": ("tx-users-batch — tx-users with a BatchTransactionListener: the local transactions "
                       "of the halves stored meanwhile inserted in one SQLite transaction, one commit "
                       "(+ fsync, SQLite's defaults) per batch"),
    "tx-users-batch-wal": ("tx-users-batch-wal — tx-users-batch with SQLite in WAL mode, "
                           "synchronous=NORMAL"),
}


def _median_minmax(values: Iterable[float | None]) -> tuple[float | None, float | None, float | None]:
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None, None
    return statistics.median(vals), min(vals), max(vals)


def _saturation(cpu: dict[str, float], capacity: float) -> str:
    """Which side ran out of CPU: 'server', 'producer', 'consumer', several, or none.

    A side whose CPU alone is under the threshold still counts when its event loop was
    busy, blocked in its own disk writes (``server_disk_wait``) or waiting for a CPU
    (``<role>_runq``: runnable while the other processes had the cores) that much of the
    time; the label then says how the time was made up."""
    sides = []
    server = cpu.get("server", 0.0)
    if server >= SATURATED * capacity:
        sides.append("server")
    else:
        disk, runq = cpu.get("server_disk_wait", 0.0), cpu.get("server_runq", 0.0)
        if server + disk + runq >= SATURATED * capacity:
            # a single event loop busy, blocked in its own disk writes or runnable all the time
            parts = [f"CPU {server:.0f}%"]
            if disk >= 0.5:
                parts.append(f"waiting for its own disk writes {disk:.0f}%")
            if runq >= 0.5:
                parts.append(f"waiting for a CPU {runq:.0f}%")
            sides.append(f"server (event loop: {' + '.join(parts)})")
    for role in ("producer", "consumer"):
        n = 1  # one process per role in the comparison; each is single-threaded Python
        if role not in cpu:
            continue
        runq = cpu.get(f"{role}_runq", 0.0)
        if cpu[role] >= SATURATED * 100.0 * n:
            sides.append(role)
        elif cpu[role] + runq >= SATURATED * 100.0 * n:
            sides.append(f"{role} (CPU {cpu[role]:.0f}% + waiting for a CPU {runq:.0f}%)")
    if sides:
        return "+".join(sides)
    if cpu.get("machine", 0.0) >= SATURATED * 100.0 * (os.cpu_count() or 1):
        return f"machine (all cores busy; {cpu.get('others', 0):.0f}% by other processes)"
    return "none (waiting: disk, network or the other side)"



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
    # issue 18's goals for the scenarios as users write them (the public SDK, a task per send)
    pub_u = _get(summary, hq, "publish-users", "rate")
    e2e_u = _get(summary, hq, "e2e-users", "rate")
    ratio("publish-users ≥ 3× nats", pub_u, _get(summary, "nats", "publish-users", "rate"), 3)
    ratio("publish-users ≥ 45% of echo ceiling", pub_u, limits.get("echo"), 0.45, unit="share")
    ratio("e2e-users ≥ 2× nats", e2e_u, _get(summary, "nats", "e2e-users", "rate"), 2)
    ratio("e2e-users ≥ 1.3× redis-everysec", e2e_u,
          _get(summary, "redis-everysec", "e2e-users", "rate"), 1.3)
    ratio("tx-users ≥ 50% of e2e-users", _get(summary, hq, "tx-users", "rate"), e2e_u, 0.50,
          unit="share")
    ratio("tx-users-wal ≥ 50% of e2e-users (SQLite WAL, synchronous=NORMAL)",
          _get(summary, hq, "tx-users-wal", "rate"), e2e_u, 0.50, unit="share")
    ratio("tx-users-inline ≥ 50% of e2e-users (tx-users-wal, listener on the event loop)",
          _get(summary, hq, "tx-users-inline", "rate"), e2e_u, 0.50, unit="share")
    ratio("tx-users-batch ≥ 50% of e2e-users (a batch listener, one SQLite commit per batch)",
          _get(summary, hq, "tx-users-batch", "rate"), e2e_u, 0.50, unit="share")
    ratio("tx-users-batch-wal ≥ 50% of e2e-users (tx-users-batch, SQLite WAL)",
          _get(summary, hq, "tx-users-batch-wal", "rate"), e2e_u, 0.50, unit="share")
    # one at a time: the disk's own write+fsync (one after another, so 1 / its rate) + 0.15 ms
    fsync_rate = limits.get("fsync")
    absolute("latency p50 ≤ the disk's 1 KiB write+fsync + 0.15 ms",
             _get(summary, hq, "latency", "p50") if fsync_rate else None,
             round(1000.0 / fsync_rate + 0.15, 3) if fsync_rate else 0.15, False, "ms")
    # the absolute goals for halfmq alone on this machine
    absolute("publish ≥ 60,000 msgs/s", pub, 60_000, True, "msgs/s")
    absolute("e2e ≥ 30,000 msgs/s", e2e, 30_000, True, "msgs/s")
    absolute("latency p50 ≤ 0.35 ms", _get(summary, hq, "latency", "p50"), 0.35, False, "ms")
    absolute("latency p99 ≤ 1 ms", _get(summary, hq, "latency", "p99"), 1.0, False, "ms")
    absolute("tx p99 send→deliver ≤ 10 ms at half rate", _get(summary, hq, "tx", "half_p99"),
             10.0, False, "ms")
    return rows


def goals_by_round(cells: list[dict[str, Any]], limits: dict[str, list[float]],
                   rows: list[dict[str, Any]]) -> None:
    """Judge every goal of ``rows`` (the medians' goals) again on each round's own cells and
    limits, and store the per-round results in each row's ``rounds`` (a list of "pass",
    "MISS" or "n/a", round 1 first): a goal met at the median may still miss in a round."""
    rounds = sorted({c["round"] for c in cells})
    by_name = {row["goal"]: row for row in rows}
    for row in rows:
        row["rounds"] = []
    for rnd in rounds:
        summary = summarize([c for c in cells if c["round"] == rnd])
        lim = {k: vals[rnd - 1] for k, vals in limits.items() if len(vals) >= rnd}
        for g in goals(summary, lim):
            if g["goal"] in by_name:
                by_name[g["goal"]]["rounds"].append(g["result"])


def _fmt_rounds(row: dict[str, Any]) -> str:
    judged = [r for r in row.get("rounds", []) if r != "n/a"]
    if not judged:
        return "—"
    return f"{judged.count('pass')} of {len(judged)}"


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
        "that time at the same threshold also names the server. A process that is one event "
        "loop (every client; halfmq's and Redis's server) also counts the time its main thread "
        "waited for a CPU (runnable while the other processes had the cores: its run-queue "
        "delay, /proc/PID/schedstat); CPU plus that time names it too, and the label says so.",
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
    for key, what in (("sqlite", "tx-users' listener uses it: insert + commit per second (6 threads, "
                                  "default journal)"),
                      ("sqlite-wal", "tx-users-wal's (and tx-users-inline's) listener uses it: insert + "
                                     "commit per second (6 threads, WAL, synchronous=NORMAL)")):
        if key in lim:
            q = lim[key]
            lines.append(f"| SQLite alone as {what} | {_fmt_rate(q['median'])} | "
                         f"{_fmt_range(q['min'], q['max'])} |")
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
        elif scenario in ("e2e", "tx", "fifo", "pull", "e2e-users", "e2e-users-default", "pull-users", "tx-users",
                          "tx-users-wal", "tx-users-inline", "tx-users-batch", "tx-users-batch-wal"):
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
              "*rounds passed*: the same goal judged on each round's own cells and limits.", "",
              "| goal | measured | target | result | rounds passed |", "|---|---:|---:|---|---:|"]
    for g in report["goals"]:
        lines.append(f"| {g['goal']} | {_fmt_goal_value(g)} | {_fmt_goal_target(g)} | {g['result']} "
                     f"| {_fmt_rounds(g)} |")
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
