"""A tiny run of ``benchmarks.webhook_bench``: its processes and report work end to end
(no timing assertions)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.timeout(60)


def test_webhook_bench_smoke(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "benchmarks.webhook_bench", "--messages", "200", "--concurrency", "4",
           "--out-dir", str(tmp_path), "--workdir", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=50)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "webhook-latest.json").read_text())["rows"]
    scenarios = {r["scenario"] for r in rows}
    assert scenarios == {"drain", "raw HTTP (no broker)", "consumer drain", "live"}
    for r in rows:
        assert r["rate"] > 0 and r.get("duplicates", 0) == 0, r
    drain = next(r for r in rows if r["scenario"] == "drain")
    assert drain["refused"] == 0 and drain["messages"] == 200
    assert "deliveries/s" in (tmp_path / "webhook-latest.txt").read_text()
