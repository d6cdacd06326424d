"""A crash that cuts an END_TX's outcome record off the log but keeps its commits.

The embedded engine writes the commit references of an END_TX (the index entries that make
its messages visible) and then, in the same write, its outcome record. A power cut can keep
a prefix of that write: the references without the outcome. Here the cut is real: the
broker is killed with SIGKILL and its log file is truncated where the outcome record began.
After the restart the commits must count as committed (no check-back asks about them, each
message is delivered once) and the transactions whose outcome was lost with them but which
had no reference (a rollback) are checked back as any unresolved transaction.
"""

from __future__ import annotations

import json
import os
import urllib.request
from collections.abc import Callable

from broker.config import BrokerConfig
from broker.core.records import RT_COMMIT_REF, RT_TX_OP, tx_ops
from consumer_sdk import ConsumeResult, PushConsumer
from producer_sdk import LocalTransactionState, Producer, TransactionListener, TransactionProducer
from protocol import Op
from storage import Record
from storage.framing import CorruptRecordError
from storage.log import SegmentLog
from tests.broker.test_process import RawClient
from tests.conftest import wait_for

TX_ARGS = ("--tx-timeout", "1s", "--tx-check-interval", "200ms", "--default-queues", "1")


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read()


def http(url: str) -> dict:
    return json.loads(get(url))


def cut_log_before(data_dir, is_cut: Callable[[Record], bool]) -> list[Record]:
    """Truncate the log where the first record with ``is_cut(record)`` starts; return the
    records before it."""
    lg = SegmentLog(data_dir / "log", BrokerConfig().segment_size)
    lg.load()
    try:
        before: list[Record] = []
        try:
            for rec in lg.iter_records(0):
                if is_cut(rec):
                    seg = lg.find(rec.pos)
                    os.truncate(seg.path, rec.pos - seg.base)
                    return before
                before.append(rec)
        except CorruptRecordError:
            pass  # (where the records end: the zero-filled rest of the active segment)
    finally:
        lg.close()
    raise AssertionError("no such record in the log")


def listed(b, state: str) -> set[str]:
    """The ids of the broker's transactions in ``state``."""
    return {t["msg_id"] for t in http(f"{b.http_url}/api/transactions?state={state}")["transactions"]}


class Checks(TransactionListener):
    """Commits each local transaction; answers a check-back with ``answer(msg_id)`` and
    records who was asked."""

    def __init__(self, answer: Callable[[str], LocalTransactionState]) -> None:
        self.answer = answer
        self.checked: list[str] = []

    async def execute_local_transaction(self, message, arg):
        return LocalTransactionState.COMMIT

    async def check_local_transaction(self, message):
        self.checked.append(message.msg_id)
        return self.answer(message.msg_id)


class Deliveries(dict):
    """A consumer's listener: msg_id -> times delivered."""

    async def __call__(self, m):
        self[m.msg_id] = self.get(m.msg_id, 0) + 1
        return ConsumeResult.SUCCESS


