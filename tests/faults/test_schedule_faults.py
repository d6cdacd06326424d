"""Scheduled messages under faults: ``kill -9`` with messages outstanding, recall across a
restart, delayed transactions (the delay counts from the commit), retention.

"None doubled" is checked on the broker's side: the number of index entries in the topic's
queues (``messages`` in ``/api/topics``) equals the number of messages sent, so no message
was released twice -- a consumer may still see a delivery again after a crash (at least
once), which is not what is tested here.

On both engines (``tests.engines``; the cluster variant under ``-m slow``): there the
kill -9 and restart are of both gateways, the schedules are the engine's, and "messages"
counts the visible records of the topic's stream. The retention test looks inside the
embedded store and runs there only.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from broker import Broker, BrokerConfig
from consumer_sdk import PushConsumer
from producer_sdk import LocalTransactionState, Producer, TransactionListener, TransactionProducer
from tests.conftest import wait_for
from tests.engines import slow_cluster_broker_factory
from tests.sdk.schedule_helpers import Arrivals, topic_view

pytestmark = pytest.mark.timeout(90)
__all__ = ["slow_cluster_broker_factory"]


async def _settled(http_url: str, topic: str, messages: int) -> bool:
    view = topic_view(http_url, topic)
    return view.get("messages") == messages and view.get("scheduled") == 0


async def test_kill9_with_scheduled_messages_none_lost_early_or_doubled(broker_factory):
    # (in cluster mode deliveries leased by the killed gateways come back after --ack-timeout)
    b = broker_factory("--ack-timeout", "5s")
    rec = Arrivals()
    n = 3000
    t0 = time.time()
    async with Producer(b.address) as p, PushConsumer(b.address, group="g", topic="k9", listener=rec):
        sent = []
        for k in range(0, n, 100):  # due spread over 1.5 .. 6 s from now, 100 per batch
            sent += await p.send_batch("k9", [{"body": f"m{k + j}", "deliver_at": t0 + 1.5 + 4.5 * (k + j) / n}
                                              for j in range(100)])
        recalled = [await p.send("k9", f"r{k}", deliver_at=t0 + 3.0) for k in range(20)]
        for r in recalled:
            await p.recall(r.msg_id)
        await wait_for(lambda: len(rec.messages) >= n // 4, timeout=20, what="a quarter delivered")
        b.kill9()  # mid-release: some delivered, some due during the downtime, some later
        b.start()
        expected = {r.msg_id for r in sent}
        await wait_for(lambda: expected <= set(rec.ids()), timeout=30, what="every message after the restart")
        await wait_for(lambda: _settled(b.http_url, "k9", n), timeout=10, what="no message released twice")
    early = [(at, m.deliver_at) for at, m in rec.messages if at < m.deliver_at]
    assert not early, f"{len(early)} delivered early, e.g. {early[:3]}"
    assert not {r.msg_id for r in recalled} & set(rec.ids()), "a recalled message was delivered"


async def test_recall_holds_across_kill9_and_restart(broker_factory):
    b = broker_factory("--default-queues", "1")
    rec = Arrivals()
    async with Producer(b.address) as p:
        due = time.time() + 2.0
        msgs = [await p.send("rr", f"m{k}", deliver_at=due) for k in range(6)]
        for m in msgs[::2]:
            await p.recall(m.msg_id)
        b.kill9()  # the recalls were acknowledged: they are durable
        b.start()
        await p.recall(msgs[0].msg_id)  # still recalled after the restart: no error
        b.restart()  # and after a graceful one
        async with PushConsumer(b.address, group="g", topic="rr", listener=rec):
            await wait_for(lambda: len(rec.messages) >= 3, timeout=15, what="the three kept")
            sentinel = await p.send("rr", "sentinel")  # one queue: after it, nothing is due
            await wait_for(lambda: sentinel.msg_id in rec.ids(), timeout=10, what="the sentinel")
    assert sorted(rec.ids()) == sorted([m.msg_id for m in msgs[1::2]] + [sentinel.msg_id])
    assert await _settled(b.http_url, "rr", 4)


class _Delayed(TransactionListener):
    """Commits after ``hold`` seconds (or leaves the outcome to the check-back)."""

    def __init__(self, *, hold: float = 0.0, outcome: LocalTransactionState = LocalTransactionState.COMMIT,
                 check: LocalTransactionState = LocalTransactionState.COMMIT) -> None:
        self.hold, self.outcome, self.check = hold, outcome, check
        self.decided_at: dict[str, float] = {}  # msg_id -> when the outcome left the listener

    async def execute_local_transaction(self, message, arg):
        await asyncio.sleep(self.hold)
        self.decided_at[message.msg_id] = time.time()
        return self.outcome

    async def check_local_transaction(self, message):
        self.decided_at[message.msg_id] = time.time()
        return self.check


async def test_delayed_transaction_counts_from_the_commit(broker):
    rec = Arrivals()
    slow = _Delayed(hold=0.6)
    async with PushConsumer(broker.address, group="g", topic="txd", listener=rec):
        async with TransactionProducer(broker.address, group="pg", listener=slow) as tp:
            sent_at = time.time()
            r = await tp.send_in_transaction("txd", b"late", delay=0.5)
            assert r.state is LocalTransactionState.COMMIT and r.queue_offset == -1
            assert topic_view(broker.http_url, "txd")["scheduled"] == 1
            await wait_for(lambda: rec.messages, timeout=10, what="the delayed transaction")
    arrived = rec.messages[0][0] / 1000
    committed = slow.decided_at[r.msg_id]
    assert arrived >= committed + 0.5, (arrived - committed)  # the delay runs from the commit ...
    assert arrived >= sent_at + 1.1  # ... not from the half message
    assert rec.ids() == [r.msg_id]


async def test_delayed_transaction_rolled_back_or_checked_back(broker):
    rec = Arrivals()
    unknown = _Delayed(outcome=LocalTransactionState.UNKNOWN, check=LocalTransactionState.COMMIT)
    back = _Delayed(outcome=LocalTransactionState.ROLLBACK)
    async with PushConsumer(broker.address, group="g", topic="txc", listener=rec):
        async with TransactionProducer(broker.address, group="pg", listener=back) as tp:
            rolled = await tp.send_in_transaction("txc", b"never", delay=0.2)
        async with TransactionProducer(broker.address, group="pg2", listener=unknown) as tp:
            checked = await tp.send_in_transaction("txc", b"checked", delay=0.4)
            # the broker asks after --tx-timeout (1 s); the check's COMMIT starts the delay
            await wait_for(lambda: rec.messages, timeout=15, what="the checked-back transaction")
        sentinel_p = Producer(broker.address)
        async with sentinel_p:
            await sentinel_p.send("txc", "plain")
        await wait_for(lambda: len(rec.messages) == 2, timeout=10, what="the plain message")
    arrived = rec.messages[0][0] / 1000
    assert rec.messages[0][1].msg_id == checked.msg_id
    assert arrived >= unknown.decided_at[checked.msg_id] + 0.4
    assert rolled.msg_id not in rec.ids()
    assert topic_view(broker.http_url, "txc")["messages"] == 2


async def test_delayed_transaction_survives_kill9_before_it_is_due(broker_factory):
    b = broker_factory()
    rec = Arrivals()
    async with TransactionProducer(b.address, group="pg", listener=_Delayed()) as tp:
        r = await tp.send_in_transaction("txk", b"x", delay=2.0)
        committed_by = time.time()
    b.kill9()
    b.start()
    async with PushConsumer(b.address, group="g", topic="txk", listener=rec):
        await wait_for(lambda: rec.messages, timeout=15, what="the delayed transaction after the restart")
        await wait_for(lambda: _settled(b.http_url, "txk", 1), timeout=10, what="released once")
    assert rec.ids()[0] == r.msg_id
    assert rec.messages[0][0] / 1000 >= committed_by + 2.0 - 0.1  # (committed a moment before)


async def test_retention_keeps_what_the_schedule_needs(tmp_path):
    """Segments older than --retention go, but never one holding a scheduled message."""
    cfg = BrokerConfig(data_dir=str(tmp_path / "ret"), port=0, http_port=0, segment_size="128KiB",
                       max_message_size=4096, retention=0.2)
    rec = Arrivals()
    async with Broker(cfg) as b, Producer(b.address) as p:
        filler = b"f" * 3000
        for _ in range(100):  # several segments that retention may delete
            await p.send("ret", filler)
        kept = await p.send("ret", b"scheduled", delay=5.0)
        for _ in range(100):
            await p.send("ret", filler)
        last_write = time.time()
        store = b.engine.store
        first_segment = store.start_pos
        await wait_for(store.run_retention, timeout=3, what="retention deleting a segment")
        # once every segment but the active one is past --retention, retention goes as far
        # as the schedule lets it
        await wait_for(lambda: time.time() > last_write + 0.3, what="the filler to age")
        await store.run_retention()
        assert store.start_pos > first_segment
        assert b.engine.scheduled_by_topic()["ret"][0] == 1  # retention ran while it waited
        async with PushConsumer(b.address, group="g", topic="ret", listener=rec):
            await wait_for(lambda: kept.msg_id in rec.ids(), timeout=10, what="the scheduled message")
        assert [m.body for _, m in rec.messages if m.msg_id == kept.msg_id] == [b"scheduled"]
        assert store.start_pos <= int(kept.msg_id[8:], 16)
