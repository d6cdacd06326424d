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

from broker.config import BrokerConfig
from broker.core.records import RT_COMMIT_REF, RT_TX_OP, tx_ops
from consumer_sdk import ConsumeResult, PushConsumer
from producer_sdk import LocalTransactionState, Producer, TransactionListener, TransactionProducer
from protocol import Op
from storage.log import CorruptRecordError, SegmentLog
from tests.broker.test_process import RawClient
from tests.conftest import wait_for

TX_ARGS = ("--tx-timeout", "1s", "--tx-check-interval", "200ms", "--default-queues", "1")


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read()


def http(url: str) -> dict:
    return json.loads(get(url))


def cut_log_at_outcome_of(data_dir, msg_id: str) -> list:
    """Truncate the log where the outcome record naming ``msg_id`` starts; return the
    records just before it (the commit references it followed)."""
    lg = SegmentLog(data_dir / "log", BrokerConfig().segment_size)
    lg.load()
    try:
        before = []
        for rec in lg.iter_records(0):
            if rec.rtype == RT_TX_OP and any(op[0] == msg_id for op in tx_ops(rec.header)):
                seg = lg.find(rec.pos)
                os.truncate(seg.path, rec.pos - seg.base)
                return before
            before = [*before[-3:], rec]
    finally:
        lg.close()
    raise AssertionError(f"no outcome record of {msg_id} in the log")


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
    before = cut_log_at_outcome_of(b.data_dir, a)
    assert (before[-1].rtype, before[-1].header) == (RT_COMMIT_REF, {"ids": [a, bb]})  # kept
    b.start()

    def listed(state: str) -> set[str]:
        return {t["msg_id"] for t in http(f"{b.http_url}/api/transactions?state={state}")["transactions"]}

    assert listed("committed") == {a, bb}
    assert listed("prepared") == {cc}  # its rollback was in the lost record: unknown again
    assert "2 committed transactions had lost their outcome record" in b.log_path.read_text()
    metrics = get(f"{b.http_url}/metrics").decode()
    assert 'halfmq_transaction_outcomes_total{by="recovery",outcome="committed"} 2.0' in metrics

    class Checks(TransactionListener):
        def __init__(self) -> None:
            self.checked: list[str] = []

        async def execute_local_transaction(self, message, arg):
            return LocalTransactionState.COMMIT

        async def check_local_transaction(self, message):
            self.checked.append(message.msg_id)
            # a commit asked about again would be committed again: a second delivery
            return LocalTransactionState.ROLLBACK if message.msg_id == cc else LocalTransactionState.COMMIT

    checks = Checks()
    seen: dict[str, int] = {}

    async def on(m):
        seen[m.msg_id] = seen.get(m.msg_id, 0) + 1
        return ConsumeResult.SUCCESS

    async with TransactionProducer(b.address, group="pg", listener=checks), \
            PushConsumer(b.address, group="g", topic="torn", listener=on), Producer(b.address) as plain:
        await wait_for(lambda: not listed("prepared"), timeout=20, what="the check-back of the rollback")
        marker = await plain.send("torn", b"marker")  # one queue: after it, nothing more comes
        await wait_for(lambda: marker.msg_id in seen, what="the marker")
    assert checks.checked == [cc]
    assert seen == {a: 1, bb: 1, marker.msg_id: 1}
    assert listed("rolled_back") == {cc}
    trace = http(f"{b.http_url}/api/messages/{a}/trace")
    assert [(e["event"], e.get("by")) for e in trace["events"]][:2] == [("stored", None), ("committed", "recovery")]
    # the recovered outcome is durable: after another kill -9 nothing is asked again
    b.kill9()
    b.start()
    assert listed("committed") >= {a, bb} and listed("prepared") == set()


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
    lg = SegmentLog(b.data_dir / "log", BrokerConfig().segment_size)
    lg.load()
    try:
        refs = []
        try:
            for rec in lg.iter_records(0):
                if rec.rtype == RT_COMMIT_REF:
                    refs.append(rec)
        except CorruptRecordError:
            pass  # (where the records end: the zero-filled rest of the active segment)
        assert [rec.header for rec in refs] == [{"ids": [a]}, {"ids": [bb]}]
        seg = lg.find(refs[1].pos)
        os.truncate(seg.path, refs[1].pos - seg.base)  # the second queue's references and the outcome: gone
    finally:
        lg.close()
    b.start()

    def listed(state: str) -> set[str]:
        return {t["msg_id"] for t in http(f"{b.http_url}/api/transactions?state={state}")["transactions"]}

    assert listed("committed") == {a} and listed("prepared") == {bb}
    checked: list[str] = []

    class Commit(TransactionListener):
        async def execute_local_transaction(self, message, arg):
            return LocalTransactionState.COMMIT

        async def check_local_transaction(self, message):
            checked.append(message.msg_id)
            return LocalTransactionState.COMMIT

    seen: dict[str, int] = {}

    async def on(m):
        seen[m.msg_id] = seen.get(m.msg_id, 0) + 1
        return ConsumeResult.SUCCESS

    async with TransactionProducer(b.address, group="pg", listener=Commit()), \
            PushConsumer(b.address, group="g", topic="torn-a", listener=on), \
            PushConsumer(b.address, group="g", topic="torn-b", listener=on), Producer(b.address) as plain:
        await wait_for(lambda: not listed("prepared"), timeout=20, what="the check-back")
        markers = [(await plain.send(t, b"marker")).msg_id for t in ("torn-a", "torn-b")]
        await wait_for(lambda: set(markers) <= set(seen), what="the markers")
    assert checked == [bb]
    assert seen == {a: 1, bb: 1, markers[0]: 1, markers[1]: 1}