async def test_commits_whose_outcome_record_was_cut_off_count_as_committed(broker_factory):
    b = broker_factory(*TX_ARGS)
    c = await RawClient.connect(b.address, group="pg")
    op, p = await c.request(Op.SEND, {"topic": "torn", "half": True,
                                      "msgs": [[b"a", None, [], {}, 0], [b"b", None, [], {}, 0],
                                               [b"c", None, [], {}, 0]]})
    a, bb, cc = (f'{p["p"]}{row[0]:016X}' for row in p["r"])
    op, p = await c.request(Op.END_TX, {"items": [[a, "COMMIT"], [bb, "COMMIT"], [cc, "ROLLBACK"]]})
    assert (op, p) == (Op.REPLY, {"r": ["COMMITTED", "COMMITTED", "ROLLED_BACK"]})
    c.close()
    b.kill9()
    before = cut_log_before(b.data_dir, lambda rec: rec.rtype == RT_TX_OP
                            and any(op[0] == a for op in tx_ops(rec.header)))
    assert (before[-1].rtype, before[-1].header) == (RT_COMMIT_REF, {"ids": [a, bb]})  # kept
    b.start()
    assert listed(b, "committed") == {a, bb}
    assert listed(b, "prepared") == {cc}  # its rollback was in the lost record: unknown again
    assert "2 committed transactions had lost their outcome record" in b.log_path.read_text()
    metrics = get(f"{b.http_url}/metrics").decode()
    assert 'halfmq_transaction_outcomes_total{by="recovery",outcome="committed"} 2.0' in metrics

    # a commit asked about again would be committed again: a second delivery
    checks = Checks(lambda msg_id: LocalTransactionState.ROLLBACK if msg_id == cc else LocalTransactionState.COMMIT)
    seen = Deliveries()

    async with TransactionProducer(b.address, group="pg", listener=checks), \
            PushConsumer(b.address, group="g", topic="torn", listener=seen), Producer(b.address) as plain:
        await wait_for(lambda: not listed(b, "prepared"), timeout=20, what="the check-back of the rollback")
        marker = await plain.send("torn", b"marker")  # one queue: after it, nothing more comes
        await wait_for(lambda: marker.msg_id in seen, what="the marker")
    assert checks.checked == [cc]
    assert seen == {a: 1, bb: 1, marker.msg_id: 1}
    assert listed(b, "rolled_back") == {cc}
    trace = http(f"{b.http_url}/api/messages/{a}/trace")
    assert [(e["event"], e.get("by")) for e in trace["events"]][:2] == [("stored", None), ("committed", "recovery")]
    # the recovered outcome is durable: after another kill -9 nothing is asked again
    b.kill9()
    b.start()
    assert listed(b, "committed") >= {a, bb} and listed(b, "prepared") == set()


async def test_a_cut_between_the_references_of_two_queues_loses_no_commit_and_repeats_none(broker_factory):
    """One END_TX commits a message of each of two topics: two references records, then the
    outcome. Cut after the first: its commit is recovered as committed, the other comes
    back PREPARED and is committed by the check-back; each message is delivered once."""
    b = broker_factory(*TX_ARGS)
    c = await RawClient.connect(b.address, group="pg")
    ids = []
    for topic in ("torn-a", "torn-b"):
        op, p = await c.request(Op.SEND, {"topic": topic, "half": True, "msgs": [[topic.encode(), None, [], {}, 0]]})
        ids.append(f'{p["p"]}{p["r"][0][0]:016X}')
    a, bb = ids
    op, p = await c.request(Op.END_TX, {"items": [[a, "COMMIT"], [bb, "COMMIT"]]})
    assert (op, p) == (Op.REPLY, {"r": ["COMMITTED", "COMMITTED"]})
    c.close()
    b.kill9()
    refs: list[Record] = []

    def second_refs(rec: Record) -> bool:  # the second queue's references and the outcome: gone
        if rec.rtype == RT_COMMIT_REF:
            refs.append(rec)
        return len(refs) == 2

    cut_log_before(b.data_dir, second_refs)
    assert [rec.header for rec in refs] == [{"ids": [a]}, {"ids": [bb]}]
    b.start()
    assert listed(b, "committed") == {a} and listed(b, "prepared") == {bb}
    checks = Checks(lambda _msg_id: LocalTransactionState.COMMIT)
    seen = Deliveries()

    async with TransactionProducer(b.address, group="pg", listener=checks), \
            PushConsumer(b.address, group="g", topic="torn-a", listener=seen), \
            PushConsumer(b.address, group="g", topic="torn-b", listener=seen), Producer(b.address) as plain:
        await wait_for(lambda: not listed(b, "prepared"), timeout=20, what="the check-back")
        markers = [(await plain.send(t, b"marker")).msg_id for t in ("torn-a", "torn-b")]
        await wait_for(lambda: set(markers) <= set(seen), what="the markers")
    assert checks.checked == [bb]
    assert seen == {a: 1, bb: 1, markers[0]: 1, markers[1]: 1}
