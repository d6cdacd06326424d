"""``halfmq outbox-relay``: a process of its own, its lines, its flags, the operator commands."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from producer_sdk.outbox.cli import build_parser
from tests.conftest import wait_for
from tests.outbox.outbox_helpers import ROOT, OutboxDb, spec, terminate

pytestmark = pytest.mark.timeout(90)


def halfmq(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "broker.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


class RelayCommand:
    """``halfmq outbox-relay ...`` running; stderr (its log) goes to a file."""

    def __init__(self, tmp_path: Path, *args: str) -> None:
        self.log = tmp_path / "outbox-relay.log"
        with open(self.log, "a") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "broker.cli", "outbox-relay", *args], cwd=ROOT,
                stdout=subprocess.PIPE, stderr=err, text=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def ready_line(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline()

    def stop(self) -> int:
        return terminate(self.proc)

    def text(self) -> str:
        return self.log.read_text()


def test_help_documents_every_flag():
    out = halfmq("outbox-relay", "--help")
    assert out.returncode == 0
    for action in build_parser()._actions:
        for flag in action.option_strings:
            assert flag in out.stdout, flag
        assert action.help, action.option_strings
    assert "outbox-relay" in halfmq("--help").stdout


async def test_the_command_relays_reports_progress_and_stops_on_sigterm(outbox_db, broker,
                                                                        tmp_path):
    db = outbox_db
    cmd = RelayCommand(tmp_path, "--db", db.url, "--broker", broker.address, "--create-table",
                       "--progress-interval", "100ms", "--poll-interval", "20ms")
    try:
        ready = await asyncio.to_thread(cmd.ready_line)
        assert ready.startswith("halfmq outbox-relay ready "), (ready, cmd.text())
        fields = dict(p.split("=", 1) for p in ready.split()[3:])
        assert fields["table"] == "halfmq_outbox" and fields["broker"] == broker.address
        assert fields["claim"] == ("lease" if db.kind == "sqlite" else "skip-locked")
        assert fields["pending"] == "0" and fields["failed"] == "0"
        outbox = db.outbox()
        ids = await db.add_rows(outbox, [spec(i) for i in range(40)])
        await wait_for(lambda: _sent(db, outbox, len(ids)), what="rows SENT by the command")
        await wait_for(lambda: "outbox relay: sent 40 rows" in cmd.text() or
                       "total sent 40," in cmd.text(), what="a progress line")
    finally:
        code = await asyncio.to_thread(cmd.stop)
    assert code == 0, cmd.text()
    text = cmd.text()
    assert "connected to" in text and "claim" in text
    assert "stopped after" in text and "sent 40 rows, failed 0" in text


async def _sent(db: OutboxDb, outbox, n: int) -> bool:
    status = await outbox.status()
    return status.sent == n and status.pending == 0


async def test_operator_commands_list_retry_and_discard_failed_rows(broker_factory, tmp_path):
    broker = broker_factory("--max-message-size", "64KiB")
    db = OutboxDb("sqlite", f"sqlite:{tmp_path / 'app.db'}")
    outbox = db.outbox()
    await outbox.create_table()
    big, held = await db.add_rows(outbox, [{"topic": "orders", "body": b"x" * 70_000, "keys": ["A"]},
                                           {"topic": "orders", "body": b"ok", "keys": ["A"]}])
    cmd = RelayCommand(tmp_path, "--db", db.url, "--broker", broker.address)
    try:
        assert (await asyncio.to_thread(cmd.ready_line)).startswith("halfmq outbox-relay ready")
        await wait_for(lambda: _failed(outbox, 1), what="the oversized row FAILED")
    finally:
        assert await asyncio.to_thread(cmd.stop) == 0
    assert f"outbox row {big} (topic orders, key A) FAILED" in cmd.text()
    assert f"--retry-failed {big}" in cmd.text()
    status = await asyncio.to_thread(halfmq, "outbox-relay", "--db", db.url, "--status")
    assert status.returncode == 0, status.stderr
    assert "pending 1, failed 1, sent 0, discarded 0" in status.stdout
    assert f"FAILED id={big} topic=orders key=A attempts=1 error=MessageTooLargeError" in status.stdout
    retried = await asyncio.to_thread(halfmq, "outbox-relay", "--db", db.url, "--retry-failed")
    assert "1 FAILED rows made pending again" in retried.stdout
    assert "pending 2, failed 0" in retried.stdout
    await db.query(outbox, f"UPDATE {outbox.table.t} SET status = 'FAILED' WHERE id = ?", (big,))
    discarded = await asyncio.to_thread(halfmq, "outbox-relay", "--db", db.url, "--discard",
                                        str(big), str(held))
    assert "1 FAILED rows discarded" in discarded.stdout  # the pending one is not FAILED
    assert "pending 1, failed 0, sent 0, discarded 1" in discarded.stdout


async def _failed(outbox, n: int) -> bool:
    return (await outbox.status()).failed == n


def test_a_missing_table_and_bad_flags_are_errors(tmp_path):
    db = f"sqlite:{tmp_path / 'app.db'}"
    out = halfmq("outbox-relay", "--db", db, "--broker", "127.0.0.1:1")
    assert out.returncode == 1
    assert "halfmq_outbox does not exist" in out.stderr and "--create-table" in out.stderr
    out = halfmq("outbox-relay", "--db", db, "--lease", "1s", "--send-timeout", "3s")
    assert out.returncode == 2 and "at least twice" in out.stderr
    out = halfmq("outbox-relay", "--db", "mysql://root@127.0.0.1:3306/")
    assert out.returncode == 2 and "expected mysql://" in out.stderr
    out = halfmq("outbox-relay", "--db", db, "--poll-interval", "soon")
    assert out.returncode == 2 and "invalid duration" in out.stderr
    out = halfmq("outbox-relay", "--db", db, "--status")
    assert out.returncode == 1 and "no such table" in out.stderr


async def test_the_command_waits_for_a_broker_that_is_not_up_yet(broker, tmp_path):
    db = OutboxDb("sqlite", f"sqlite:{tmp_path / 'app.db'}")
    outbox = db.outbox()
    await outbox.create_table()
    await db.add_rows(outbox, [spec(1)])
    await asyncio.to_thread(broker.stop)
    cmd = RelayCommand(tmp_path, "--db", db.url, "--broker", broker.address,
                       "--send-timeout", "300ms")
    try:
        await wait_for(lambda: "cannot reach the broker" in cmd.text(), what="the waiting line")
        await asyncio.to_thread(broker.start)
        assert (await asyncio.to_thread(cmd.ready_line)).startswith("halfmq outbox-relay ready")
        await wait_for(lambda: _sent(db, outbox, 1), what="the row SENT")
    finally:
        assert await asyncio.to_thread(cmd.stop) == 0
