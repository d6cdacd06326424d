"""kill -9 of an engine node with scheduled messages pending, a FIFO group mid-retry and a
pull lease outstanding (``JetStreamEngine`` on a private cluster)."""

from __future__ import annotations

import asyncio
import time

import pytest

from broker.engines.jetstream import naming
from protocol.errors import BrokerUnavailableError, StaleReceiptError
from tests.cluster.sessions import RecordingSession, Sub
from tests.cluster.test_engine import _ack, _ids, _rows, _send, _subscribe
from tests.cluster.test_fifo import _fifo
from tests.cluster.test_pulling import _lead_consumer, _receive
from tests.cluster.test_scheduling import TimedSession
from tests.conftest import wait_for

pytestmark = pytest.mark.timeout(180)


async def test_kill9_with_schedules_fifo_retry_and_leases_outstanding(cluster_factory, engine_factory, unique):
    cluster = await asyncio.to_thread(cluster_factory, 3)
    # the engine's ack wait outlasts the fail-over (up to ~10 s on a busy machine): while the
    # lease's consumer has no leader, nothing renews it, and a message whose ack wait ran out
    # is handed out again (its older handle then stale; README: cluster mode)
    engine = await engine_factory(cluster=cluster, retry_delays=(2.0,), ack_timeout=20.0)
    p = RecordingSession(role="producer")
    fifo_topic, pull_topic, sched_topic = f"f{unique}", f"p{unique}", f"s{unique}"
    # a pull lease outstanding
    await _send(engine, p, pull_topic, _rows(b"leased"))
    puller = RecordingSession(role="consumer")
    ((handle, _wire),) = await _receive(engine, puller, "g", pull_topic, invisible=60_000, wait=10_000)
    # the node to kill leads the scheduled topic's stream and the lease's consumer
    d = TimedSession(role="consumer")
    await _subscribe(engine, d, Sub("g", sched_topic))
    info = await engine.client.api(f"STREAM.INFO.{naming.topic_stream(sched_topic)}")
    leader = info["cluster"]["leader"]
    await _lead_consumer(engine, naming.topic_stream(pull_topic), naming.group_consumer_name("g"), leader)
    # a FIFO group whose first message failed and waits for its retry
    await _send(engine, p, fifo_topic, [[*r, {"group": "order-1"}] for r in _rows(b"1", b"2", b"3")])
    c = RecordingSession(role="consumer")
    await _subscribe(engine, c, _fifo(f"g{unique}", fifo_topic))
    await wait_for(lambda: c.deliveries, what="the FIFO head")
    await _ack(engine, c, [(c.deliveries[0][0], False)])
    # scheduled messages, due soon after the kill
    due0 = int(time.time() * 1000) + 2500
    dues = [due0 + 20 * i for i in range(30)]
    ids = _ids(await _send(engine, p, sched_topic, [[*_rows(b"%d" % i)[0], {"at": due}]
                                                    for i, due in enumerate(dues)]))
    await asyncio.to_thread(cluster.kill9, leader)
    rid = puller.rid()  # an ack now reaches no consumer leader: not confirmed, the lease stays
    engine.settle(puller, rid, "g", [[handle, "ack", 0]])
    await wait_for(lambda: puller.answered(rid), timeout=20, what="settle")
    (result,) = puller.replies[rid]["r"]
    assert result is True or result[0] != StaleReceiptError.code, result

    # every scheduled message comes, once, never before its time
    await wait_for(lambda: len(d.deliveries) >= 30, timeout=60, what="the scheduled messages after the kill")
    by_id = {w[0]: (w, at) for (_t, w), at in zip(d.deliveries, d.arrived, strict=True)}
    assert sorted(by_id) == sorted(ids) and len(d.deliveries) == 30
    for msg_id, due in zip(ids, dues, strict=True):
        wire, arrived = by_id[msg_id]
        assert wire[11]["at"] == due and arrived >= due
    # the FIFO group goes on in order: the failed head again, then the rest (an ack lost in
    # the fail-over — or refused as unconfirmed while the queue's consumer has no leader — may
    # bring the same message once more: at least once, never overtaken)
    bodies: list[bytes] = []
    seen = 1
    while bodies != [b"1", b"2", b"3"]:
        await wait_for(lambda n=seen: len(c.deliveries) > n, timeout=60, what=f"FIFO after {bodies}")
        token, wire = c.deliveries[seen]
        seen += 1
        if not bodies or wire[2] != bodies[-1]:
            bodies.append(wire[2])
        assert bodies == [b"1", b"2", b"3"][:len(bodies)], bodies
        rid = c.rid()
        engine.ack(c, rid, [(token, True)])
        await wait_for(lambda r=rid: c.answered(r), timeout=20, what="ack reply")
        assert rid in c.replies or isinstance(c.errors[rid], BrokerUnavailableError), c.errors[rid]
    assert c.deliveries[1][1][2] == b"1" and c.deliveries[1][1][10] == 1  # the retry of the head
    # the lease outlived the kill: its handle still settles it
    deadline = time.monotonic() + 30
    while True:
        rid = puller.rid()
        engine.settle(puller, rid, "g", [[handle, "ack", 0]])
        await wait_for(lambda r=rid: puller.answered(r), timeout=20, what="settle")
        (result,) = puller.replies[rid]["r"]
        if result is True:
            break
        assert result[0] != StaleReceiptError.code and time.monotonic() < deadline, result
        await asyncio.sleep(0.2)
