"""ACK of push deliveries (SUBSCRIBE) on ``JetStreamEngine`` while the engine cannot confirm."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest

from protocol.errors import BrokerUnavailableError
from tests.cluster.sessions import RecordingSession, Sub
from tests.cluster.test_engine import _holds, _rows, _send, _subscribe
from tests.cluster.test_pulling import _lead_consumer
from tests.conftest import wait_for

pytestmark = pytest.mark.timeout(90)


async def _ack_request(engine, s, acks) -> BaseException | None:
    """An ACK request (``rid != 0``): None if answered ``{}``, else the error."""
    rid = s.rid()
    engine.ack(s, rid, acks)
    await wait_for(lambda: s.answered(rid), timeout=20, what="ack reply")
    return s.errors.get(rid)


async def _nothing_pending(engine, group: str, topic: str) -> bool:
    """Whether the engine counts no unacked delivery of the group's consumer."""
    handle = engine._pumps[(group, topic)].handle
    try:
        info = await engine.client.api(f"CONSUMER.INFO.{handle.stream}.{handle.name}", deadline=2)
    except Exception:  # (no leader for a moment)
        return False
    return info["num_ack_pending"] == 0


async def test_an_ack_the_engine_did_not_confirm_keeps_the_delivery_and_its_token(cluster_factory, engine_factory,
                                                                                 unique):
    """Regression: the gateway dropped a delivery's token before the engine confirmed its ack,
    so an ack lost in a fail-over was gone for good, the same ACK sent again was answered as
    done without acking anything, and the message came back after the ack wait. Here the
    consumer's leader and a second node are paused (no quorum) and the leader is then killed
    (the acks sent to it are lost): a fire-and-forget ACK and an ACK request are not
    confirmed, the request answers a retriable error and both deliveries stay; once a new
    leader is up, the same ACK sent again acks both (its reply covers the earlier ack) and
    neither message is delivered again."""
    cluster = await asyncio.to_thread(cluster_factory, 3)
    n1 = cluster.node("n1")
    only_n1 = SimpleNamespace(urls=[n1.url], monitor_urls=[n1.monitor_url])  # (never a stopped node)
    engine = await engine_factory(cluster=only_n1, ack_timeout=30.0)  # (never given again meanwhile)
    p, c = RecordingSession(role="producer"), RecordingSession(role="consumer")
    await _send(engine, p, unique, _rows(b"0", b"1"))
    await _subscribe(engine, c, Sub("g", unique, prefetch=2))
    await wait_for(lambda: len(c.deliveries) == 2, timeout=30, what="two deliveries")
    (t0, _w0), (t1, _w1) = c.deliveries
    handle = engine._pumps[("g", unique)].handle
    await _lead_consumer(engine, handle.stream, handle.name, "n3")
    for name in ("n2", "n3"):
        cluster.pause(name)
    try:
        engine.ack(c, 0, [(t0, True)])  # fire and forget: nobody to tell, the gateway tries again
        error = await _ack_request(engine, c, [(t1, True)])
        assert isinstance(error, BrokerUnavailableError) and error.retriable, error
        assert len(c.deliveries) == 2
        await asyncio.to_thread(cluster.kill9, "n3")  # with the acks it was sent
    finally:
        cluster.resume("n2")
    deadline = time.monotonic() + 60
    while (error := await _ack_request(engine, c, [(t1, True)])) is not None:  # the same ACK again
        assert isinstance(error, BrokerUnavailableError) and time.monotonic() < deadline, error
        await asyncio.sleep(0.2)
    # the reply covers this connection's earlier acks too: both are in the engine now
    await wait_for(lambda: _nothing_pending(engine, "g", unique), timeout=5, interval=0.2,
                   what="no unacked delivery in the engine")
    await _send(engine, p, unique, _rows(b"2"))
    await wait_for(lambda: len(c.deliveries) == 3, timeout=30, what="the next delivery")
    assert c.deliveries[2][1][2] == b"2"
    assert await _ack_request(engine, c, [(c.deliveries[2][0], True)]) is None
    await _holds(lambda: len(c.deliveries) == 3, 1.0)


async def test_a_fire_and_forget_ack_is_confirmed_by_the_gateways_own_tries(cluster_factory, engine_factory,
                                                                           unique):
    """An ACK without a request id that the engine did not confirm (no quorum) is tried again
    by the gateway every second: once the nodes are back it is in, nothing sent again."""
    cluster = await asyncio.to_thread(cluster_factory, 3)
    n1 = cluster.node("n1")
    only_n1 = SimpleNamespace(urls=[n1.url], monitor_urls=[n1.monitor_url])
    engine = await engine_factory(cluster=only_n1, ack_timeout=30.0)  # (never given again meanwhile)
    p, c = RecordingSession(role="producer"), RecordingSession(role="consumer")
    await _send(engine, p, unique, _rows(b"0"))
    await _subscribe(engine, c, Sub("g", unique, prefetch=1))
    await wait_for(lambda: len(c.deliveries) == 1, timeout=30, what="the delivery")
    member = engine._pumps[("g", unique)].members[c.conn_id]
    for name in ("n2", "n3"):
        cluster.pause(name)
    try:
        engine.ack(c, 0, [(c.deliveries[0][0], True)])
        await wait_for(lambda: member.unconfirmed, timeout=20, what="the ack refused by the engine")
        assert list(member.unconfirmed) == [c.deliveries[0][0]] and not member.leases  # (no longer prefetched)
    finally:
        for name in ("n2", "n3"):
            cluster.resume(name)
    await wait_for(lambda: not member.unconfirmed, timeout=60,
                   what="the gateway's own try confirmed")
    await wait_for(lambda: _nothing_pending(engine, "g", unique), timeout=5, interval=0.2,
                   what="no unacked delivery in the engine")
