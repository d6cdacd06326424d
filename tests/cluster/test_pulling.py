"""RECEIVE / SETTLE (pull consumers with an invisible duration) on ``JetStreamEngine``."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest

from protocol.errors import BadRequestError, BrokerUnavailableError, StaleReceiptError
from tests.cluster.sessions import RecordingSession
from tests.cluster.test_engine import _rows, _send
from tests.conftest import wait_for

pytestmark = pytest.mark.timeout(90)


async def _receive(engine, s, group, topic, n=32, invisible=5000, wait=0):
    rid = s.rid()
    engine.receive(s, rid, group=group, topic=topic, tags=None, max_messages=n, invisible_ms=invisible,
                   wait_ms=wait)
    await wait_for(lambda: s.answered(rid), timeout=wait / 1000 + 20, what="receive reply")
    if rid in s.errors:
        raise s.errors[rid]
    return s.replies[rid]["m"]


async def _settle(engine, s, group, items):
    rid = s.rid()
    engine.settle(s, rid, group, items)
    await wait_for(lambda: s.answered(rid), timeout=20, what="settle reply")
    assert rid in s.replies, s.errors.get(rid)
    return s.replies[rid]["r"]


async def test_receive_batches_and_settle_actions(engine_factory, unique):
    engine = await engine_factory(retry_delays=(0.3,), ack_timeout=10.0)  # (a loaded machine)
    p, c = RecordingSession(role="producer"), RecordingSession(role="consumer")
    await _send(engine, p, unique, _rows(*[b"%d" % i for i in range(5)], tags="T"))
    first = await _receive(engine, c, "g", unique, n=3, wait=5000)
    assert len(first) == 3
    second = await _receive(engine, c, "g", unique, n=3, wait=5000)
    assert len(second) == 2
    assert sorted(w[2] for _h, w in first + second) == [b"%d" % i for i in range(5)]
    started = time.monotonic()
    assert await _receive(engine, c, "g", unique, wait=300) == []  # all leased: nothing after the wait
    assert time.monotonic() - started >= 0.25
    (h0, _w0), (h1, w1), (h2, _w2) = first
    assert await _settle(engine, c, "g", [[h0, "ack", 0]]) == [True]
    new_h1, stale0, bad = await _settle(engine, c, "g", [[h1, "cid", 10_000], [h0, "ack", 0],
                                                         [h2, "fly", 0]])
    assert isinstance(new_h1, str) and new_h1 != h1
    assert stale0[0] == StaleReceiptError.code and bad[0] == BadRequestError.code
    assert (await _settle(engine, c, "g", [[h1, "ack", 0]]))[0][0] == StaleReceiptError.code  # changed
    assert await _settle(engine, c, "g", [[h2, "nack", 0], [new_h1, "renew", 10_000]]) == [True, True]
    again = await _receive(engine, c, "g", unique, wait=5000)  # the nacked one, counted
    assert [w[2] for _h, w in again] == [_w2[2]] and again[0][1][10] == 1
    rest = [[h, "ack", 0] for h, _w in second + again] + [[new_h1, "ack", 0]]
    assert await _settle(engine, c, "g", rest) == [True] * len(rest)
    assert w1[2] != _w2[2]
    assert engine.route(unique) == engine.config.default_queues


async def test_long_poll_answers_when_a_message_arrives_and_leases_expire(engine_factory, unique):
    engine = await engine_factory(ack_timeout=10.0)  # the lease's own deadline, not the engine's
    p, c = RecordingSession(role="producer"), RecordingSession(role="consumer")
    await _receive(engine, c, "g", unique, wait=200)  # the group exists from here on
    rid = c.rid()
    engine.receive(c, rid, group="g", topic=unique, tags=None, max_messages=4, invisible_ms=700,
                   wait_ms=15_000)
    await _send(engine, p, unique, _rows(b"late"))
    await wait_for(lambda: c.answered(rid), timeout=10, what="the long poll's answer")
    ((handle, wire),) = c.replies[rid]["m"]
    leased = time.monotonic()
    assert wire[2] == b"late" and wire[10] == 0
    # not settled: the lease runs out after its invisible duration, a failed attempt
    again = await _receive(engine, c, "g", unique, wait=10_000)
    assert time.monotonic() - leased >= 0.65
    assert again[0][1][0] == wire[0] and again[0][1][10] == 1
    assert (await _settle(engine, c, "g", [[handle, "ack", 0]]))[0][0] == StaleReceiptError.code
    assert await _settle(engine, c, "g", [[again[0][0], "ack", 0]]) == [True]


async def test_any_gateway_settles_and_a_stopped_gateways_leases_come_back(engine_factory, unique):
    """Cluster mode difference (README): a lease outlives its gateway only until the
    engine's ack wait (--ack-timeout) runs out, and its handle is then stale."""
    a = await engine_factory()
    b = await engine_factory()
    p, ca, cb = (RecordingSession(role=r) for r in ("producer", "consumer", "consumer"))
    await _send(engine=a, s=p, topic=unique, rows=_rows(b"one", b"two"))
    got = await _receive(a, ca, "g", unique, n=2, invisible=60_000, wait=5000)
    assert len(got) == 2
    assert await _settle(b, cb, "g", [[got[0][0], "ack", 0]]) == [True]  # forwarded to gateway a
    stopped = time.monotonic()
    await a.stop()
    assert (await _settle(b, cb, "g", [[got[1][0], "ack", 0]]))[0][0] == StaleReceiptError.code
    back = await _receive(b, cb, "g", unique, wait=15_000)  # after --ack-timeout (2 s), not 60 s
    assert [w[2] for _h, w in back] == [got[1][1][2]] and back[0][1][10] >= 1
    assert time.monotonic() - stopped < 30
    assert await _settle(b, cb, "g", [[back[0][0], "ack", 0]]) == [True]


