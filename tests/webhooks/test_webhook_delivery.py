"""Webhooks against real aiohttp receivers, through an in-process broker: signed requests,
replays refused, failures of every kind retried until the endpoint recovers."""

from __future__ import annotations

import pytest

from consumer_sdk import WebhookVerifier
from producer_sdk import Producer
from protocol.webhooks import sign
from tests.conftest import wait_for
from tests.webhooks.conftest import SECRET, add_webhook, api, delivery
from tests.webhooks.receiver import HANG, closed_port

pytestmark = pytest.mark.timeout(30)


async def test_each_message_is_posted_signed_with_its_metadata(hook_broker, receivers):
    rx = await receivers(secret=SECRET)
    hook = await add_webhook(hook_broker.http_url, "orders-hook", rx.url)
    assert hook["group"] == "webhook:orders-hook" and "secret" not in hook
    async with Producer(hook_broker.address) as p:
        r1 = await p.send("orders", b'{"id": 1}', tags="created", keys=["order-1", "a,b c"],
                          properties={"content-type": "application/json"})
        r2 = await p.send("orders", b"\x00\xffbinary")
    await wait_for(lambda: len(rx.accepted()) == 2, what="two deliveries")
    by_id = {h.headers["halfmq-id"]: h for h in rx.hits}
    h1 = by_id[r1.msg_id]
    assert h1.body == b'{"id": 1}' and h1.headers["Content-Type"] == "application/json"
    assert h1.headers["halfmq-topic"] == "orders" and h1.headers["halfmq-webhook"] == "orders-hook"
    assert h1.headers["halfmq-attempt"] == "1" and h1.headers["halfmq-tags"] == "created"
    ts = int(h1.headers["halfmq-timestamp"])
    # the documented signed string: id "." timestamp "." body, HMAC-SHA256, hex
    assert h1.headers["halfmq-signature"] == "v1=" + sign(SECRET, r1.msg_id, ts, h1.body)
    got = WebhookVerifier(SECRET, clock=lambda: ts / 1000).verify(h1.headers, h1.body)
    assert got.keys == ("order-1", "a,b c") and got.tags == "created" and got.attempt == 1
    assert by_id[r2.msg_id].body == b"\x00\xffbinary"
    assert by_id[r2.msg_id].headers["Content-Type"] == "application/octet-stream"
    rec = await delivery(hook_broker.http_url, "orders-hook", r1.msg_id)
    assert rec["state"] == "delivered" and rec["attempts"] == 1 and rec["last_status"] == 204
    assert rec["delivered_at"] >= rec["first_attempt_at"] > 0


async def test_a_replayed_or_forged_request_is_refused_by_the_receiver(hook_broker, receivers):
    rx = await receivers(secret=SECRET)
    await add_webhook(hook_broker.http_url, "h", rx.url)
    async with Producer(hook_broker.address) as p:
        await p.send("orders", b"pay 20")
    await wait_for(lambda: len(rx.accepted()) == 1, what="the delivery")
    original = rx.hits[0]
    assert await rx.replay(original) == 401
    assert rx.hits[-1].refused == "replayed"
    forged = type(original)(original.at, dict(original.headers), b"pay 2000")
    assert await rx.replay(forged) == 401
    assert rx.hits[-1].refused == "bad_signature"
    # another id with the same signature: the id is signed too
    other = type(original)(original.at, {**original.headers, "halfmq-id": "0" * 24}, original.body)
    assert await rx.replay(other) == 401
    assert rx.hits[-1].refused == "bad_signature"
    assert len(rx.accepted()) == 1


