"""After ``kill -9`` only deliveries that were in flight come again (durable acks, C8).

Each test runs a real broker process, acks through the public SDK, kills the broker with
SIGKILL and restarts it on the same data directory. One queue per topic keeps the order
of a queue, so a message consumed after a *sentinel* sent after the restart proves that
nothing before it is still to be redelivered.

On both engines (``tests.engines``): in cluster mode the kill -9 and restart are of both
gateways (the acks, retry records and leases are the engine's); that variant runs under
``-m slow`` (``slow_cluster_broker_factory``).
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request

from consumer_sdk import ConsumeResult, PushConsumer
from producer_sdk import Producer
from tests.conftest import wait_for
from tests.engines import slow_cluster_broker_factory

__all__ = ["slow_cluster_broker_factory"]

ONE_QUEUE = ("--default-queues", "1")


def admin(http_url: str, path: str):
    """GET an admin API route (blocking: fine for a test's few calls)."""
    with urllib.request.urlopen(f"{http_url}{path}", timeout=10) as resp:
        return json.loads(resp.read())


def group_settled(http_url: str, group: str) -> bool:
    """True when the group has nothing in flight and no retry entry it has not stepped over."""
    groups = {g["group"]: g for g in admin(http_url, "/api/groups")["groups"]}
    g = groups.get(group)
    # (cluster mode has no waiting_retry: a message waiting for its retry is in flight there)
    return g is not None and g["in_flight"] == 0 and g.get("waiting_retry", 0) == 0


async def drain_until_sentinel(address: str, group: str, topic: str, *, prefetch: int = 64) -> list:
    """Send a sentinel, consume ``group`` until it arrives; return every message before it."""
    async with Producer(address) as p:
        await p.send(topic, b"sentinel")
    seen: list = []
    done = asyncio.Event()

    async def on(m):
        if m.body == b"sentinel":
            done.set()
        else:
            seen.append(m)
        return ConsumeResult.SUCCESS

    async with PushConsumer(address, group=group, topic=topic, listener=on, prefetch=prefetch):
        await asyncio.wait_for(done.wait(), 20)
    return seen


async def test_confirmed_acks_survive_kill9_right_after(broker_factory):
    """Finding 3 of issue 11: 200 acked, kill -9 at once (no offset checkpoint yet) -> none
    redelivered, after each of three restarts."""
    b = broker_factory(*ONE_QUEUE)
    async with Producer(b.address) as p:
        await p.send_batch("acked", [f"m{i}" for i in range(200)])
    got: list = []

    async def on(m):
        got.append(m.msg_id)
        return ConsumeResult.SUCCESS

    async with PushConsumer(b.address, group="g", topic="acked", listener=on):
        await wait_for(lambda: len(got) >= 200, what="200 deliveries")
    # close() ended with a barrier: the broker confirmed every ack; kill at once
    b.kill9()
    for _ in range(3):
        b.start()
        again = await drain_until_sentinel(b.address, "g", "acked")
        assert again == [], f"{len(again)} acked messages delivered again after kill -9"
        b.kill9()


async def test_duplicates_after_a_crash_stay_within_the_in_flight_window(broker_factory):
    """A consumer acking a stream while the broker is killed: what comes again after the
    restart is at most what was leased or whose ack was not yet confirmed, and everything
    the listener had not seen comes (in cluster mode what the killed gateway held leased
    comes back after the sentinel, once its lease, ``--ack-timeout``, has run out)."""
    b = broker_factory(*ONE_QUEUE, "--ack-timeout", "2s")
    n, prefetch = 3000, 32
    sent: set[str] = set()
    async with Producer(b.address) as p:
        for k in range(0, n, 500):
            sent |= {r.msg_id for r in await p.send_batch("window", [f"m{i}" for i in range(k, k + 500)])}
    first: set[str] = set()

    async def on(m):
        first.add(m.msg_id)
        await asyncio.sleep(0)
        return ConsumeResult.SUCCESS

    c = PushConsumer(b.address, group="g", topic="window", listener=on, prefetch=prefetch, concurrency=8)
    await c.start()
    try:
        await wait_for(lambda: len(first) >= n // 2, what="half the stream consumed")
        b.kill9()
    finally:
        await c.close()
    b.start()
    again = await drain_until_sentinel(b.address, "g", "window")
    dup = {m.msg_id for m in again} & first
    # leased (prefetch) plus acks sent but not yet durable (at most one more window)
    assert len(dup) <= 2 * prefetch, f"{len(dup)} duplicates after the crash (prefetch {prefetch})"
    assert len(sent) == n
    missing = sent - first - {m.msg_id for m in again}
    if missing:  # nothing lost: what the listener never saw comes
        later: set[str] = set()

        async def on_later(m):
            later.add(m.msg_id)
            return ConsumeResult.SUCCESS

        async with PushConsumer(b.address, group="g", topic="window", listener=on_later):
            await wait_for(lambda: missing <= later, timeout=20,
                           what=f"the {len(missing)} messages leased before the crash")


async def test_only_the_newest_retry_record_is_replayed(broker_factory):
    """Finding 4 of issue 11: a message failed at reconsume_times 0 and 1 and succeeded at 2;
    after kill -9 no member gets it again (and never with reconsume_times going back)."""
    b = broker_factory(*ONE_QUEUE, "--retry-delays", "100ms,100ms,100ms")
    async with Producer(b.address) as p:
        msg_id = (await p.send("retry", b"x")).msg_id
    attempts: list[int] = []

    async def fail_twice(m):
        attempts.append(m.reconsume_times)
        return ConsumeResult.SUCCESS if m.reconsume_times >= 2 else ConsumeResult.RECONSUME_LATER

    async with PushConsumer(b.address, group="g", topic="retry", listener=fail_twice, prefetch=1):
        await wait_for(lambda: 2 in attempts, what="the third delivery")
    assert attempts == [0, 1, 2]
    b.kill9()
    b.start()
    seen: list = []

    async def record(m):
        seen.append((m.msg_id, m.reconsume_times))
        return ConsumeResult.SUCCESS

    async with Producer(b.address) as p:
        await p.send("retry", b"sentinel")
    async with PushConsumer(b.address, group="g", topic="retry", listener=record, prefetch=1), \
            PushConsumer(b.address, group="g", topic="retry", listener=record, prefetch=1):
        await wait_for(lambda: any(mid != msg_id for mid, _ in seen), what="the sentinel")
        # every retry entry is due after 100 ms: once none is left, none can come later
        await wait_for(lambda: group_settled(b.http_url, "g"), what="the retry queues stepped over")
    assert [s for s in seen if s[0] == msg_id] == []


async def test_a_pending_retry_is_delivered_once_after_a_crash(broker_factory):
    """A message failed twice and waits for its third delivery at the crash: after the
    restart it comes exactly once, with reconsume_times 2."""
    b = broker_factory(*ONE_QUEUE, "--retry-delays", "100ms,100ms,3s")
    async with Producer(b.address) as p:
        msg_id = (await p.send("pending", b"x")).msg_id
    attempts: list[int] = []

    async def fail(m):
        attempts.append(m.reconsume_times)
        return ConsumeResult.RECONSUME_LATER

    async with PushConsumer(b.address, group="g", topic="pending", listener=fail, prefetch=1):
        await wait_for(lambda: 1 in attempts, what="the second delivery")
    assert attempts == [0, 1]
    b.kill9()
    b.start()
    seen: list[int] = []

    async def record(m):
        if m.msg_id == msg_id:
            seen.append(m.reconsume_times)
        return ConsumeResult.SUCCESS

    async with PushConsumer(b.address, group="g", topic="pending", listener=record, prefetch=1), \
            PushConsumer(b.address, group="g", topic="pending", listener=record, prefetch=1):
        await wait_for(lambda: seen, timeout=15, what="the pending retry")
        await wait_for(lambda: group_settled(b.http_url, "g"), what="the retry queues stepped over")
    assert seen == [2]


async def test_admin_message_shows_queue_and_offset_of_a_plain_message(broker):
    """Finding 5 of issue 11: ``GET /api/messages/{id}`` gave queue_id/queue_offset -1."""
    async with Producer(broker.address) as p:
        for i in range(7):
            await p.send("where", f"m{i}".encode())
        r = await p.send("where", b"this one")
    body = admin(broker.http_url, f"/api/messages/{r.msg_id}")
    assert (body["queue_id"], body["queue_offset"]) == (r.queue_id, r.queue_offset)


async def test_admin_lists_are_paginated_and_bounded(broker):
    async with Producer(broker.address) as p:
        for i in range(5):
            await p.send(f"page{i}", b"m", keys=["k"])
        for _ in range(3):
            await p.send("page0", b"m", keys=["k"])
    first = admin(broker.http_url, "/api/topics?limit=2")
    assert [t["topic"] for t in first["topics"]] == ["page0", "page1"] and first["next"] == "page1"
    rest = admin(broker.http_url, f"/api/topics?limit=1000&after={first['next']}")
    assert [t["topic"] for t in rest["topics"]] == ["page2", "page3", "page4"] and rest["next"] is None
    found = admin(broker.http_url, "/api/messages?topic=page0&key=k&limit=3")
    assert len(found["messages"]) == 3 and found["next"] is not None
    tail = admin(broker.http_url, f"/api/messages?topic=page0&key=k&after={found['next']}")
    assert len(tail["messages"]) == 1 and tail["next"] is None
    for bad in ("limit=0", "limit=1001", "limit=x"):
        try:
            admin(broker.http_url, f"/api/groups?{bad}")
        except urllib.error.HTTPError as exc:
            assert exc.code == 400
        else:
            raise AssertionError(f"{bad} was accepted")
