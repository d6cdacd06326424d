"""The bank transfer with bank2 on the official RocketMQ client: ``halfmq demo --rocketmq-client``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("grpc", reason="the grpc extra is not installed")

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(90)
def test_demo_with_bank2_on_the_official_rocketmq_client(tmp_path):
    env = {**os.environ, "HOME": str(tmp_path)}  # the client writes its logs under ~/logs
    proc = subprocess.run([sys.executable, "-m", "broker.cli", "demo", "--rocketmq-client"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=80)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "on the official RocketMQ client via gRPC" in out
    assert "bank2 tried 3 times; the message is in %DLQ%consumer_bank2" in out
    assert "deliveries of" in out and "credited, duplicate" in out
    assert "balances: bank1 1 zhangsan 64.00 | bank2 2 lisi 31.00 | bank2 3 wangwu 5.00 | total 100.00 (ok)" in out
    assert "done: every check held" in out
    assert (tmp_path / "logs" / "rocketmq_python").is_dir()  # and not in the real home
