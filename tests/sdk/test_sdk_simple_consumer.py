"""SimpleConsumer against a real broker: pull, per-message leases, receipt handles (issue 14)."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request

import pytest

from consumer_sdk import ConsumeResult, PushConsumer, SimpleConsumer, StaleReceiptError
from producer_sdk import LimitExceededError, Producer
from tests.conftest import wait_for

pytestmark = pytest.mark.timeout(60)


def post_json(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


async def test_receive_ack_and_long_poll(broker):
    async with Producer(broker.address) as p, \
            SimpleConsumer(broker.address, group="sg", topic="pull", wait=0.2) as c:
        assert await c.receive() == []  # nothing yet: empty after the wait
        sent = [(await p.send("pull", f"m{i}".encode())).msg_id for i in range(5)]
        got = await c.receive(max_messages=3, invisible_duration=30)
        assert len(got) == 3 and all(m.receipt_handle for m in got)
        rest = await c.receive(max_messages=10, invisible_duration=30)
        assert {m.msg_id for m in got + rest} == set(sent)  # each leased to one receiver at a time
        for m in got + rest:
            await c.ack(m)
        with pytest.raises(StaleReceiptError):
            await c.ack(got[0])  # acked: its lease is gone

        async def late_send():
            await asyncio.sleep(0.1)
            await p.send("pull", b"late")

        started = time.monotonic()
        task = asyncio.create_task(late_send())
        (late,) = await c.receive(wait=10)  # long poll: answered when the message arrives
        await task
        assert late.body == b"late" and time.monotonic() - started < 5
        await c.ack(late)


async def test_ack_many_splits_a_long_list_into_several_requests(broker, monkeypatch):
    """The broker takes at most ``MAX_FRAME_ITEMS`` entries in one list: ``ack_many`` sends
    ``ACK_MANY_BATCH`` acks per request (4 here, to see the split on 10 messages)."""
    import consumer_sdk.simple as simple

    monkeypatch.setattr(simple, "ACK_MANY_BATCH", 4)
    async with Producer(broker.address) as p, \
            SimpleConsumer(broker.address, group="sg", topic="many-acks", wait=0.2) as c:
        for i in range(10):
            await p.send("many-acks", f"m{i}".encode())
        got: list = []
        while len(got) < 10:
            got += await c.receive(max_messages=10, invisible_duration=30)
        requests = []
        real = c._request

        async def counted(items):
            requests.append(len(items))
            return await real(items)

        monkeypatch.setattr(c, "_request", counted)
        assert await c.ack_many(got) == [None] * 10
        assert requests == [4, 4, 2]
        for m in got:  # every one acked: its lease is gone
            with pytest.raises(StaleReceiptError):
                await c.ack(m)
        assert await c.ack_many([]) == []


async def test_invisible_duration_runs_out_and_the_message_comes_back(broker):
    async with Producer(broker.address) as p, SimpleConsumer(broker.address, group="sg", topic="vis") as c:
        await p.send("vis", b"x")
        (m,) = await c.receive(invisible_duration=0.3, wait=5)
        again = await wait_for(lambda: c.receive(invisible_duration=30, wait=1), timeout=10, what="redelivery")
        assert again[0].msg_id == m.msg_id and again[0].reconsume_times == 1
        with pytest.raises(StaleReceiptError):
            await c.ack(m)
        await c.ack(again[0])


async def test_change_invisible_duration_and_nack(broker):
    async with Producer(broker.address) as p, SimpleConsumer(broker.address, group="sg", topic="cid") as c:
        await p.send("cid", b"x")
        (m,) = await c.receive(invisible_duration=0.5, wait=5)
        m2 = await c.change_invisible_duration(m, 30)
        assert m2.receipt_handle != m.receipt_handle
        assert await c.receive(wait=1) == []  # still leased well past the first 0.5 s
        await c.nack(m, delay=0.2)  # the consumer remembers the newer handle
        (back,) = await wait_for(lambda: c.receive(wait=1), timeout=10, what="the nacked message")
        assert back.msg_id == m.msg_id and back.reconsume_times == 1
        await c.ack(back)


async def test_a_handle_works_from_another_connection_of_the_group(broker):
    async with Producer(broker.address) as p, \
            SimpleConsumer(broker.address, group="sg", topic="hand") as worker, \
            SimpleConsumer(broker.address, group="sg", topic="hand") as acker:
        await p.send("hand", b"x")
        (m,) = await worker.receive(wait=5)
        await acker.ack(m)
        with pytest.raises(StaleReceiptError):
            await worker.ack(m)


async def test_group_max_attempts_dead_letters_pulled_messages(broker):
    post_json(f"{broker.http_url}/api/groups/sgd/settings", {"max_attempts": 2, "retry_delays": "100ms"})
    async with Producer(broker.address) as p, SimpleConsumer(broker.address, group="sgd", topic="dl") as c:
        msg_id = (await p.send("dl", b"x")).msg_id
        for attempt in range(2):
            (m,) = await wait_for(lambda: c.receive(wait=1), timeout=10, what=f"attempt {attempt}")
            assert m.reconsume_times == attempt
            await c.nack(m)  # the group's ladder: 100 ms
    got: list = []

    async def on(m):
        got.append(m)
        return ConsumeResult.SUCCESS

    async with PushConsumer(broker.address, group="dlq-reader", topic="%DLQ%sgd", listener=on):
        await wait_for(lambda: got, what="the dead letter")
    assert got[0].msg_id == msg_id and got[0].properties["ORIGIN_TOPIC"] == "dl"


async def test_receive_past_the_prefetch_limit_is_refused(broker_factory):
    b = broker_factory("--max-prefetch", "8")
    async with SimpleConsumer(b.address, group="sg", topic="lim") as c:
        with pytest.raises(LimitExceededError):
            await c.receive(max_messages=9)


@pytest.mark.embedded_only("a lease outlives its gateway only until --ack-timeout (60 s here): the "
                            "messages come back after it, not at the restart (README, pull consumers, "
                            "cluster mode differences; tests/cluster covers it with a short ack timeout)")
async def test_leases_after_kill9_are_stale_and_the_messages_come_back(broker_factory):
    b = broker_factory()
    async with Producer(b.address) as p:
        ids = [(await p.send("crash", f"m{i}".encode())).msg_id for i in range(4)]
    c = SimpleConsumer(b.address, group="sg", topic="crash")
    await c.start()
    try:
        held = await c.receive(max_messages=4, invisible_duration=60, wait=5)
        assert len(held) == 4
        await c.ack(held[0])  # confirmed: durable
        b.kill9()
        b.start()
        # embedded: the broker restarted; cluster mode: the gateway that leased it is gone
        with pytest.raises(StaleReceiptError, match="restarted|is gone"):
            await c.ack(held[1])
        again = []
        while len(again) < 3:
            again += await c.receive(max_messages=4, wait=5)
        assert {m.msg_id for m in again} == set(ids[1:])  # the acked one never comes back
        for m in again:
            await c.ack(m)
    finally:
        await c.close()
