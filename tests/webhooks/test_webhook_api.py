"""Defining webhooks: bad definitions refused with nothing stored, definitions and delivery
records kept across a restart, secrets rotated without refusing a request."""

from __future__ import annotations

import pytest

from broker import Broker
from consumer_sdk import WebhookVerifier
from producer_sdk import Producer
from tests.conftest import wait_for
from tests.webhooks.conftest import SECRET, add_webhook, api, delivery

pytestmark = pytest.mark.timeout(30)

GOOD = {"name": "ok", "topic": "orders", "url": "http://127.0.0.1:9/hook", "secret": SECRET}

BAD = [
    ({**GOOD, "name": "a b"}, "invalid webhook name"),
    ({**GOOD, "name": None}, "invalid webhook name"),
    ({**GOOD, "topic": "%DLQ%x"}, "reserved"),
    ({**GOOD, "url": "ftp://example.com/x"}, "http:// or https://"),
    ({**GOOD, "url": "http:///nohost"}, "with a host"),
    ({**GOOD, "url": "http://h:99999/"}, "malformed"),
    ({**GOOD, "url": "http://h/ x"}, "http:// or https://"),
    ({**GOOD, "secret": "short"}, "secret must be"),
    ({**GOOD, "secret": 12345678901234567}, "secret must be"),
    ({**GOOD, "timeout": "abc"}, "timeout"),
    ({**GOOD, "timeout": "10s"}, "shorter than the broker's --ack-timeout"),
    ({**GOOD, "concurrency": 0}, "concurrency must be"),
    ({**GOOD, "concurrency": 10_000}, "concurrency must be"),
    ({**GOOD, "max_attempts": 0}, "max_attempts must be"),
    ({**GOOD, "max_attempts": True}, "max_attempts must be"),
    ({**GOOD, "start": "middle"}, "start must be"),
    ({**GOOD, "tags": ["A"]}, "tags must be"),
    ({**GOOD, "breaker_cooldown": -1}, "breaker_cooldown"),
    ({**GOOD, "colour": "red"}, "unknown field"),
    (["not", "an", "object"], "JSON object"),
]


@pytest.mark.parametrize("body,message", BAD, ids=[m for _b, m in BAD])
async def test_a_bad_definition_is_refused_and_nothing_is_stored(hook_broker, body, message):
    http = hook_broker.http_url
    status, data = await api("POST", f"{http}/api/webhooks", body, expect=None)
    assert status == 400 and message in data["error"], data
    assert (await api("GET", f"{http}/api/webhooks"))["webhooks"] == []
    assert await hook_broker.engine.settings_items("webhooks/") == {}
    assert not [g for g in (await api("GET", f"{http}/api/groups"))["groups"] if g["group"].startswith("webhook:")]


