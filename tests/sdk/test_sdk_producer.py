"""Producer SDK against a real broker: round trip, batches, validation, size limits."""

from __future__ import annotations

import asyncio
import re
import time

import pytest

import consumer_sdk
import producer_sdk
from consumer_sdk import PushConsumer
from producer_sdk import (
    InvalidNameError,
    MessageTooLargeError,
    Producer,
    SendResult,
)
from producer_sdk.connection import Connection
from protocol import Op, Role
from tests.conftest import wait_for
from tests.sdk.sdk_helpers import Recorder

pytestmark = pytest.mark.timeout(30)


def test_exports_are_pinned():
    errors = ["HalfMQError", "BrokerUnavailableError", "InvalidNameError", "MessageTooLargeError",
              "RequestTimeoutError", "TransactionStateError", "AuthError", "LimitExceededError",
              "MessageStateError", "TopicNotFoundError"]
    assert sorted(producer_sdk.__all__) == sorted(
        ["Producer", "TransactionProducer", "TransactionListener", "BatchTransactionListener", "LocalTransactionState",
         "SendResult", "Message", *errors,
         "TxLogChecker", "TxLogListener", "TxLogBatchListener", "record_commit", "create_tx_log", "AlreadyRolledBackError",
         "Outbox"])
    assert sorted(consumer_sdk.__all__) == sorted(["PushConsumer", "SimpleConsumer", "ReceivedMessage",
                                                   "StaleReceiptError", "ConsumeResult", "Message",
                                                   *errors, "apply_once", "claim_key", "create_dedup_table",
                                                   "WebhookVerifier", "WebhookRequest",
                                                   "WebhookVerificationError"])
    for name in producer_sdk.__all__:
        assert getattr(producer_sdk, name) is not None
    for name in consumer_sdk.__all__:
        assert getattr(consumer_sdk, name) is not None


async def test_roundtrip_all_fields(broker):
    rec = Recorder()
    before = int(time.time() * 1000)
    async with Producer(broker.address, group="pg") as p:
        r = await p.send("rt", "héllo", tags="TagA", keys=["k1", "k2"], properties={"a": "1"})
        assert isinstance(r, SendResult) and r.msg_id and r.queue_offset >= 0
        async with PushConsumer(broker.address, group="g", topic="rt", listener=rec):
            await wait_for(lambda: rec.messages, what="delivery")
    m = rec.messages[0]
    assert m.msg_id == r.msg_id
    assert m.topic == "rt"
    assert m.body == "héllo".encode()
    assert m.tags == "TagA"
    assert m.keys == ("k1", "k2")
    assert m.properties.get("a") == "1"
    assert before <= m.born_timestamp <= m.store_timestamp <= int(time.time() * 1000)
    assert (m.queue_id, m.queue_offset) == (r.queue_id, r.queue_offset)
    assert m.reconsume_times == 0


async def test_send_batch_keeps_order(broker):
    rec = Recorder()
    items = [b"b0", "b1", {"body": b"b2", "tags": "T", "keys": ["x"], "properties": {"p": "v"}}]
    items += [f"b{i}".encode() for i in range(3, 20)]
    async with Producer(broker.address) as p:
        results = await p.send_batch("batch", items)
        assert len(results) == 20
        assert len({r.msg_id for r in results}) == 20
        assert await p.send_batch("batch", []) == []
    # one queue per batch is not promised, but order within each queue is
    by_queue: dict[int, list[int]] = {}
    for r in results:
        by_queue.setdefault(r.queue_id, []).append(r.queue_offset)
    for offsets in by_queue.values():
        assert offsets == sorted(offsets)
    async with PushConsumer(broker.address, group="g", topic="batch", listener=rec):
        await wait_for(lambda: len(rec.messages) == 20, what="20 deliveries")
    got = {m.msg_id: m for m in rec.messages}
    assert [got[r.msg_id].body for r in results] == [f"b{i}".encode() for i in range(20)]
    third = got[results[2].msg_id]
    assert (third.tags, third.keys, third.properties.get("p")) == ("T", ("x",), "v")


async def test_a_cancelled_send_leaves_the_rest_of_its_micro_batch(broker):
    rec = Recorder()
    async with Producer(broker.address) as p:
        sends = [asyncio.ensure_future(p.send("mb", f"m{i}".encode())) for i in range(10)]
        await asyncio.sleep(0)  # all ten queued in one micro-batch, not yet answered
        assert len(p._queued["mb"].futs) == 10
        sends[3].cancel()
        done = await asyncio.gather(*sends, return_exceptions=True)
        assert isinstance(done[3], asyncio.CancelledError)
        results = [r for i, r in enumerate(done) if i != 3]
        assert all(type(r) is SendResult and r.topic == "mb" and r.state is None for r in results)
        assert len({r.msg_id for r in results}) == 9
        assert all(re.fullmatch(r"[0-9A-F]{16}", r.msg_id[-16:]) for r in results)
        async with PushConsumer(broker.address, group="g", topic="mb", listener=rec):
            await wait_for(lambda: len(rec.messages) == 10, what="10 deliveries")  # (sent before the cancel)
    got = {m.msg_id: m for m in rec.messages}
    assert [(got[r.msg_id].queue_id, got[r.msg_id].queue_offset) for r in results] == \
        [(r.queue_id, r.queue_offset) for r in results]


