"""Topics and groups, their creation and their limits, on both engines.

Topics an operator creates (``halfmq admin create-topic``, ``POST /api/topics/{topic}``) on
a broker that does not create them on first use (``--no-auto-create-topics``): a send is
refused until the topic exists, then stored and delivered; the topic survives a ``kill
-9``; bad requests get a clear error and create nothing. ``--max-topics`` holds for the
admin API, sends and subscriptions alike; ``--max-groups`` for push and pull consumers,
across a restart."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from consumer_sdk import PushConsumer, SimpleConsumer
from producer_sdk import LimitExceededError, Producer, TopicNotFoundError
from tests.conftest import ROOT, wait_for
from tests.engines import ClusterBroker
from tests.sdk.sdk_helpers import Recorder


def admin(b, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "broker.cli", "admin", "--http", b.http_url, *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=30)


def post(b, path: str, data: bytes, content_type: str = "application/json") -> tuple[int, dict]:
    req = urllib.request.Request(b.http_url + path, data=data, method="POST",
                                 headers={"Content-Type": content_type, "X-HalfMQ-Request": "test"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def topics(b) -> dict[str, int]:
    """Every topic with its number of queues, from the admin API."""
    with urllib.request.urlopen(b.http_url + "/api/topics", timeout=10) as resp:
        return {t["topic"]: len(t["queues"]) for t in json.loads(resp.read())["topics"]}


async def test_a_created_topic_takes_sends_delivers_them_and_survives_kill9(broker_factory):
    b = broker_factory("--no-auto-create-topics", "--default-queues", "3")
    async with Producer(b.address, send_timeout=10) as p:
        with pytest.raises(TopicNotFoundError):
            await p.send("orders", b"too early")
        made = await asyncio.to_thread(admin, b, "create-topic", "orders")
        assert made.returncode == 0, made.stderr
        assert made.stdout.strip() == "topic orders: created, 3 queues"
        again = await asyncio.to_thread(admin, b, "--json", "create-topic", "orders", "--queues", "3")
        assert again.returncode == 0, again.stderr
        assert json.loads(again.stdout) == {"topic": "orders", "queues": 3, "created": False}
        sent = [await p.send("orders", f"m{i}".encode()) for i in range(6)]
    assert {s.queue_id for s in sent} == {0, 1, 2}
    assert topics(b)["orders"] == 3

    b.kill9()
    b.start()
    assert topics(b)["orders"] == 3
    rec = Recorder()
    async with Producer(b.address, send_timeout=10) as p:
        await p.send("orders", b"after the restart")
        async with PushConsumer(b.address, group="g", topic="orders", listener=rec):
            await wait_for(lambda: len(rec.messages) == 7, timeout=20, what="every message delivered")
    assert sorted(rec.bodies()) == sorted([f"m{i}".encode() for i in range(6)] + [b"after the restart"])


async def test_bad_requests_create_nothing(broker_factory):
    b = broker_factory("--no-auto-create-topics", "--default-queues", "2", "--max-topics", "1")
    refusals = [
        ("/api/topics/bad.name", b"{}", "invalid topic"),
        ("/api/topics/%25DLQ%25g", b"{}", "reserved"),
        ("/api/topics/t", b'{"queues": 0}', "from 1 to 1024"),
        ("/api/topics/t", b'{"queues": 1025}', "from 1 to 1024"),
        ("/api/topics/t", b'{"queues": "4"}', "from 1 to 1024"),
        ("/api/topics/t", b'{"queues": true}', "from 1 to 1024"),
        ("/api/topics/t", b'{"queue": 4}', "at most one key, queues"),
        ("/api/topics/t", b"[4]", "at most one key, queues"),
        ("/api/topics/t", b"{not json", "malformed body"),
    ]
    for path, body, what in refusals:
        status, answer = post(b, path, body)
        assert status == 400 and what in answer["error"], (path, body, status, answer)
    assert topics(b) == {}
    cli = await asyncio.to_thread(admin, b, "create-topic", "t", "--queues", "-1")
    assert cli.returncode == 1 and "HTTP 400" in cli.stderr and "from 1 to 1024" in cli.stderr

    assert post(b, "/api/topics/t", b"{}") == (201, {"topic": "t", "queues": 2, "created": True})
    if isinstance(b, ClusterBroker):  # every topic of a cluster has --default-queues queues
        status, answer = post(b, "/api/topics/u", b'{"queues": 5}')
        assert status == 400 and "--default-queues (2)" in answer["error"]
    else:
        status, answer = post(b, "/api/topics/t", b'{"queues": 5}')
        assert status == 409 and "exists with 2 queues" in answer["error"]
    status, answer = post(b, "/api/topics/u", b"{}")
    assert status == 409 and "--max-topics 1" in answer["error"]
    assert topics(b) == {"t": 2}


async def test_max_topics_holds_for_sends_and_subscriptions(broker_factory):
    b = broker_factory("--max-topics", "2")
    async with Producer(b.address, send_timeout=10) as p:
        await p.send("a", b"1")
        await p.send("b", b"2")
        with pytest.raises(LimitExceededError, match="--max-topics 2"):
            await p.send("c", b"3")
        with pytest.raises(LimitExceededError, match="--max-topics 2"):
            async with PushConsumer(b.address, group="g", topic="d", listener=Recorder()):
                pass
        await p.send("a", b"4")  # the topics that exist still take sends
    assert set(topics(b)) == {"a", "b"}


async def test_max_groups_holds_for_push_and_pull_consumers_across_a_restart(broker_factory):
    b = broker_factory("--max-groups", "2")
    ok = Recorder()
    async with Producer(b.address, send_timeout=10) as p:
        await p.send("a", b"one")
    async with PushConsumer(b.address, group="g1", topic="a", listener=ok):
        await wait_for(lambda: ok.messages, what="g1's message")
    async with SimpleConsumer(b.address, group="g2", topic="a") as c:
        taken = await c.receive(max_messages=1, wait=5)
        assert [m.body for m in taken] == [b"one"]
        await c.ack(taken[0])
    with pytest.raises(LimitExceededError, match="--max-groups 2"):
        async with PushConsumer(b.address, group="g3", topic="a", listener=ok):
            pass
    with pytest.raises(LimitExceededError, match="--max-groups 2"):
        async with SimpleConsumer(b.address, group="g3", topic="a") as c:
            await c.receive(max_messages=1, wait=0.1)
    async with PushConsumer(b.address, group="g1", topic="b", listener=ok):  # a group that exists
        pass

    b.kill9()
    b.start()
    with pytest.raises(LimitExceededError, match="--max-groups 2"):
        async with PushConsumer(b.address, group="g4", topic="a", listener=ok):
            pass
    async with PushConsumer(b.address, group="g2", topic="a", listener=ok):
        pass
