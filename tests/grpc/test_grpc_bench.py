"""Tiny runs of the gRPC benchmark cells and of ``benchmarks.grpc_cost`` (no timing
assertions: the harness and its official-client workers work end to end)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.timeout(90),
              pytest.mark.skipif(importlib.util.find_spec("psutil") is None, reason="the harness needs psutil")]


def test_grpc_cells_beside_the_native_ones(tmp_path: Path) -> None:
    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "benchmarks", "--systems", "halfmq-sync,halfmq-grpc", "--scenarios",
           "publish,e2e", "--rounds", "1", "--duration", "0.3", "--warmup", "0", "--window", "16",
           "--out-dir", str(out), "--workdir", str(tmp_path), "--quiet"]
    env = {**os.environ, "HOME": str(tmp_path)}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=80, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "latest.json").read_text())
    assert not report["errors"], report["errors"]
    for scenario in ("publish", "e2e"):
        assert report["summary"]["halfmq-grpc"][scenario]["rate"] > 0
        assert report["summary"]["halfmq-sync"][scenario]["rate"] > 0
    assert "| halfmq-grpc |" in (out / "latest.md").read_text()


def test_grpc_cost_measures_native_alone_and_beside_grpc(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "benchmarks.grpc_cost", "--rounds", "1", "--duration", "0.4", "--warmup", "0",
           "--window", "16"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=80,
                          env={**os.environ, "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "native kept:" in proc.stdout and "the gRPC producer" in proc.stdout
