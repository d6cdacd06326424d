"""``halfmq demo``: the five scenarios in one process, well under 30 seconds."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from examples.bank.demo import run_demo

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("mode", ["transaction", "outbox"])
async def test_demo_on_sqlite(mode):
    lines: list[str] = []
    started = time.monotonic()
    assert await run_demo(None, out=lines.append, mode=mode) == 0, "\n".join(lines)
    assert time.monotonic() - started < 30
    text = "\n".join(lines)
    assert "HTTP 409 ROLLBACK insufficient balance" in text
    assert "done: every check held" in text
    if mode == "outbox":
        assert "the row waits in halfmq_outbox" in text and "pending 1" in text
    assert lines[-2].strip().startswith("balances: bank1 1 zhangsan 64.00 | bank2 2 lisi 31.00 | "
                                        "bank2 3 wangwu 5.00 | total 100.00 (ok)")


@pytest.mark.parametrize("mode", ["transaction", "outbox"])
async def test_demo_on_mysql(mysql_bank_dbs, mode):
    db1, _db2 = mysql_bank_dbs
    from tests.bank.conftest import _mysql_admin

    base = db1.rsplit("/", 1)[0] + "/halfmq_d_" + uuid.uuid4().hex[:10]
    name = base.rsplit("/", 1)[1]
    lines: list[str] = []
    try:
        assert await run_demo(base, out=lines.append, mode=mode) == 0, "\n".join(lines)
    finally:
        await _mysql_admin(f"DROP DATABASE IF EXISTS {name}_bank1",
                           f"DROP DATABASE IF EXISTS {name}_bank2")
    assert "done: every check held" in "\n".join(lines)


@pytest.mark.parametrize("mode", ["transaction", "outbox"])
def test_halfmq_demo_command(mode):
    proc = subprocess.run([sys.executable, "-m", "broker.cli", "demo", "--mode", mode], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "done: every check held" in proc.stdout
    assert f"({mode} mode)" in proc.stdout


async def test_demo_with_auth():
    """``halfmq demo --auth``: the same five scenarios with users and rights, after the
    refusals of a client without credentials and of bank2 publishing."""
    lines: list[str] = []
    assert await run_demo(None, out=lines.append, auth=True) == 0, "\n".join(lines)
    text = "\n".join(lines)
    assert "user bank1: publish bank_transfer group=producer_bank1" in text
    assert "no credentials: refused (this broker requires a login" in text
    assert "bank2 publishing: refused (user 'bank2' may not publish" in text
    assert "resend -> HTTP 200" in text and "done: every check held" in text