class _CountingTransport:
    """Wraps the connection's transport and counts its writes."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.writes = 0

    def write(self, data) -> None:
        self.writes += 1
        self.inner.write(data)

    def __getattr__(self, name):
        return getattr(self.inner, name)


async def test_one_at_a_time_a_send_is_written_at_once_and_a_burst_still_shares_frames(broker):
    rec = Recorder()
    async with Producer(broker.address) as p:
        conn = p._conn
        await p.send("lone", b"0")  # a frame of one message: one at a time from now on
        counting = conn._transport = _CountingTransport(conn._transport)
        task = asyncio.ensure_future(p.send("lone", b"1"))
        await asyncio.sleep(0)  # the task runs up to its await
        # written from send itself: nothing queued for the end of the iteration
        assert counting.writes == 1 and not conn._flush_scheduled and not p._queued
        await task
        counting.writes = 0
        # a burst after it: its first message goes alone, the other nine share one frame
        burst = await asyncio.gather(*(p.send("lone", b"a%d" % i) for i in range(10)))
        assert counting.writes == 2
        counting.writes = 0
        # and the next burst is one frame (the last one held nine: no longer one at a time)
        burst += await asyncio.gather(*(p.send("lone", b"b%d" % i) for i in range(10)))
        assert counting.writes == 1
        assert len({r.msg_id for r in burst}) == 20
        async with PushConsumer(broker.address, group="g", topic="lone", listener=rec):
            await wait_for(lambda: len(rec.messages) == 22, what="22 deliveries")
    assert sorted(m.body for m in rec.messages) == sorted(
        [b"0", b"1"] + [b"a%d" % i for i in range(10)] + [b"b%d" % i for i in range(10)])


async def test_local_name_validation(broker):
    async with Producer(broker.address) as p:
        for bad in ["", "has space", "a/b", "x" * 128, "%DLQ%x", "%sys"]:
            with pytest.raises(InvalidNameError):
                await p.send(bad, b"x")
            with pytest.raises(InvalidNameError):
                await p.send_batch(bad, [b"x"])
    with pytest.raises(InvalidNameError):
        Producer(broker.address, group="bad group")
    with pytest.raises(InvalidNameError):
        PushConsumer(broker.address, group="g", topic="bad topic", listener=Recorder())
    with pytest.raises(InvalidNameError):
        PushConsumer(broker.address, group="%g", topic="t", listener=Recorder())
    # a DLQ topic may be subscribed to
    PushConsumer(broker.address, group="g", topic="%DLQ%g", listener=Recorder())


async def test_too_large_body_refused_and_nothing_stored(broker_factory):
    b = broker_factory("--max-message-size", "1024")
    rec = Recorder()
    async with Producer(b.address) as p:
        with pytest.raises(MessageTooLargeError):
            await p.send("big", b"x" * 1025)
        with pytest.raises(MessageTooLargeError):
            await p.send_batch("big", [b"x" * 600, b"y" * 600])
        # the broker itself refuses it too (bypassing the SDK's local check)
        conn = Connection(b.address, role=Role.PRODUCER)
        await conn.open()
        try:
            assert conn.max_message_size == 1024
            with pytest.raises(MessageTooLargeError):
                await conn.request(Op.SEND, {"topic": "big", "msgs": [[b"x" * 2000, None, [], {}, 0]],
                                             "half": False})
            # the connection stays usable after a refused request
            await conn.request(Op.PING, {})
        finally:
            await conn.close()
        ok = await p.send("big", b"x" * 1024)
    async with PushConsumer(b.address, group="g", topic="big", listener=rec):
        await wait_for(lambda: rec.messages, what="the accepted message")
    assert [m.msg_id for m in rec.messages] == [ok.msg_id]


async def test_send_before_start_and_after_close(broker):
    p = Producer(broker.address)
    with pytest.raises(producer_sdk.HalfMQError):
        await p.send("t", b"x")
    await p.start()
    await p.close()
    with pytest.raises(producer_sdk.HalfMQError):
        await p.send("t", b"x")


async def test_unreachable_broker_raises_unavailable(broker):
    broker.stop()
    t0 = time.monotonic()
    with pytest.raises(producer_sdk.BrokerUnavailableError):
        await Producer(broker.address, send_timeout=0.5).start()
    assert time.monotonic() - t0 < 3
