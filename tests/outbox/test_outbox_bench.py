"""A tiny run of ``benchmarks/outbox_bench.py``: the scenarios and report writers work end to
end (no timing assertions)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.outbox.outbox_helpers import ROOT

pytestmark = pytest.mark.timeout(90)


def test_outbox_bench_writes_its_reports(tmp_path):
    cmd = [sys.executable, "benchmarks/outbox_bench.py", "--dbs", "sqlite", "--rows", "300",
           "--rounds", "1", "--paced-rows", "20", "--paced-rate", "200", "--out-dir",
           str(tmp_path), "-q"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=80)
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = (tmp_path / "outbox-latest.md").read_text()
    assert "| sqlite |" in md and md in proc.stdout
    cells = json.loads((tmp_path / "outbox-latest.json").read_text())["cells"]["sqlite"]
    assert cells["drain"][0]["acked_per_s"] > 0 and cells["live"][0]["p99_ms"] > 0
    assert cells["paced"][0]["p50_ms"] > 0
