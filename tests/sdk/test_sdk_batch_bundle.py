"""A send_batch stored as one bundle record: every member is still a message of its own."""

from __future__ import annotations

import aiohttp
import pytest

from consumer_sdk import ConsumeResult, PushConsumer
from producer_sdk import Producer
from tests.conftest import wait_for
from tests.sdk.sdk_helpers import Recorder

pytestmark = pytest.mark.timeout(30)


async def _stats(broker) -> dict:
    async with aiohttp.ClientSession() as http, http.get(f"{broker.http_url}/api/stats") as r:
        return await r.json()


@pytest.mark.embedded_only("a batch stored as one bundle record is the embedded log's format "
                            "(/api/stats 'store'); the engine stores one record per message")
async def test_batch_members_are_retried_dead_lettered_looked_up_and_resent(broker):
    items = [{"body": f"m{i}".encode(), "tags": "P" if i == 7 else "T", "keys": [f"k{i}"]} for i in range(40)]
    async with Producer(broker.address) as p:
        before = await _stats(broker)
        results = await p.send_batch("bb", items)
        after = await _stats(broker)
    # one record in the log for the 40 messages, in one queue, at consecutive offsets
    assert after["store"]["records"] - before["store"]["records"] == 40
    assert after["store"]["bundles"] - before["store"]["bundles"] == 1
    assert {r.queue_id for r in results} == {results[0].queue_id}
    assert [r.queue_offset for r in results] == list(range(results[0].queue_offset, results[0].queue_offset + 40))
    poison = results[7].msg_id

    def decide(m):
        return ConsumeResult.RECONSUME_LATER if m.msg_id == poison else ConsumeResult.SUCCESS

    rec, dlq = Recorder(decide), Recorder()
    async with (
        PushConsumer(broker.address, group="g", topic="bb", listener=rec, max_reconsume_times=1),
        PushConsumer(broker.address, group="dlqreader", topic="%DLQ%g", listener=dlq),
    ):
        await wait_for(lambda: dlq.messages, what="the poison message in %DLQ%g")
        assert {m.msg_id for m in rec.messages} == {r.msg_id for r in results}
        assert [m.reconsume_times for m in rec.messages if m.msg_id == poison] == [0, 1]
        got = {m.msg_id: m for m in rec.messages}
        for i, r in enumerate(results):
            m = got[r.msg_id]
            assert (m.body, m.keys, m.queue_offset) == (f"m{i}".encode(), (f"k{i}",), r.queue_offset)
        d = dlq.messages[0]
        assert (d.msg_id, d.body, d.tags, d.properties.get("ORIGIN_TOPIC")) == (poison, b"m7", "P", "bb")
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{broker.http_url}/api/messages/{results[3].msg_id}") as r:
                assert r.status == 200
                info = await r.json()
                assert info["topic"] == "bb" and info["keys"] == ["k3"]
            async with http.get(f"{broker.http_url}/api/messages", params={"topic": "bb", "key": "k9"}) as r:
                assert [m["msg_id"] for m in (await r.json())["messages"]] == [results[9].msg_id]
            n = len(rec.messages)
            async with http.post(f"{broker.http_url}/api/dlq/g/messages/{poison}/resend",
                                 headers={"X-HalfMQ-Request": "test"}) as r:
                assert r.status == 200
        await wait_for(lambda: len(rec.messages) > n, what="the resent message")
    assert rec.messages[-1].msg_id == poison and rec.messages[-1].body == b"m7"


@pytest.mark.embedded_only("--segment-size and bundle records belong to the embedded log")
async def test_with_small_segments_a_batch_is_stored_one_record_per_message(broker_factory):
    # 256 KiB segments hold one 16 KiB message with its frame overhead, not two whole frames
    b = broker_factory("--segment-size", "256KiB", "--max-message-size", "16KiB")
    items = [bytes([i]) * 512 for i in range(30)]
    async with Producer(b.address) as p:
        before = await _stats(b)
        results = await p.send_batch("small", items)
        after = await _stats(b)
    assert after["store"]["bundles"] == before["store"]["bundles"]
    assert after["store"]["records"] - before["store"]["records"] == 30
    rec = Recorder()
    async with PushConsumer(b.address, group="g", topic="small", listener=rec):
        await wait_for(lambda: len(rec.messages) == 30, what="30 deliveries")
    got = {m.msg_id: m.body for m in rec.messages}
    assert [got[r.msg_id] for r in results] == items
