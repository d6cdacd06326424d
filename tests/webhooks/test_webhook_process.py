"""Webhooks of a broker process: a restart (kill -9 or SIGTERM) while a message waits for
its retry, and the ``halfmq webhook`` command."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest

from producer_sdk import Producer
from tests.conftest import ROOT, wait_for
from tests.webhooks.conftest import add_webhook, api, delivery
from tests.webhooks.receiver import closed_port

pytestmark = pytest.mark.timeout(60)


async def _group_state(http: str, msg_id: str, group: str) -> str | None:
    view = await api("GET", f"{http}/api/messages/{msg_id}")
    return view["groups"].get(group, {}).get("state")


@pytest.mark.parametrize("how", ["kill9", "sigterm"])
async def test_a_restart_mid_retry_delivers_the_message_after(broker_factory, receivers, how):
    b = broker_factory("--retry-delays", "1500ms", "--ack-timeout", "10s", "--default-queues", "1")
    healthy = False
    rx = await receivers(answer=lambda n, hit: 204 if healthy else 500)
    await add_webhook(b.http_url, "crash", rx.url, breaker_failures=100)
    async with Producer(b.address) as p:
        r = await p.send("orders", b"survive the crash")

    async def retrying() -> bool:
        return await _group_state(b.http_url, r.msg_id, "webhook:crash") == "retrying"

    await wait_for(retrying, what="the first attempt failed and its retry stored")
    assert len(rx.hits) == 1
    await asyncio.to_thread(b.kill9 if how == "kill9" else b.stop)
    healthy = True
    await asyncio.to_thread(b.start)
    await wait_for(lambda: len(rx.accepted()) == 1, timeout=20, what="the delivery after the restart")
    assert [h.headers["halfmq-id"] for h in rx.hits] == [r.msg_id, r.msg_id]
    assert rx.hits[1].headers["halfmq-attempt"] == "2"  # the broker's count survived
    # after the retry delay, not at once
    assert rx.hits[1].at - rx.hits[0].at >= 1.4

    async def delivered():
        rec = await delivery(b.http_url, "crash", r.msg_id)
        return rec if rec["state"] == "delivered" else None

    rec = await wait_for(delivered, what="the delivery record")
    assert rec["attempts"] == 2 and rec["last_status"] == 204
    hooks = (await api("GET", f"{b.http_url}/api/webhooks"))["webhooks"]
    assert [h["name"] for h in hooks] == ["crash"] and hooks[0]["status"]["subscribed"]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "broker.cli", "webhook", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=30)


async def test_the_webhook_command(broker, receivers, capsys):
    http = broker.http_url
    rx = await receivers()

    async def run(*args: str) -> tuple[int, str, str]:
        """``halfmq webhook ARGS --http URL`` in this process (the console script's code)."""
        from broker.webhooks.cli import webhook_main

        code = await asyncio.to_thread(webhook_main, [*args, "--http", http])
        out, err = capsys.readouterr()
        return code, out, err

    # once as its own process, through the ``halfmq`` entry point
    add = await asyncio.to_thread(_cli, "add", "cli-hook", "--topic", "orders", "--url", rx.url,
                                  "--max-attempts", "3", "--timeout", "1500ms", "--concurrency", "2",
                                  "--http", http)
    assert add.returncode == 0, add.stderr
    out = json.loads(add.stdout)
    secret = out["secret"]
    assert out["group"] == "webhook:cli-hook" and out["max_attempts"] == 3 and out["timeout"] == 1.5
    assert "shown this once" in add.stderr
    from consumer_sdk import WebhookVerifier

    rx.verifier = WebhookVerifier(secret)
    async with Producer(broker.address) as p:
        r = await p.send("orders", b"via the CLI")
    await wait_for(lambda: len(rx.accepted()) == 1, what="the delivery")
    code, out, _ = await run("list")
    listed = json.loads(out)["webhooks"]
    assert code == 0 and [h["name"] for h in listed] == ["cli-hook"] and "secret" not in listed[0]

    async def delivered() -> bool:
        return (await delivery(http, "cli-hook", r.msg_id))["state"] == "delivered"

    await wait_for(delivered, what="delivered")
    code, out, _ = await run("delivery", "cli-hook", r.msg_id)
    assert code == 0 and json.loads(out)["attempts"] == 1
    code, out, _ = await run("rotate", "cli-hook", "--overlap", "0")
    assert code == 0 and json.loads(out)["signing_secrets"] == 1
    code, _, err = await run("add", "cli-hook", "--topic", "orders", "--url", rx.url, "--timeout", "1s")
    assert code == 1 and "HTTP 409" in err and "exists" in err
    code, _, err = await run("add", "x", "--topic", "orders", "--url", "ftp://x")
    assert code == 1 and "HTTP 400" in err and "http:// or https://" in err
    code, _, err = await run("resend", "cli-hook", r.msg_id)
    assert code == 1 and "HTTP 404" in err and "%DLQ%webhook:cli-hook" in err
    code, out, _ = await run("remove", "cli-hook")
    assert code == 0 and json.loads(out) == {"removed": "cli-hook"}
    code, _, err = await run("show", "cli-hook")
    assert code == 1 and "HTTP 404" in err
    http = f"http://127.0.0.1:{closed_port()}"  # run() calls this URL from now on: nobody there
    code, _, err = await run("list")
    assert code == 1 and "cannot reach" in err
