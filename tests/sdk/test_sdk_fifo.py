"""FIFO message groups against a real broker: order per group over a thousand groups, with
failures and retries, members joining and leaving, and a broker kill -9 (issue 14)."""

from __future__ import annotations

import asyncio
import json
import random
import urllib.request

import pytest

from consumer_sdk import ConsumeResult, PushConsumer, SimpleConsumer
from producer_sdk import HalfMQError, Producer
from tests.conftest import wait_for
from tests.faults.test_crash_redelivery import admin

pytestmark = pytest.mark.timeout(120)

GROUPS, PER_GROUP = 1000, 5


def post_json(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


async def send_groups(address: str, topic: str) -> None:
    """Message k of every group, for k = 0..PER_GROUP-1: the groups interleave in the log."""
    async with Producer(address) as p:
        for k in range(PER_GROUP):
            await p.send_batch(topic, [{"body": f"{g}:{k}", "message_group": f"order-{g}"}
                                       for g in range(GROUPS)])


class OrderChecker:
    """A listener that fails some first attempts and checks, per group, that a message is
    processed only after every earlier one of its group (duplicates of earlier ones allowed)."""

    def __init__(self, fail_rate: float = 0.05, seed: int = 7) -> None:
        self.done: dict[str, int] = {}  # group -> messages processed in order
        self.in_flight: set[str] = set()
        self.overlaps = 0
        self.violations: list[str] = []
        self.rng = random.Random(seed)
        self.fail_rate = fail_rate

    async def __call__(self, m) -> ConsumeResult:
        g, k = m.body.decode().split(":")
        k = int(k)
        assert m.message_group == f"order-{g}"
        if g in self.in_flight:
            self.overlaps += 1
        self.in_flight.add(g)
        try:
            await asyncio.sleep(0)
            if k > self.done.get(g, 0):
                self.violations.append(f"group {g}: message {k} before {self.done.get(g, 0)}")
            if m.reconsume_times == 0 and self.rng.random() < self.fail_rate:
                return ConsumeResult.RECONSUME_LATER
            if k == self.done.get(g, 0):
                self.done[g] = k + 1
            return ConsumeResult.SUCCESS
        finally:
            self.in_flight.discard(g)

    def complete(self) -> bool:
        return len(self.done) == GROUPS and all(v == PER_GROUP for v in self.done.values())


async def test_fifo_group_keeps_order_per_message_group_with_retries_and_members_coming_and_going(broker):
    post_json(f"{broker.http_url}/api/groups/fifo-g/settings", {"fifo": True, "retry_delays": "50ms"})
    await send_groups(broker.address, "orders")
    check = OrderChecker()
    consumers = [PushConsumer(broker.address, group="fifo-g", topic="orders", listener=check, prefetch=64)
                 for _ in range(2)]
    for c in consumers:
        await c.start()
    await wait_for(lambda: len(check.done) > GROUPS // 3, timeout=60, what="a third of the groups started")
    await consumers[0].close()  # a member leaves
    late = PushConsumer(broker.address, group="fifo-g", topic="orders", listener=check, prefetch=32)
    await late.start()  # another joins
    try:
        await wait_for(check.complete, timeout=90, what="every group consumed")
    finally:
        await late.close()
        await consumers[1].close()
    assert check.violations == []
    assert check.overlaps == 0


async def test_a_fifo_push_consumer_creates_a_fifo_group_and_an_existing_plain_group_refuses(broker):
    async with Producer(broker.address) as p:
        await p.send("plain", b"x")

    async def on(m):
        return ConsumeResult.SUCCESS

    async with PushConsumer(broker.address, group="new-fifo", topic="plain", listener=on, fifo=True):
        pass
    assert admin(broker.http_url, "/api/groups/new-fifo/settings")["fifo"] is True
    async with PushConsumer(broker.address, group="plain-g", topic="plain", listener=on):
        pass
    with pytest.raises(HalfMQError, match="not FIFO"):
        async with PushConsumer(broker.address, group="plain-g", topic="plain", listener=on, fifo=True):
            pass


async def test_fifo_order_holds_across_a_broker_kill9(broker_factory):
    # the leases of the killed broker's deliveries run out after --ack-timeout (in cluster mode
    # the engine's ack wait holds them: the default 60 s would make the test wait that long)
    b = broker_factory("--retry-delays", "50ms", "--ack-timeout", "8s")
    post_json(f"{b.http_url}/api/groups/fifo-k/settings", {"fifo": True})
    await send_groups(b.address, "korders")
    check = OrderChecker(fail_rate=0.03)
    c = PushConsumer(b.address, group="fifo-k", topic="korders", listener=check, prefetch=64)
    await c.start()
    try:
        await wait_for(lambda: sum(check.done.values()) >= GROUPS * PER_GROUP // 2, timeout=60,
                       what="half the messages")
        b.kill9()
        b.start()  # the consumer reconnects by itself
        await wait_for(check.complete, timeout=90, what="every group consumed after the crash")
    finally:
        await c.close()
    assert check.violations == []


async def test_simple_consumer_on_a_fifo_group_gets_one_message_per_group_at_a_time(broker):
    post_json(f"{broker.http_url}/api/groups/fifo-s/settings", {"fifo": True})
    async with Producer(broker.address) as p:
        for k in range(3):
            await p.send("sorders", f"A:{k}", message_group="A")
            await p.send("sorders", f"B:{k}", message_group="B")
    async with SimpleConsumer(broker.address, group="fifo-s", topic="sorders") as c:
        first = await c.receive(max_messages=10, wait=2)
        assert sorted(m.body for m in first) == [b"A:0", b"B:0"]
        assert await c.receive(max_messages=10, wait=0.3) == []
        for m in first:
            await c.ack(m)
        second = await c.receive(max_messages=10, wait=2)
        assert sorted(m.body for m in second) == [b"A:1", b"B:1"]
