"""A tiny run of the benchmark harness: halfmq only, very small cells, output files written.

No timing assertions: this checks that the harness, its worker processes and its report
writers work end to end, not how fast anything is.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent

# (generous: each run starts brokers and worker processes; on a busy 2-core machine one took
# more than 45 s)
pytestmark = pytest.mark.timeout(150)


@pytest.mark.skipif(importlib.util.find_spec("psutil") is None,
                    reason="the harness samples CPU with psutil (pip install psutil)")
def test_bench_smoke_writes_reports(tmp_path: Path) -> None:
    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "benchmarks", "--systems", "halfmq-sync,halfmq-secure",
           "--scenarios", "publish,latency,e2e,batch", "--rounds", "1", "--duration", "0.3",
           "--warmup", "0", "--window", "16", "--out-dir", str(out), "--workdir", str(tmp_path),
           "--quiet"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = (out / "latest.md").read_text()
    assert "halfmq-sync" in md and "## Goals" in md
    report = json.loads((out / "latest.json").read_text())
    assert report["systems"] == ["halfmq-sync", "halfmq-secure"]
    assert not report["errors"], report["errors"]
    for system in ("halfmq-sync", "halfmq-secure"):  # the latter: SCRAM logins and TLS
        summary = report["summary"][system]
        for scenario in ("publish", "latency", "e2e", "batch"):
            assert summary[scenario]["rate"] > 0, (system, scenario)
        assert summary["e2e"]["samples"] > 0
    # the broker reports the time its event loop waited for its own disk writes
    assert summary["publish"]["cpu"]["server_disk_wait"] > 0
    # and each event loop's time waiting for a CPU is sampled (it can be 0 on an idle machine)
    for role in ("server_runq", "producer_runq", "consumer_runq"):
        assert summary["e2e"]["cpu"][role] >= 0, role
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "latest.png").stat().st_size > 0
    # the markdown table is also printed on stdout
    assert "## publish" in proc.stdout


@pytest.mark.skipif(importlib.util.find_spec("psutil") is None,
                    reason="the harness samples CPU with psutil (pip install psutil)")
def test_e2e_benchmark_writes_every_step(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "benchmarks.e2e", "--flush", "async", "--duration", "0.3",
           "--backlog", "0", "--out-dir", str(tmp_path), "--workdir", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=45)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = (tmp_path / "e2e-latest.txt").read_text()
    for line in ("publish (no consumer)", "one-at-a-time publish", "e2e at half rate", "tx at half rate"):
        assert line in text, line
    res = json.loads((tmp_path / "e2e-latest.json").read_text())["modes"]["async"]
    for step in ("publish", "latency", "e2e", "e2e_half", "tx", "tx_half"):
        assert res[step]["rate" if step in ("publish", "latency") else "p50"] > 0, step


def test_a_loop_busy_or_blocked_in_its_own_writes_is_the_saturated_side() -> None:
    from benchmarks.harness import _saturation

    assert _saturation({"server": 60.0, "server_disk_wait": 35.0, "producer": 30.0}, 100.0).startswith(
        "server (event loop: CPU 60% + waiting for its own disk writes 35%)")
    assert _saturation({"server": 60.0, "server_disk_wait": 10.0, "producer": 30.0}, 100.0).startswith("none")
    assert _saturation({"server": 90.0, "producer": 30.0}, 100.0) == "server"
    # runnable but without a CPU (the other processes had the cores) counts as busy too
    assert _saturation({"server": 70.0, "server_disk_wait": 12.0, "server_runq": 14.0, "producer": 55.0,
                        "producer_runq": 10.0}, 100.0) == (
        "server (event loop: CPU 70% + waiting for its own disk writes 12% + waiting for a CPU 14%)")
    assert _saturation({"server": 50.0, "server_runq": 5.0, "producer": 60.0, "producer_runq": 30.0},
                       100.0) == "producer (CPU 60% + waiting for a CPU 30%)"
    assert _saturation({"server": 50.0, "server_runq": 5.0, "producer": 60.0, "producer_runq": 5.0},
                       100.0).startswith("none")


@pytest.mark.skipif(importlib.util.find_spec("psutil") is None,
                    reason="the benchmark samples the broker's CPU with psutil (pip install psutil)")
def test_scheduled_benchmark_writes_its_report(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "benchmarks.scheduled", "--rate", "500", "--seconds", "0.5", "--lead", "2",
           "--batch", "100", "--out-dir", str(tmp_path), "--workdir", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=50)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "scheduled-latest.json").read_text())
    assert res["scheduled"]["received"] == res["plain"]["received"] == 250
    assert res["scheduled"]["early"] == 0 and res["scheduled"]["p50"] >= 0
    assert "scheduled" in (tmp_path / "scheduled-latest.txt").read_text()


@pytest.mark.skipif(importlib.util.find_spec("psutil") is None,
                    reason="the harness samples CPU with psutil (pip install psutil)")
def test_bench_users_scenarios_deliver_every_message(tmp_path: Path) -> None:
    """The scenarios written as applications write them (a task per send, PushConsumer with
    concurrency 64, SimpleConsumer acking each message, a local transaction writing to SQLite)
    each send and deliver exactly the messages they count."""
    out = tmp_path / "results"
    scenarios = ["publish-users", "e2e-users", "e2e-users-default", "pull-users", "tx-users", "tx-users-wal",
                 "tx-users-inline", "tx-users-batch", "tx-users-batch-wal"]
    cmd = [sys.executable, "-m", "benchmarks", "--systems", "halfmq-sync", "--scenarios", ",".join(scenarios),
           "--rounds", "1", "--count", "300", "--warmup", "0", "--window", "32", "--out-dir", str(out),
           "--workdir", str(tmp_path), "--quiet"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "latest.json").read_text())
    assert not report["errors"], report["errors"]
    cells = {c["scenario"]: c["result"] for c in report["cells"]}
    assert cells["publish-users"]["count"] == 300 and cells["publish-users"]["errors"] == 0
    for scenario in scenarios[1:]:
        r = cells[scenario]
        assert (r["sent"], r["received"], r["errors"]) == (300, 300, 0), (scenario, r)
    md = (out / "latest.md").read_text()
    assert "as applications write it" in md
    assert "SQLite alone as tx-users-wal's (and tx-users-inline's) listener uses it" in md
    # each goal is judged on the one round too
    for name in ("tx-users-wal", "tx-users-batch "):
        goal = next(g for g in report["goals"] if g["goal"].startswith(name))
        assert len(goal["rounds"]) == 1 and goal["rounds"][0] in ("pass", "MISS")


@pytest.mark.parametrize("args", [["producer"], ["producer", "--floor"], ["consumer"],
                                  ["tx", "--sqlite", "--workers", "0"], ["tx", "--sqlite", "--batch"]])
def test_sdk_bench_runs_each_side(args: list[str]) -> None:
    cmd = [sys.executable, "-m", "benchmarks.sdk_bench", *args, "--count", "2000"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=50)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    unit = "transaction (2,000 transactions)" if args[0] == "tx" else "message (2,000 messages)"
    assert f"us of CPU per {unit}" in proc.stdout


@pytest.mark.parametrize("module", ["benchmarks.delivery_bench", "benchmarks.ingest_bench"])
def test_broker_path_benches_run(module: str) -> None:
    cmd = [sys.executable, "-m", module, "--count", "3000"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=50)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "us CPU per message (3000 messages" in proc.stdout


def test_broker_cost_compares_each_variant_with_plain() -> None:
    cmd = [sys.executable, "-m", "benchmarks.broker_cost", "--cpu", "--count", "400", "--scenarios", "e2e,tx"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = [line.split() for line in proc.stdout.splitlines()[2:]]
    assert [r[:2] for r in rows] == [[v, s] for s in ("e2e", "tx") for v in ("plain", "secure", "trace")], proc.stdout
    assert rows[0][3] == "1.00" and all(float(r[2].replace(",", "")) > 0 for r in rows), proc.stdout
    bad = subprocess.run([sys.executable, "-m", "benchmarks.broker_cost", "--variants", "tls"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown variant or scenario ['tls']" in bad.stderr


def test_lone_bench_runs() -> None:
    cmd = [sys.executable, "-m", "benchmarks.lone_bench", "--count", "50", "--flush", "async"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=50)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "lone SEND, broker --flush async, client asyncio, 50 messages: server CPU" in proc.stdout


@pytest.mark.parametrize("args,head", [
    (["--client", "spin"], "lone SEND, broker --flush sync, client spin, 50 messages: server CPU"),
    (["--client", "blocking", "--echo"], "lone SEND, echo server, client blocking, 50 messages: server CPU"),
])
def test_lone_bench_clients(args: list[str], head: str) -> None:
    cmd = [sys.executable, "-m", "benchmarks.lone_bench", "--count", "50", *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=50)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert head in proc.stdout, proc.stdout
    bad = subprocess.run([*cmd, "--cachegrind"], cwd=ROOT, capture_output=True, text=True, timeout=50)
    assert bad.returncode == 2 and "--cachegrind measures the broker with the default client" in bad.stderr


def test_tls_cost_measures_each_cipher() -> None:
    cmd = [sys.executable, "-m", "benchmarks.tls_cost", "--count", "640"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=50)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = {line[:30].strip(): line[30:].split() for line in proc.stdout.splitlines()[2:]}
    assert rows["TLS 1.3, default suite"][0].startswith("TLS_")
    assert rows["TLS 1.2, ChaCha20-Poly1305"][0].endswith("CHACHA20-POLY1305")
    assert len(rows) == 4 and all(float(r[1].replace(",", "")) > 0 for r in rows.values()), proc.stdout
    bad = subprocess.run([*cmd, "--batch", "0"], cwd=ROOT, capture_output=True, text=True, timeout=50)
    assert bad.returncode == 2 and "must be positive" in bad.stderr
