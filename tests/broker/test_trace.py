"""Message trace through a real broker (issue 16): ``GET /api/messages/{id}/trace`` and
``halfmq admin trace``, with ``--trace`` (each delivery attempt) and without (the log only)."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request

import pytest

from consumer_sdk import ConsumeResult, PushConsumer, SimpleConsumer
from producer_sdk import LocalTransactionState, Producer, TransactionListener, TransactionProducer
from tests.conftest import ROOT, wait_for

pytestmark = pytest.mark.timeout(60)

FAST = ("--retry-delays", "100ms", "--ack-timeout", "2s", "--tx-timeout", "300ms", "--tx-check-interval", "200ms")


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def post(url: str) -> dict:
    req = urllib.request.Request(url, method="POST", data=b"{}", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def events(trace: dict, kind: str) -> list[dict]:
    return [e for e in trace["events"] if e["event"] == kind]


class CommitOnCheck(TransactionListener):
    def __init__(self) -> None:
        self.checks = 0

    async def execute_local_transaction(self, message, arg):
        return LocalTransactionState.UNKNOWN

    async def check_local_transaction(self, message):
        self.checks += 1
        return LocalTransactionState.UNKNOWN if self.checks < 2 else LocalTransactionState.COMMIT


async def _fail_twice_then_resend(b) -> tuple[str, list]:
    """A message failed twice by group g (dead-lettered), resent, then acked."""
    seen: list = []

    async def on(m):
        seen.append(m)
        return ConsumeResult.SUCCESS if len(seen) > 2 else ConsumeResult.RECONSUME_LATER

    async with Producer(b.address) as p, PushConsumer(b.address, group="g", topic="t", listener=on,
                                                      max_reconsume_times=1):
        sent = await p.send("t", b"payload", keys=["order-7"])
        await wait_for(lambda: get(f"{b.http_url}/api/groups")["groups"][0]["dead_lettered"] == 1,
                       what="the message dead-lettered after 2 attempts")
        post(f"{b.http_url}/api/dlq/g/messages/{sent.msg_id}/resend")
        await wait_for(lambda: len(seen) == 3, what="the resent message delivered")
        await wait_for(lambda: get(f"{b.http_url}/api/groups")["groups"][0]["lag"] == 0, what="acked")
    return sent.msg_id, seen


async def test_trace_with_flag_shows_every_attempt_in_order(broker_factory):
    b = broker_factory("--trace", *FAST)
    msg_id, _seen = await _fail_twice_then_resend(b)

    def traced():
        t = get(f"{b.http_url}/api/messages/{msg_id}/trace")
        return t if len(events(t, "acked")) == 1 else None  # the last events ride with a later append

    trace = await wait_for(traced, what="the ack in the trace")
    kinds = [e["event"] for e in trace["events"]]
    assert trace["trace"] is True and kinds[0] == "stored"
    stored = trace["events"][0]
    assert stored["topic"] == "t" and stored["keys"] == ["order-7"] and stored["client_id"]
    assert stored["address"].startswith("127.0.0.1:")
    assert kinds == ["stored", "delivered", "failed", "retry", "delivered", "failed", "dead_lettered",
                     "resent", "delivered", "acked"], kinds
    delivered = events(trace, "delivered")
    assert [d["attempt"] for d in delivered] == [1, 2, 1] and all(d["group"] == "g" for d in delivered)
    assert all(d["client_id"] and d["address"].startswith("127.0.0.1:") for d in delivered)
    assert events(trace, "dead_lettered")[0]["attempts"] == 2
    times = [e["at"] for e in trace["events"]]
    assert times == sorted(times)
    assert trace["groups"]["g"]["state"] == "acked"  # resent from the DLQ, then acked


def test_a_resend_and_the_delivery_it_causes_in_one_millisecond_stay_in_order():
    """A resent message can be delivered and acked in the millisecond of its resend (this
    once ordered the delivery before the resend in CI)."""
    from broker.engines.embedded.tracing import sort_events

    events = [{"at": 7, "event": "acked", "group": "g"},
              {"at": 7, "event": "delivered", "group": "g", "attempt": 1},
              {"at": 7, "event": "resent", "group": "g"},
              {"at": 5, "event": "dead_lettered", "group": "g"},
              {"at": 5, "event": "failed", "group": "g"},
              {"at": 1, "event": "stored"}]
    sort_events(events)
    assert [e["event"] for e in events] == ["stored", "failed", "dead_lettered", "resent", "delivered", "acked"]


async def test_trace_without_flag_comes_from_the_log(broker_factory):
    b = broker_factory(*FAST)
    msg_id, _seen = await _fail_twice_then_resend(b)
    trace = get(f"{b.http_url}/api/messages/{msg_id}/trace")
    kinds = [e["event"] for e in trace["events"]]
    assert trace["trace"] is False
    assert kinds == ["stored", "retry", "dead_lettered", "resent"], kinds
    assert "client_id" not in trace["events"][0]  # who sent a plain message: only with --trace
    assert b.data_dir.joinpath("..").exists()
    topics = {t["topic"] for t in get(f"{b.http_url}/api/topics")["topics"]}
    assert "%TRACE%" not in topics


async def test_transaction_outcomes_say_who_decided(broker_factory):
    b = broker_factory("--trace", *FAST)
    listener = CommitOnCheck()
    got: list = []

    async def on(m):
        got.append(m.msg_id)
        return ConsumeResult.SUCCESS

    async with (TransactionProducer(b.address, group="pg", listener=listener) as tp,
                PushConsumer(b.address, group="c", topic="tx", listener=on)):
        by_check = await tp.send_in_transaction("tx", b"checked", keys=["k1"])
        by_hand = await tp.send_in_transaction("tx", b"by hand", keys=["k2"])
        post(f"{b.http_url}/api/transactions/{by_hand.msg_id}/rollback")
        await wait_for(lambda: by_check.msg_id in got, timeout=20, what="committed by check-back")
        trace = await wait_for(lambda: (t := get(f"{b.http_url}/api/messages/{by_check.msg_id}/trace"))
                               and events(t, "acked") and t, what="the ack traced")
    stored, committed = trace["events"][0], events(trace, "committed")[0]
    assert stored["kind"] == "half" and stored["producer_group"] == "pg" and stored["producer_id"]
    assert stored["client_id"] == stored["producer_id"]  # who sent it: --trace's record, found by position
    assert committed["by"] == "check" and committed["checks"] == 2
    assert [e["event"] for e in trace["events"]][:2] == ["stored", "committed"]
    rolled = get(f"{b.http_url}/api/messages/{by_hand.msg_id}/trace")
    assert [(e["event"], e.get("by")) for e in rolled["events"]] == [("stored", None), ("rolled_back", "operator")]


async def test_cli_trace_prints_a_timeline_and_json(broker_factory):
    b = broker_factory("--trace", *FAST)
    msg_id, _seen = await _fail_twice_then_resend(b)

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "broker.cli", "admin", "--http", b.http_url, *args],
                              cwd=ROOT, capture_output=True, text=True, timeout=30)

    out = cli("trace", msg_id)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith(f"message {msg_id}  topic t  keys order-7")
    assert lines[2].split() == ["time", "(UTC)", "event", "group", "detail"]
    assert any(" dead_lettered " in line and " g " in line and "attempts=2" in line for line in lines)
    as_json = json.loads(cli("--json", "trace", msg_id).stdout)
    assert as_json["msg_id"] == msg_id and as_json["events"][0]["event"] == "stored"
    missing = cli("trace", "000000000000000000000000")
    assert missing.returncode != 0 and "404" in missing.stderr
    dead = cli("dlq", "g").stdout.splitlines()
    assert dead[0].split()[:3] == ["msg_id", "topic", "keys"] and dead[2].split()[:3] == [msg_id, "t", "order-7"]
    assert [m["msg_id"] for m in json.loads(cli("--json", "dlq", "g").stdout)["messages"]] == [msg_id]
    assert cli("members", "g").stdout.strip() == "(no members)"  # the consumer has left
    assert cli("clients").stdout.strip() == "(no clients connected)"
    assert "404" in cli("members", "nobody").stderr


async def test_pull_consumer_expiry_and_nack_are_traced(broker_factory):
    """A lease left to run out is ``expired``; a nack is ``failed`` (its lease end is no
    expiry of its own); each is followed by its retry; the last receive is acked."""
    b = broker_factory("--trace", *FAST)
    async with Producer(b.address) as p, SimpleConsumer(b.address, group="puller", topic="pt", wait=5) as c:
        sent = await p.send("pt", b"x")

        async def one(invisible: float):
            got = await c.receive(1, invisible_duration=invisible)
            return got[0] if got else None

        first = await wait_for(lambda: one(0.2), what="the first delivery")  # left to expire
        second = await wait_for(lambda: one(5), what="the redelivery after the expiry")
        await c.nack(second, delay=0)
        third = await wait_for(lambda: one(5), what="the redelivery after the nack")
        await c.ack(third)
        assert first.msg_id == second.msg_id == third.msg_id == sent.msg_id

        def traced():
            t = get(f"{b.http_url}/api/messages/{sent.msg_id}/trace")
            return t if events(t, "acked") else None

        trace = await wait_for(traced, what="the ack traced")
    kinds = [e["event"] for e in trace["events"]]
    # events of one millisecond are ordered by kind, so a retry with no delay and the delivery
    # it led to may show in either order; everything else is in order
    expected = ["stored", "delivered", "expired", "retry", "delivered", "failed", "retry", "delivered", "acked"]
    assert sorted(kinds) == sorted(expected), kinds
    assert kinds[0] == "stored" and kinds[-1] == "acked", kinds
    assert [k for k in kinds if k != "retry"] == [k for k in expected if k != "retry"], kinds
    assert [e["after"] for e in events(trace, "retry")] == ["lease ended", "lease ended"]
    assert [e["attempt"] for e in events(trace, "delivered")] == [1, 2, 3]


def test_trace_events_are_written_in_bounded_records():
    from types import SimpleNamespace

    from broker.core.records import RT_TRACE, TRACE_TOPIC
    from broker.engines.embedded.tracing import EmbeddedTracing

    ids = [f"id{i}" for i in range(5000)]
    buf = [["o", i, "g", "acked", 1] for i in ids[:100]]  # an older log's per-message form
    buf += [["D", "g", "c1", "127.0.0.1:1", 2, ids[i : i + 1000], [1] * len(ids[i : i + 1000])]
            for i in range(100, 5000, 1000)]
    buf.append(["O", "g", "acked", 3, ids[:1500]])
    engine = SimpleNamespace(_trace_buf=buf)
    records = EmbeddedTracing._trace_records(engine)  # type: ignore[arg-type]
    named = [sum(len(e[5]) if e[0] == "D" else len(e[4]) if e[0] == "O" else 1 for e in r.header["e"])
             for r in records]
    # 100 + 1000 + ... : a record is cut before an event would take it past 2,048 messages named
    assert named == [1100, 2000, 1900, 1500] and engine._trace_buf == []
    assert all(r.rtype == RT_TRACE and r.index.topic == TRACE_TOPIC for r in records)
    assert [e for r in records for e in r.header["e"]] == buf


def test_trace_events_name_many_messages_each_and_older_logs_still_read():
    """One ``D`` event per member of a dispatch and one ``O`` per outcome of a request; the
    view finds a message in them and in the per-message ``d``/``o`` events of older logs."""
    from types import SimpleNamespace

    from broker.engines.embedded.tracing import EmbeddedTracing

    class Session:
        client_id, peer = "c1", "127.0.0.1:5"

    leases = {1: SimpleNamespace(msg_id="A"), 2: SimpleNamespace(msg_id="B"), 3: SimpleNamespace(msg_id="C")}
    gd = SimpleNamespace(group="g", leases=leases)
    wire = [None] * 11
    out = [("m1", 1, ["A", *wire[1:10], 0]), ("m1", 2, ["B", *wire[1:10], 2]), ("gone", 3, ["C", *wire[1:10], 0])]
    engine = SimpleNamespace(_trace_buf=[], _receivers={}, _consumers={"m1": Session()})
    engine._member_of = lambda m: EmbeddedTracing._member_of(engine, m)  # type: ignore[arg-type]
    engine._trace_outcomes = lambda *a: EmbeddedTracing._trace_outcomes(engine, *a)  # type: ignore[arg-type]
    EmbeddedTracing._trace_delivered(engine, gd, out, 1.5)  # type: ignore[arg-type]
    EmbeddedTracing._trace_acks(engine, gd, [(1, True), (2, False), (3, True), (9, True)], 2.0)  # type: ignore[arg-type]
    assert engine._trace_buf == [["D", "g", "c1", "127.0.0.1:5", 1500, ["A", "B"], [1, 3]],
                                 ["D", "g", "gone", "?", 1500, ["C"], [1]],
                                 ["O", "g", "acked", 2000, ["A", "C"]], ["O", "g", "failed", 2000, ["B"]]]

    old = [["d", "B", "g", "c0", "127.0.0.1:4", 1, 900], ["o", "B", "g", "expired", 950]]
    records = [SimpleNamespace(header={"e": old}), SimpleNamespace(header={"e": engine._trace_buf})]
    view = SimpleNamespace(_records_since=lambda topic, q, since: enumerate(records))
    stored: dict = {}
    got = EmbeddedTracing._traced(view, "B", 7, 0, stored)  # type: ignore[arg-type]
    assert got == [{"at": 900, "event": "delivered", "group": "g", "client_id": "c0", "address": "127.0.0.1:4",
                    "attempt": 1},
                   {"at": 950, "event": "expired", "group": "g"},
                   {"at": 1500, "event": "delivered", "group": "g", "client_id": "c1", "address": "127.0.0.1:5",
                    "attempt": 3},
                   {"at": 2000, "event": "failed", "group": "g"}]
