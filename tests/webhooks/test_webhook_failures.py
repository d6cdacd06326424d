"""What a failing endpoint does to a webhook and to the others: DLQ and resend, the
circuit breaker, isolation between endpoints."""

from __future__ import annotations

import logging

import pytest

from consumer_sdk import ConsumeResult, PushConsumer
from producer_sdk import Producer
from tests.conftest import wait_for
from tests.webhooks.conftest import add_webhook, api, delivery
from tests.webhooks.receiver import HANG

pytestmark = pytest.mark.timeout(40)


async def test_dead_lettered_after_max_attempts_then_resent_with_the_dlq_route(hook_broker, receivers):
    failing = True
    rx = await receivers(answer=lambda n, hit: 500 if failing else 200)
    http = hook_broker.http_url
    await add_webhook(http, "dlq-hook", rx.url, max_attempts=3)
    async with Producer(hook_broker.address) as p:
        r = await p.send("orders", b"to the DLQ", keys=["k-1"])

    async def state(want: str):
        rec = await delivery(http, "dlq-hook", r.msg_id)
        return rec if rec["state"] == want else None

    rec = await wait_for(lambda: state("dead_lettered"), what="the dead letter")
    assert rec["attempts"] == 3 and rec["last_status"] == 500
    assert [h.headers["halfmq-attempt"] for h in rx.hits] == ["1", "2", "3"]

    async def dlq_size() -> int:
        topics = {t["topic"]: t["messages"] for t in (await api("GET", f"{http}/api/topics"))["topics"]}
        return topics.get("%DLQ%webhook:dlq-hook", 0)

    # (the record says so once the last attempt failed; the DLQ has it once it is stored)
    assert await wait_for(dlq_size, what="the DLQ record stored") == 1
    groups = {g["group"]: g for g in (await api("GET", f"{http}/api/groups"))["groups"]}
    assert groups["webhook:dlq-hook"]["dead_lettered"] == 1
    # the webhook's DLQ can be consumed like any DLQ
    seen: list = []

    async def on_dead(m):
        seen.append(m)
        return ConsumeResult.SUCCESS

    async with PushConsumer(hook_broker.address, group="dlq-reader", topic="%DLQ%webhook:dlq-hook",
                            listener=on_dead):
        await wait_for(lambda: seen, what="the dead letter consumed")
    assert seen[0].msg_id == r.msg_id and seen[0].properties["ORIGIN_TOPIC"] == "orders"
    # the endpoint is fixed; the existing resend route sends it again, to this webhook only
    failing = False
    out = await api("POST", f"{http}/api/dlq/webhook:dlq-hook/messages/{r.msg_id}/resend")
    assert out == {"resent": r.msg_id, "group": "webhook:dlq-hook"}
    rec = await wait_for(lambda: state("delivered"), what="the resent message delivered")
    assert rec["attempts"] == 4 and rec["last_status"] == 200
    assert len(rx.accepted()) == 1 and rx.accepted()[0].headers["halfmq-attempt"] == "4"


async def test_the_circuit_breaker_opens_probes_and_closes(hook_broker, receivers, caplog):
    caplog.set_level(logging.INFO, logger="halfmq.webhooks")
    healthy = False
    rx = await receivers(answer=lambda n, hit: 204 if healthy else 500)
    http = hook_broker.http_url
    cooldown = 0.6
    await add_webhook(http, "cb", rx.url, breaker_failures=3, breaker_cooldown=f"{cooldown}s", max_attempts=50)
    async with Producer(hook_broker.address) as p:
        ids = [(await p.send("orders", f"m{i}".encode())).msg_id for i in range(5)]

    async def breaker(times_opened: int):
        b = (await api("GET", f"{http}/api/webhooks/cb"))["status"]["breaker"]
        return b if b["times_opened"] >= times_opened and b["state"] == "open" else None

    def started(h) -> int:  # when the broker started that request (ms; the signed timestamp)
        return int(h.headers["halfmq-timestamp"])

    first = await wait_for(lambda: breaker(1), what="the breaker open")
    opened1 = first["opened_at"] / 1000 + 0.001  # (ms in the API: the end of that ms)
    second = await wait_for(lambda: breaker(2), what="the probe failed, open again")
    opened2 = second["opened_at"] / 1000 + 0.001
    # while open, only the probe was started, and not before the cool-down; requests admitted
    # before the breaker opened may still arrive after it (they were on their way)
    after_open = [h for h in rx.hits if started(h) > first["opened_at"] and h.at <= opened2]
    assert len(after_open) == 1 and after_open[0].at >= opened1 + cooldown - 0.05, rx.hits
    healthy = True
    await wait_for(lambda: {h.headers["halfmq-id"] for h in rx.accepted()} == set(ids), what="all delivered")
    after_second = sorted(h.at for h in rx.hits if h.at > opened2)
    assert after_second[0] >= opened2 + cooldown - 0.05  # the probe, then the rest
    b = (await api("GET", f"{http}/api/webhooks/cb"))["status"]["breaker"]
    assert b["state"] == "closed" and b["consecutive_failures"] == 0
    text = caplog.text
    assert "circuit breaker open after 3 consecutive failures" in text
    assert "circuit breaker closed" in text
    assert text.count("webhook cb failing") == 1  # not one line per failure