async def test_malformed_requests_and_unknown_names(hook_broker):
    import aiohttp

    http = hook_broker.http_url
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{http}/api/webhooks", data=b"{not json", headers={"X-HalfMQ-Request": "test"}) as r:
            assert r.status == 400 and "JSON" in (await r.json())["error"]
    await add_webhook(http, "dup", "http://127.0.0.1:9/")
    status, data = await api("POST", f"{http}/api/webhooks", {**GOOD, "name": "dup"}, expect=None)
    assert status == 409 and "exists" in data["error"]
    for method, path in (("GET", "/api/webhooks/nope"), ("DELETE", "/api/webhooks/nope"),
                         ("POST", "/api/webhooks/nope/rotate"),
                         ("GET", "/api/webhooks/nope/messages/00000000000000000000000A"),
                         ("GET", "/api/webhooks/dup/messages/00000000000000000000000A"),
                         ("GET", "/api/webhooks/dup/messages/garbage")):
        status, data = await api(method, f"{http}{path}", {} if method == "POST" else None, expect=None)
        assert status == 404, (method, path, data)
    status, data = await api("POST", f"{http}/api/webhooks/dup/rotate", {"secret": "x"}, expect=None)
    assert status == 400 and "secret must be" in data["error"]
    status, data = await api("POST", f"{http}/api/webhooks/dup/rotate", {"overlap": "soon"}, expect=None)
    assert status == 400


async def test_a_generated_secret_is_shown_once(hook_broker):
    http = hook_broker.http_url
    body = {k: v for k, v in GOOD.items() if k != "secret"}
    out = await api("POST", f"{http}/api/webhooks", body, expect=201)
    assert len(out["secret"]) >= 32
    assert "secret" not in await api("GET", f"{http}/api/webhooks/ok")
    assert "secret" not in (await api("GET", f"{http}/api/webhooks"))["webhooks"][0]


async def test_definitions_and_delivery_records_survive_a_restart(hook_config, receivers):
    rx = await receivers()
    async with Broker(hook_config) as b:
        await add_webhook(b.http_url, "keep", rx.url, concurrency=3, max_attempts=4)
        async with Producer(b.address) as p:
            first = await p.send("orders", b"before the restart")
        await wait_for(lambda: len(rx.accepted()) == 1, what="the first delivery")
        await wait_for(lambda: _delivered(b.http_url, first.msg_id), what="its record")
    async with Broker(hook_config) as b:
        hooks = (await api("GET", f"{b.http_url}/api/webhooks"))["webhooks"]
        assert [(h["name"], h["concurrency"], h["max_attempts"], h["status"]["subscribed"]) for h in hooks] == [
            ("keep", 3, 4, True)]
        rec = await delivery(b.http_url, "keep", first.msg_id)
        assert rec["state"] == "delivered" and rec["attempts"] == 1 and rec["source"] == "record"
        async with Producer(b.address) as p:
            await p.send("orders", b"after the restart")
        await wait_for(lambda: len(rx.accepted()) == 2, what="a delivery after the restart")
        assert [h.body for h in rx.hits] == [b"before the restart", b"after the restart"]
        await api("DELETE", f"{b.http_url}/api/webhooks/keep")
        assert await b.engine.settings_items("webhook") == {}
    async with Broker(hook_config) as b:
        assert (await api("GET", f"{b.http_url}/api/webhooks"))["webhooks"] == []


async def _delivered(http: str, msg_id: str) -> bool:
    return (await delivery(http, "keep", msg_id))["state"] == "delivered"


async def test_a_secret_is_rotated_without_refusing_a_request(hook_broker, receivers):
    new_secret = "n3w-s3cret-n3w-s3cret"
    rx = await receivers(secret=SECRET)  # the receiver still knows only the old secret
    http = hook_broker.http_url
    await add_webhook(http, "rot", rx.url)
    out = await api("POST", f"{http}/api/webhooks/rot/rotate", {"secret": new_secret, "overlap": "1h"})
    assert out["signing_secrets"] == 2
    async with Producer(hook_broker.address) as p:
        await p.send("orders", b"during the overlap")
        await wait_for(lambda: len(rx.accepted()) == 1, what="accepted with the old secret")
        hit = rx.hits[0]
        assert hit.headers["halfmq-signature"].count("v1=") == 2
        ts = int(hit.headers["halfmq-timestamp"]) / 1000
        WebhookVerifier(new_secret, clock=lambda: ts).verify(hit.headers, hit.body)  # and with the new one
        # the receiver switches; the old secret stops signing
        rx.verifier = WebhookVerifier([new_secret])
        out = await api("POST", f"{http}/api/webhooks/rot/rotate", {"secret": new_secret + "2", "overlap": 0})
        assert out["signing_secrets"] == 1
        rx.verifier = WebhookVerifier([new_secret + "2"])
        await p.send("orders", b"after")
        await wait_for(lambda: len(rx.accepted()) == 2, what="accepted with the newest secret")
        assert rx.accepted()[1].headers["halfmq-signature"].count("v1=") == 1
    assert not [h for h in rx.hits if h.refused]