async def _lead_consumer(engine, stream: str, consumer: str, node: str) -> None:
    """Move the leadership of ``consumer`` on ``stream`` to ``node`` (a step-down naming it)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            info = await engine.client.api(f"CONSUMER.INFO.{stream}.{consumer}", deadline=2)
            leader = info["cluster"].get("leader")
            if leader == node:
                return
            if leader:
                await engine.client.api(f"CONSUMER.LEADER.STEPDOWN.{stream}.{consumer}",
                                        {"placement": {"preferred": node}}, deadline=2)
        except Exception:  # (no leader for a moment)
            pass
        assert time.monotonic() < deadline, f"{consumer} is not led by {node}"
        await asyncio.sleep(0.2)


async def test_a_settle_the_engine_did_not_confirm_leaves_the_lease_and_its_handle(cluster_factory, engine_factory,
                                                                                  unique):
    """Regression: an ack sent while the pull consumer had no leader (a fail-over) ended the
    lease before the engine confirmed it, so settling the same handle again was refused as
    stale. Here two of the three nodes are paused (no quorum: no ack, dead letter or TERM can
    be confirmed): every settle answers a retriable error and keeps its lease, also through
    another gateway; once the nodes are back, the same handles settle."""
    cluster = await asyncio.to_thread(cluster_factory, 3)
    n1 = cluster.node("n1")
    only_n1 = SimpleNamespace(urls=[n1.url], monitor_urls=[n1.monitor_url])  # (never a paused node)
    a = await engine_factory(cluster=only_n1, ack_timeout=10.0)  # (renewed every 5 s meanwhile)
    b = await engine_factory(cluster=only_n1, ack_timeout=10.0)
    p, ca, cb = (RecordingSession(role=r) for r in ("producer", "consumer", "consumer"))
    await _send(a, p, unique, _rows(b"0", b"1", b"2", b"3"))
    got: list = []
    deadline = time.monotonic() + 30
    while len(got) < 4:  # (a consumer just made may have no leader yet: a receive ends early)
        assert time.monotonic() < deadline, got
        got += await _receive(a, ca, "g", unique, n=4 - len(got), invisible=60_000, wait=5000)
    assert sorted(w[2] for _h, w in got) == [b"0", b"1", b"2", b"3"]
    (h0, _), (h1, _), (h2, w2), (h3, _) = got
    await _receive(a, ca, "d", "%DLQ%g", wait=0)  # (the dead letters' stream and consumer exist)
    for name in ("n2", "n3"):
        cluster.pause(name)
    try:
        here, forwarded = await asyncio.gather(
            _settle(a, ca, "g", [[h0, "ack", 0], [h1, "ack", 0], [h2, "dlq", 0]]),
            _settle(b, cb, "g", [[h3, "ack", 0]]))
        for r in here + forwarded:
            assert r[0] == BrokerUnavailableError.code, r  # not stale, not done
    finally:
        for name in ("n2", "n3"):
            cluster.resume(name)
    pending = {h0: "ack", h1: "ack", h2: "dlq", h3: "ack"}
    deadline = time.monotonic() + 60
    while pending:
        items = [[h, action, 0] for h, action in pending.items()]
        for (h, _action, _ms), r in zip(items, await _settle(b, cb, "g", items), strict=True):
            if r is True:
                del pending[h]
            else:
                assert r[0] == BrokerUnavailableError.code and time.monotonic() < deadline, r
        await asyncio.sleep(0.2)
    dead: list = []  # one copy, however many tries (a receive ends early while there is no leader)
    while not dead and time.monotonic() < deadline:
        dead = await _receive(a, ca, "d", "%DLQ%g", n=4, wait=10_000)
    assert [w[2] for _h, w in dead] == [w2[2]]
    assert await _settle(a, ca, "d", [[dead[0][0], "ack", 0]]) == [True]
    assert await _receive(a, ca, "g", unique, wait=500) == []
