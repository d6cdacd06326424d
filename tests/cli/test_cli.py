"""The ``halfmq`` command against a real broker: send, consume, admin."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT


def halfmq(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "broker.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def test_help_lists_every_command():
    r = halfmq("--help")
    assert r.returncode == 0
    for cmd in ("broker", "send", "consume", "admin", "demo", "bench"):
        assert cmd in r.stdout
    assert halfmq("nonsense").returncode == 2


def test_send_consume_and_admin_round_trip(broker):
    sent = halfmq("send", "orders", "hello world", "--tags", "TagA", "--keys", "k1,k2", "--address", broker.address)
    assert sent.returncode == 0, sent.stderr
    msg_id = json.loads(sent.stdout)["msg_id"]

    got = halfmq("consume", "orders", "--group", "cli", "--count", "1", "--address", broker.address)
    assert got.returncode == 0, got.stderr
    m = json.loads(got.stdout.splitlines()[0])
    assert (m["msg_id"], m["body"], m["tags"], m["keys"]) == (msg_id, "hello world", "TagA", ["k1", "k2"])

    http = ["--http", broker.http_url]
    topics = json.loads(halfmq("admin", "--json", *http, "topics").stdout)["topics"]
    assert any(t["topic"] == "orders" and t["messages"] == 1 for t in topics)
    groups = json.loads(halfmq("admin", "--json", *http, "groups").stdout)["groups"]
    assert [g["group"] for g in groups] == ["cli"] and groups[0]["acked"] == 1 and groups[0]["lag"] == 0
    one = json.loads(halfmq("admin", "--json", *http, "message", msg_id).stdout)
    assert one["msg_id"] == msg_id and one["keys"] == ["k1", "k2"] and one["groups"]["cli"]["state"] == "acked"
    found = json.loads(halfmq("admin", "--json", *http, "find", "orders", "k2").stdout)["messages"]
    assert [f["msg_id"] for f in found] == [msg_id]
    assert json.loads(halfmq("admin", "--json", *http, "transactions").stdout) == {"transactions": [], "next": None}
    # for people: aligned tables with a header and a rule, numbers right-aligned
    lines = halfmq("admin", *http, "topics").stdout.splitlines()
    assert lines[0].split() == ["topic", "queues", "messages", "scheduled", "next", "due", "(UTC)"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    assert lines[2].split()[:3] == ["orders", "4", "1"]
    lines = halfmq("admin", *http, "groups").stdout.splitlines()
    assert lines[0].split()[:3] == ["group", "topics", "members"] and lines[2].split()[:2] == ["cli", "orders"]
    assert halfmq("admin", *http, "transactions").stdout.strip() == "(no prepared transactions)"
    shown = halfmq("admin", *http, "message", msg_id).stdout
    assert msg_id in shown and "body: hello world" in shown and "acked" in shown
    missing = halfmq("admin", "--json", *http, "message", "000000000000000000000000")
    assert missing.returncode != 0 and "404" in missing.stderr


def test_send_errors_are_clear(broker):
    r = halfmq("send", "bad topic", "x", "--address", broker.address)
    assert r.returncode == 1 and "InvalidNameError" in r.stderr
    r = halfmq("send", "t", "x", "--address", "127.0.0.1:1")
    assert r.returncode == 1 and "BrokerUnavailableError" in r.stderr
