"""The example receiver (``python -m examples.webhook_receiver``) as its own process, fed
by a broker webhook: every message stored once, forged and replayed requests refused."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import aiohttp
import pytest

from producer_sdk import Producer
from protocol.webhooks import signature_header
from tests.conftest import ROOT, wait_for
from tests.webhooks.conftest import SECRET, add_webhook

pytestmark = pytest.mark.timeout(40)


@pytest.fixture
def example_receiver(tmp_path, hook_broker):
    cmd = [sys.executable, "-m", "examples.webhook_receiver", "--port", "0", "--secret", SECRET,
           "--db", str(tmp_path / "events.db"), "--broker-http", hook_broker.http_url, "--webhook", "ex"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    try:
        yield json.loads(line)["ready"]
    finally:
        proc.terminate()
        proc.wait(10)
        proc.stdout.close()


async def _get(url: str):
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        return await r.json()


async def test_the_example_receiver_stores_each_message_once(hook_broker, example_receiver):
    url = example_receiver
    base = url.rsplit("/", 1)[0]
    await add_webhook(hook_broker.http_url, "ex", url)
    async with Producer(hook_broker.address) as p:
        sent = [await p.send("orders", f"order {i}".encode()) for i in range(3)]
    await wait_for(lambda: _stored(base, 3), what="three events stored")
    first = sent[0].msg_id
    async with aiohttp.ClientSession() as s:
        # what a retry of a message already applied looks like: same id, new timestamp
        ts = int(time.time() * 1000)
        headers = {"halfmq-id": first, "halfmq-timestamp": str(ts),
                   "halfmq-signature": signature_header([SECRET], first, ts, b"order 0")}
        async with s.post(url, data=b"order 0", headers=headers) as r:
            assert r.status == 204
        async with s.post(url, data=b"order 0", headers=headers) as r:  # the same request again
            assert r.status == 401 and "already accepted" in await r.text()
        forged = {**headers, "halfmq-timestamp": str(ts + 1)}
        async with s.post(url, data=b"order 0", headers=forged) as r:
            assert r.status == 401
    events = await _get(f"{base}/events")
    assert sorted(e["body"] for e in events) == ["order 0", "order 1", "order 2"]
    # the receiving side asks the broker what became of the messages it expected
    missed = await _get(f"{base}/missed?ids={first}")
    assert missed[first]["state"] == "delivered" and missed[first]["delivered_at"] > 0


async def _stored(base: str, n: int) -> bool:
    return len(await _get(f"{base}/events")) == n
