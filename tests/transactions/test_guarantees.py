"""SPEC §6, T1–T10, each against a real broker process through the public SDKs."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request

import pytest

from consumer_sdk import ConsumeResult, PushConsumer
from producer_sdk import (
    InvalidNameError,
    LocalTransactionState,
    MessageTooLargeError,
    Producer,
    TransactionListener,
    TransactionProducer,
    TransactionStateError,
)
from protocol import Op, error_from_code
from tests.broker.test_process import RawClient
from tests.conftest import wait_for
from tests.engines import ClusterBroker

# one queue per topic: a marker sent after X is delivered after X would have been
TX_ARGS = ("--tx-timeout", "1s", "--tx-check-interval", "200ms", "--retry-delays", "200ms", "--default-queues", "1")


class Scripted(TransactionListener):
    """Answers from two attributes; records every call."""

    def __init__(self, execute=LocalTransactionState.COMMIT, check=LocalTransactionState.COMMIT) -> None:
        self.execute, self.check = execute, check
        self.executed: list[str] = []
        self.checked: list[str] = []

    async def execute_local_transaction(self, message, arg):
        self.executed.append(message.msg_id)
        if isinstance(self.execute, Exception):
            raise self.execute
        return self.execute(message, arg) if callable(self.execute) else self.execute

    async def check_local_transaction(self, message):
        self.checked.append(message.msg_id)
        return self.check


class Inbox:
    """A consumer group collecting what it receives."""

    def __init__(self) -> None:
        self.messages: dict[str, object] = {}
        self.count = 0

    async def __call__(self, m):
        self.messages[m.msg_id] = m
        self.count += 1
        return ConsumeResult.SUCCESS


def http(method: str, url: str) -> dict:
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None,
                                 headers={"X-HalfMQ-Request": "test"})
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.loads(r.read())


@pytest.fixture
def txb(broker_factory):
    return broker_factory(*TX_ARGS)


async def test_t1_half_message_invisible_until_commit(txb):
    gate = asyncio.Event()
    inbox = Inbox()

    listener = Scripted()

    async def execute(message, arg):
        listener.executed.append(message.msg_id)
        await gate.wait()
        return LocalTransactionState.COMMIT

    listener.execute_local_transaction = execute  # type: ignore[method-assign]
    async with PushConsumer(txb.address, group="g1", topic="t1", listener=inbox), \
            TransactionProducer(txb.address, group="pg", listener=listener) as p, \
            Producer(txb.address) as plain:
        task = asyncio.create_task(p.send_in_transaction("t1", b"half"))
        await wait_for(lambda: listener.executed, what="local transaction running")
        tx_id = listener.executed[0]
        state = http("GET", f"{txb.http_url}/api/transactions?state=prepared")["transactions"]
        assert [t["msg_id"] for t in state] == [tx_id]
        # the half message is stored; a message sent after it is delivered, the half is not
        marker = await plain.send("t1", b"marker")
        await wait_for(lambda: marker.msg_id in inbox.messages, what="marker delivery")
        assert tx_id not in inbox.messages
        gate.set()
        r = await task
        assert r.state is LocalTransactionState.COMMIT
        await wait_for(lambda: tx_id in inbox.messages, what="delivery after commit")


async def test_t2_commit_delivered_to_every_subscribed_group(txb):
    a, b = Inbox(), Inbox()
    async with PushConsumer(txb.address, group="ga", topic="t2", listener=a), \
            PushConsumer(txb.address, group="gb", topic="t2", listener=b), \
            TransactionProducer(txb.address, group="pg", listener=Scripted()) as p:
        r = await p.send_in_transaction("t2", b"x")
        await wait_for(lambda: r.msg_id in a.messages and r.msg_id in b.messages, what="both groups")


async def test_t3_rollback_never_delivered(txb):
    inbox = Inbox()
    async with PushConsumer(txb.address, group="g", topic="t3", listener=inbox), \
            TransactionProducer(txb.address, group="pg", listener=Scripted(LocalTransactionState.ROLLBACK)) as p:
        r = await p.send_in_transaction("t3", b"never")
        assert r.state is LocalTransactionState.ROLLBACK
        after = await p.send_in_transaction("t3", b"after")
        assert after.state is LocalTransactionState.ROLLBACK
        async with Producer(txb.address) as plain:
            marker = await plain.send("t3", b"marker")
        await wait_for(lambda: marker.msg_id in inbox.messages, what="marker delivery")
    rolled = http("GET", f"{txb.http_url}/api/transactions?state=rolled_back")["transactions"]
    assert {t["msg_id"] for t in rolled} == {r.msg_id, after.msg_id}
    assert r.msg_id not in inbox.messages and after.msg_id not in inbox.messages


async def test_t4_unknown_checked_back_on_another_live_producer_of_the_group(txb):
    inbox = Inbox()
    first = Scripted(LocalTransactionState.UNKNOWN, check=LocalTransactionState.UNKNOWN)
    second = Scripted(check=LocalTransactionState.COMMIT)
    async with PushConsumer(txb.address, group="g", topic="t4", listener=inbox):
        async with TransactionProducer(txb.address, group="pg", listener=first) as p1:
            r = await p1.send_in_transaction("t4", b"x")
            assert r.state is LocalTransactionState.UNKNOWN
        # the sending instance is gone; a restarted/other instance of the group answers
        async with TransactionProducer(txb.address, group="pg", listener=second):
            await wait_for(lambda: r.msg_id in inbox.messages, timeout=15, what="check-back commit")
    assert second.checked and r.msg_id in second.checked


async def test_t4_abandoned_after_tx_check_max_never_delivered_and_listed(broker_factory):
    b = broker_factory(*TX_ARGS, "--tx-check-max", "2")
    inbox = Inbox()
    listener = Scripted(LocalTransactionState.UNKNOWN, check=LocalTransactionState.UNKNOWN)
    async with PushConsumer(b.address, group="g", topic="t4b", listener=inbox), \
            TransactionProducer(b.address, group="pg", listener=listener) as p:
        r = await p.send_in_transaction("t4b", b"x")

        def abandoned():
            return http("GET", f"{b.http_url}/api/transactions?state=abandoned")["transactions"]

        await wait_for(abandoned, timeout=15, what="abandonment")
        assert listener.checked.count(r.msg_id) == 2  # only checks that reached a producer count
        row = abandoned()[0]
        assert row["msg_id"] == r.msg_id and row["checks"] == 2 and row["topic"] == "t4b"
    assert r.msg_id not in inbox.messages
    # the abandonment is logged as a WARNING naming the message
    assert any("WARNING" in line and r.msg_id in line for line in b.log_path.read_text().splitlines())


async def test_t5_execute_raises_reraised_outcome_unknown_check_decides(txb):
    inbox = Inbox()
    listener = Scripted(RuntimeError("db down"), check=LocalTransactionState.COMMIT)
    async with PushConsumer(txb.address, group="g", topic="t5", listener=inbox), \
            TransactionProducer(txb.address, group="pg", listener=listener) as p:
        with pytest.raises(RuntimeError, match="db down"):
            await p.send_in_transaction("t5", b"x")
        await wait_for(lambda: listener.checked, timeout=10, what="check-back")
        await wait_for(lambda: listener.checked[0] in inbox.messages, what="delivery after check")


async def test_t6_outcomes_idempotent_conflicts_refused(txb):
    c = await RawClient.connect(txb.address, group="pg")
    op, p = await c.request(Op.SEND, {"topic": "t6", "half": True, "msgs": [[b"x", None, [], {}, 0]]})
    assert op == Op.REPLY
    msg_id = f'{p["p"]}{p["r"][0][0]:016X}'
    assert await c.request(Op.END_TX, {"msg_id": msg_id, "outcome": "COMMIT"}) == (Op.REPLY, {"state": "COMMITTED"})
    assert await c.request(Op.END_TX, {"msg_id": msg_id, "outcome": "COMMIT"}) == (Op.REPLY, {"state": "COMMITTED"})
    op, p = await c.request(Op.END_TX, {"msg_id": msg_id, "outcome": "ROLLBACK"})
    assert op == Op.ERROR
    assert isinstance(error_from_code(p["code"], p["message"]), TransactionStateError)
    op, p = await c.request(Op.END_TX, {"msg_id": "000000000000000000000000", "outcome": "COMMIT"})
    assert op == Op.ERROR and p["code"] == TransactionStateError.code
    c.close()
    inbox = Inbox()
    async with PushConsumer(txb.address, group="g", topic="t6", listener=inbox), Producer(txb.address) as plain:
        marker = await plain.send("t6", b"marker")  # behind any second copy of the commit
        await wait_for(lambda: msg_id in inbox.messages and marker.msg_id in inbox.messages, what="delivery")
    assert inbox.count == 2  # the committed message once, the marker once


async def test_t7_half_message_survives_kill9_and_is_checked_after_restart(txb):
    inbox = Inbox()
    listener = Scripted(check=LocalTransactionState.COMMIT)

    async def execute(message, arg):
        listener.executed.append(message.msg_id)
        txb.kill9()  # right after the half message was acknowledged
        return LocalTransactionState.COMMIT

    listener.execute_local_transaction = execute  # type: ignore[method-assign]
    async with TransactionProducer(txb.address, group="pg", listener=listener) as p:
        r = await p.send_in_transaction("t7", b"x")  # T10: the lost outcome is not an error
        assert r.state is LocalTransactionState.COMMIT
        txb.start()
        async with PushConsumer(txb.address, group="g", topic="t7", listener=inbox):
            await wait_for(lambda: r.msg_id in inbox.messages, timeout=20, what="delivery after restart")
    assert r.msg_id in listener.checked


async def test_t8_half_not_stored_listener_not_called(txb):
    listener = Scripted()
    async with TransactionProducer(txb.address, group="pg", listener=listener) as p:
        with pytest.raises(InvalidNameError, match="topic"):
            await p.send_in_transaction("bad topic", b"x")
        with pytest.raises(MessageTooLargeError):
            await p.send_in_transaction("t8", b"x" * (4 * 1024 * 1024 + 1))
    assert listener.executed == []


async def test_t9_consumers_receive_the_half_message_fields(txb):
    inbox = Inbox()
    async with PushConsumer(txb.address, group="g", topic="t9", listener=inbox), \
            TransactionProducer(txb.address, group="pg", listener=Scripted()) as p:
        r = await p.send_in_transaction("t9", b"body", tags="TagA", keys=["tx-9", "k2"], properties={"a": "b"})
        await wait_for(lambda: r.msg_id in inbox.messages, what="delivery")
    m = inbox.messages[r.msg_id]
    assert (m.msg_id, m.body, m.tags, m.keys, m.properties["a"]) == (r.msg_id, b"body", "TagA", ("tx-9", "k2"), "b")


async def test_t10_outcome_unreachable_returns_state_check_back_resolves(txb):
    inbox = Inbox()
    listener = Scripted(check=LocalTransactionState.ROLLBACK)

    async def execute(message, arg):
        listener.executed.append(message.msg_id)
        txb.stop()  # broker down when the outcome is reported
        return LocalTransactionState.ROLLBACK

    listener.execute_local_transaction = execute  # type: ignore[method-assign]
    async with TransactionProducer(txb.address, group="pg", listener=listener) as p:
        t0 = time.monotonic()
        r = await p.send_in_transaction("t10", b"x")
        assert r.state is LocalTransactionState.ROLLBACK and time.monotonic() - t0 < 10
        txb.start()
        await wait_for(lambda: listener.checked, timeout=20, what="check-back after restart")

        def rolled_back():
            return http("GET", f"{txb.http_url}/api/transactions?state=rolled_back")["transactions"]

        await wait_for(rolled_back, what="rollback recorded")
        assert [t["msg_id"] for t in rolled_back()] == [r.msg_id]
    # never delivered: a marker sent after it on the topic's one queue arrives alone
    async with PushConsumer(txb.address, group="g", topic="t10", listener=inbox), Producer(txb.address) as plain:
        marker = await plain.send("t10", b"marker")
        await wait_for(lambda: marker.msg_id in inbox.messages, what="the marker")
    assert list(inbox.messages) == [marker.msg_id]


async def test_slow_check_answer_is_not_overtaken_by_abandonment_nor_flooded(broker_factory):
    b = broker_factory(*TX_ARGS, "--tx-check-max", "2")
    inbox = Inbox()
    calls: list[str] = []

    class Slow(Scripted):
        async def check_local_transaction(self, message):
            calls.append(message.msg_id)
            await asyncio.sleep(1.5)  # a slow database: many check intervals (200 ms) long
            return LocalTransactionState.COMMIT

    async with PushConsumer(b.address, group="g", topic="slow", listener=inbox), \
            TransactionProducer(b.address, group="pg", listener=Slow(LocalTransactionState.UNKNOWN)) as p:
        r = await p.send_in_transaction("slow", b"x")
        await wait_for(lambda: r.msg_id in inbox.messages, timeout=15, what="delivery after the slow COMMIT")
    assert calls == [r.msg_id]  # one outstanding check at a time, answered COMMIT once


async def test_t6_many_outcomes_in_one_request_each_answered_on_its_own(txb):
    c = await RawClient.connect(txb.address, group="pg")
    op, p = await c.request(Op.SEND, {"topic": "t6b", "half": True,
                                      "msgs": [[b"a", None, [], {}, 0], [b"b", None, [], {}, 0]]})
    a, b = (f'{p["p"]}{row[0]:016X}' for row in p["r"])
    op, p = await c.request(Op.END_TX, {"items": [[a, "COMMIT"], [b, "ROLLBACK"], [a, "ROLLBACK"],
                                                  ["000000000000000000000000", "COMMIT"], [a, "MAYBE"]]})
    assert op == Op.REPLY
    r = p["r"]
    assert r[:2] == ["COMMITTED", "ROLLED_BACK"]
    assert r[2][0] == TransactionStateError.code and r[3][0] == TransactionStateError.code
    assert r[4][0] == 8  # a malformed item is refused alone
    op, p = await c.request(Op.END_TX, {"items": [[a, "COMMIT"]]})
    assert p == {"r": ["COMMITTED"]}  # the same outcome again: the recorded one
    c.close()
    inbox = Inbox()
    async with PushConsumer(txb.address, group="g", topic="t6b", listener=inbox), Producer(txb.address) as plain:
        marker = await plain.send("t6b", b"marker")
        await wait_for(lambda: a in inbox.messages and marker.msg_id in inbox.messages, what="delivery")
    assert b not in inbox.messages and inbox.count == 2


async def test_t7_many_outcomes_of_one_request_survive_kill9(txb):
    """The outcomes of one END_TX are recorded together; after kill -9 each is known (no
    check-back asked, the commits delivered once, the rollback never) and, on the
    embedded engine, traced."""
    c = await RawClient.connect(txb.address, group="pg")
    op, p = await c.request(Op.SEND, {"topic": "t7b", "half": True,
                                      "msgs": [[b"a", None, [], {}, 0], [b"b", None, [], {}, 0],
                                               [b"c", None, [], {}, 0]]})
    a, b, cc = (f'{p["p"]}{row[0]:016X}' for row in p["r"])
    op, p = await c.request(Op.END_TX, {"items": [[a, "COMMIT"], [b, "ROLLBACK"], [cc, "COMMIT"]]})
    assert (op, p) == (Op.REPLY, {"r": ["COMMITTED", "ROLLED_BACK", "COMMITTED"]})
    c.close()
    txb.kill9()
    txb.start()

    def listed(state: str) -> set[str]:
        return {t["msg_id"] for t in http("GET", f"{txb.http_url}/api/transactions?state={state}")["transactions"]}

    assert listed("committed") == {a, cc} and listed("rolled_back") == {b} and listed("prepared") == set()
    inbox = Inbox()
    async with PushConsumer(txb.address, group="g", topic="t7b", listener=inbox), Producer(txb.address) as plain:
        marker = await plain.send("t7b", b"marker")
        await wait_for(lambda: {a, cc, marker.msg_id} <= set(inbox.messages), what="delivery after restart")
    assert b not in inbox.messages and inbox.count == 3
    if isinstance(txb, ClusterBroker):
        return  # (no message trace in cluster mode)
    for msg_id, outcome in ((a, "committed"), (b, "rolled_back")):
        trace = http("GET", f"{txb.http_url}/api/messages/{msg_id}/trace")
        assert [(e["event"], e.get("by")) for e in trace["events"]][:2] == [("stored", None), (outcome, "producer")]


async def test_half_messages_sent_together_stay_one_transaction_each(txb):
    """20 half messages in one SEND — on the embedded engine one bundle record (members 16
    bytes apart, one queue) — are still 20 transactions: outcomes, deliveries, kill -9,
    recovery and check-backs each per message, with each message's own fields."""
    n = 20
    c = await RawClient.connect(txb.address, group="pg")
    msgs = [[f"m{k}".encode(), f"tag{k % 2}", [f"key-{k}"], {"k": str(k)}, 0] for k in range(n)]
    op, p = await c.request(Op.SEND, {"topic": "tb", "half": True, "msgs": msgs})
    assert op == Op.REPLY
    rows = p["r"]
    ids = [f'{p["p"]}{row[0]:016X}' for row in rows]
    if not isinstance(txb, ClusterBroker):
        assert len({row[1] for row in rows}) == 1
        assert [b[0] - a[0] for a, b in zip(rows, rows[1:], strict=False)] == [16] * (n - 1)
        view = http("GET", f"{txb.http_url}/api/messages/{ids[5]}")  # a member, by id
        assert (view["body"], view["tags"], view["keys"], view["properties"]) == ("m5", "tag1", ["key-5"], {"k": "5"})
        assert view["transaction"]["state"] == "PREPARED"
    items = [[ids[k], "COMMIT"] for k in range(10)] + [[ids[k], "ROLLBACK"] for k in range(10, 15)]
    op, p = await c.request(Op.END_TX, {"items": items})
    assert p == {"r": ["COMMITTED"] * 10 + ["ROLLED_BACK"] * 5}
    c.close()

    def fields(m) -> tuple:
        return (m.body, m.tags, m.keys, m.properties["k"])

    def expected(k: int) -> tuple:
        return (f"m{k}".encode(), f"tag{k % 2}", (f"key-{k}",), str(k))

    inbox = Inbox()
    async with PushConsumer(txb.address, group="g", topic="tb", listener=inbox):
        await wait_for(lambda: set(ids[:10]) <= set(inbox.messages), what="the commits delivered")
    assert [fields(inbox.messages[ids[k]]) for k in range(10)] == [expected(k) for k in range(10)]
    assert inbox.count == 10
    txb.kill9()
    txb.start()

    def listed(state: str) -> set[str]:
        return {t["msg_id"] for t in http("GET", f"{txb.http_url}/api/transactions?state={state}")["transactions"]}

    assert listed("prepared") == set(ids[15:])

    class Decide(TransactionListener):
        def __init__(self) -> None:
            self.checked: dict[str, bytes] = {}

        async def execute_local_transaction(self, message, arg):
            return LocalTransactionState.COMMIT

        async def check_local_transaction(self, message):
            self.checked[message.msg_id] = message.body
            return LocalTransactionState.COMMIT if message.body in (b"m15", b"m16") else LocalTransactionState.ROLLBACK

    decide = Decide()
    after = Inbox()
    async with PushConsumer(txb.address, group="g", topic="tb", listener=after), \
            TransactionProducer(txb.address, group="pg", listener=decide), Producer(txb.address) as plain:
        await wait_for(lambda: not listed("prepared"), timeout=20, what="the check-backs answered")
        marker = await plain.send("tb", b"marker")
        await wait_for(lambda: {ids[15], ids[16], marker.msg_id} <= set(after.messages), what="delivery")
    assert decide.checked == {ids[k]: f"m{k}".encode() for k in range(15, n)}
    assert [fields(after.messages[ids[k]]) for k in (15, 16)] == [expected(15), expected(16)]
    assert not set(after.messages) & set(ids[10:15] + ids[17:])
    assert listed("committed") >= set(ids[:10] + ids[15:17])
    if isinstance(txb, ClusterBroker):
        return  # (no message trace in cluster mode)
    for k, outcome, by in ((3, "committed", "producer"), (12, "rolled_back", "producer"), (16, "committed", "check")):
        trace = http("GET", f"{txb.http_url}/api/messages/{ids[k]}/trace")
        stored, decided = trace["events"][:2]
        assert (stored["event"], stored["kind"], stored["keys"]) == ("stored", "half", [f"key-{k}"])
        assert (decided["event"], decided["by"]) == (outcome, by)