async def test_fails_times_out_500_refused_then_recovers(hook_broker, receivers):
    """Attempt 1: HTTP 503; 2: no answer within the timeout; 3: HTTP 500; 4: connection
    refused (receiver down); 5: the receiver is back and answers 200."""
    script = {0: 503, 1: HANG, 2: 500}
    rx = await receivers(answer=lambda n, hit: script.get(n, 200))
    await add_webhook(hook_broker.http_url, "flaky", rx.url, timeout="300ms", breaker_failures=100)
    async with Producer(hook_broker.address) as p:
        r = await p.send("orders", b"hello")
    http = hook_broker.http_url
    await wait_for(lambda: len(rx.hits) == 3 and rx.hits[2].status == 500, what="three attempts")
    await rx.stop()  # the fourth attempt finds nothing listening
    await wait_for(lambda: _attempts(http, r.msg_id, 4), what="a refused fourth attempt")
    rec = await delivery(http, "flaky", r.msg_id)
    assert rec["state"] == "retrying" and "cannot connect" in rec["last_error"]
    await rx.start()  # the same port
    await wait_for(lambda: len(rx.accepted()) == 1, what="the delivery after recovery")
    assert [h.headers["halfmq-attempt"] for h in rx.hits] == ["1", "2", "3", "5"]
    assert {h.headers["halfmq-id"] for h in rx.hits} == {r.msg_id}
    ts = [int(h.headers["halfmq-timestamp"]) for h in rx.hits]
    assert ts == sorted(ts) and len(set(ts)) == 4  # every attempt signed anew
    rec = await wait_for(lambda: _state(http, r.msg_id, "delivered"), what="the record")
    assert rec["attempts"] == 5 and rec["last_status"] == 200 and rec["last_error"] is None
    status = (await api("GET", f"{http}/api/webhooks/flaky"))["status"]
    assert status["delivered"] == 1 and status["failed"] == 4 and status["breaker"]["state"] == "closed"
    errors = [rec for rec in [rx.hits[0].status, rx.hits[2].status]]
    assert errors == [503, 500]


async def _attempts(http: str, msg_id: str, n: int) -> bool:
    rec = await delivery(http, "flaky", msg_id)
    return rec["attempts"] >= n and rec["state"] != "in_flight"


async def _state(http: str, msg_id: str, state: str):
    rec = await delivery(http, "flaky", msg_id)
    return rec if rec["state"] == state else None


async def test_a_refused_connection_counts_as_a_failure(hook_broker):
    url = f"http://127.0.0.1:{closed_port()}/hook"
    await add_webhook(hook_broker.http_url, "nobody", url, max_attempts=2)
    async with Producer(hook_broker.address) as p:
        r = await p.send("orders", b"x")

    async def dead() -> bool:
        rec = await delivery(hook_broker.http_url, "nobody", r.msg_id)
        return rec["state"] == "dead_lettered"

    await wait_for(dead, what="the message dead-lettered")
    rec = await delivery(hook_broker.http_url, "nobody", r.msg_id)
    assert rec["attempts"] == 2 and rec["last_status"] is None and "cannot connect" in rec["last_error"]


async def test_odd_answers_and_odd_messages_do_no_harm(hook_broker, receivers):
    """A redirect is a failure; a huge answer is cut off (the connection closed, nothing
    kept); a content-type property that is not a clean header value is not sent as one."""
    import time

    from aiohttp import web

    from tests.webhooks.receiver import Hit, Receiver

    class Odd(Receiver):
        async def _handle(self, request: web.Request) -> web.StreamResponse:
            body = await request.read()
            self.hits.append(Hit(time.time(), dict(request.headers), body))
            n = len(self.hits)
            if n == 1:
                raise web.HTTPFound("/elsewhere")
            if n == 2:
                return web.Response(status=200, body=b"x" * (3 << 20))
            return web.Response(status=204)

    rx = Odd()
    await rx.start()
    try:
        http = hook_broker.http_url
        await add_webhook(http, "odd", rx.url, concurrency=1)
        async with Producer(hook_broker.address) as p:
            r1 = await p.send("orders", b"one")
            r2 = await p.send("orders", b"two", properties={"content-type": "text/plain\r\nX-Evil: 1"})

        async def delivered(msg_id: str):
            rec = await delivery(http, "odd", msg_id)
            return rec if rec["state"] == "delivered" else None

        rec1 = await wait_for(lambda: delivered(r1.msg_id), what="the first message")
        rec2 = await wait_for(lambda: delivered(r2.msg_id), what="the second message")
        assert rec1["attempts"] + rec2["attempts"] == 3  # the redirect cost one attempt
        bodies = [(h.body, h.headers["Content-Type"]) for h in rx.hits]
        assert (b"two", "application/octet-stream") in bodies
        assert not any("X-Evil" in h.headers for h in rx.hits)
    finally:
        await rx.stop()