async def test_a_hanging_endpoint_does_not_stall_another_webhook(hook_broker, receivers):
    stuck = await receivers(answer=lambda n, hit: HANG)
    fast = await receivers()
    http = hook_broker.http_url
    await add_webhook(http, "stuck", stuck.url, timeout="8s", concurrency=2)
    await add_webhook(http, "fast", fast.url)
    async with Producer(hook_broker.address) as p:
        await p.send_batch("orders", [f"m{i}".encode() for i in range(40)])
    await wait_for(lambda: len(fast.accepted()) == 40, timeout=7, what="the healthy webhook's deliveries")
    status = (await api("GET", f"{http}/api/webhooks/stuck"))["status"]
    # the stuck one still waits on its first two requests (its concurrency), nothing more
    assert status["in_flight"] == 2 and status["failed"] == 0 and len(stuck.hits) == 2


async def test_tags_and_start_position(hook_broker, receivers):
    rx_new = await receivers()
    rx_all = await receivers()
    http = hook_broker.http_url
    async with Producer(hook_broker.address) as p:
        before = await p.send("orders", b"before", tags="A")
        await add_webhook(http, "new-a-b", rx_new.url, tags="A || B")
        await add_webhook(http, "all-c", rx_all.url, tags="C", start="earliest")
        await p.send("orders", b"a", tags="A")
        c = await p.send("orders", b"c", tags="C")
        await p.send("orders", b"b", tags="B")
        # sentinels: one queue, read in order, so once they arrive every earlier message
        # was either delivered or filtered out
        await p.send("orders", b"end", tags="A")
        await p.send("orders", b"end", tags="C")
    await wait_for(lambda: len(rx_new.accepted()) == 3 and len(rx_all.accepted()) == 2, what="deliveries")
    assert sorted(h.body for h in rx_new.hits) == [b"a", b"b", b"end"]
    assert sorted(h.body for h in rx_all.hits) == [b"c", b"end"]
    # a message the webhook never had to deliver is said so, from the broker's own view
    assert (await delivery(http, "new-a-b", before.msg_id))["state"] == "before_this_webhook"
    assert (await delivery(http, "new-a-b", c.msg_id))["state"] == "not_for_this_webhook"


async def test_removing_a_webhook_whose_endpoint_hangs_takes_at_most_the_stop_grace(hook_broker, receivers):
    import time

    from broker.webhooks.endpoint import STOP_GRACE

    stuck = await receivers(answer=lambda n, hit: HANG)
    http = hook_broker.http_url
    await add_webhook(http, "gone", stuck.url, timeout="8s")
    async with Producer(hook_broker.address) as p:
        await p.send("orders", b"never answered")
    await wait_for(lambda: stuck.hits, what="the request under way")
    t0 = time.monotonic()
    assert await api("DELETE", f"{http}/api/webhooks/gone") == {"removed": "gone"}
    assert time.monotonic() - t0 < STOP_GRACE + 1.5
    assert (await api("GET", f"{http}/api/webhooks"))["webhooks"] == []
    # the group stays, like any group: its progress, and the message still to deliver
    groups = {g["group"]: g for g in (await api("GET", f"{http}/api/groups"))["groups"]}
    assert groups["webhook:gone"]["members"] == 0


async def test_a_fifo_webhook_keeps_each_message_group_in_order_through_failures(hook_broker, receivers):
    fails = {"a0": 2}  # the first message of group a fails twice

    def answer(n, hit):
        left = fails.get(hit.body.decode(), 0)
        if left:
            fails[hit.body.decode()] = left - 1
            return 503
        return 204

    rx = await receivers(answer=answer)
    http = hook_broker.http_url
    hook = await add_webhook(http, "ordered", rx.url, fifo=True, concurrency=4, breaker_failures=100)
    assert hook["fifo"] is True
    async with Producer(hook_broker.address) as p:
        for i in range(3):
            for g in ("a", "b"):
                await p.send("orders", f"{g}{i}".encode(), message_group=g)
    await wait_for(lambda: len(rx.accepted()) == 6, what="all six delivered")
    seen = [h.body.decode() for h in rx.hits]
    assert [b for b in seen if b.startswith("a")] == ["a0", "a0", "a0", "a1", "a2"]  # nothing overtook a0
    assert [b for b in seen if b.startswith("b")] == ["b0", "b1", "b2"]
    # group b was not held by a's retries
    assert seen.index("b2") < len(seen) - 3
    settings = await hook_broker.engine.admin_group_settings("webhook:ordered")
    assert settings["fifo"] is True
