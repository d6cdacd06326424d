"""Faults under load through ``JetStreamEngine``: kill -9 of the topic stream's leader."""

from __future__ import annotations

import asyncio
import time

import pytest

from broker.engines.jetstream import naming
from broker.engines.jetstream.groups import GroupSpec
from protocol.errors import BrokerUnavailableError
from tests.cluster.sessions import RecordingSession

pytestmark = pytest.mark.timeout(180)

WINDOW = 32  # SEND requests in flight


async def _stream_leader(engine, stream: str) -> str:
    info = await engine.client.api(f"STREAM.INFO.{stream}")
    return str(info["cluster"]["leader"])


async def test_kill9_of_the_stream_leader_during_sends_loses_no_acknowledged_send(
        cluster_factory, engine_factory, unique, capsys):
    cluster = await asyncio.to_thread(cluster_factory, 3)
    engine = await engine_factory(cluster=cluster)
    engine.send_deadline = 30.0
    engine.writer.deadline = 30.0
    topic = unique
    ts = await engine.streams.ensure_topic(topic)
    p = RecordingSession(role="producer", group="pg")
    engine.producer_hello(p)

    acked: dict[int, bytes] = {}  # stream sequence -> body
    ack_times: list[tuple[float, float]] = []  # (sent at, acked at)
    errors: list[Exception] = []
    outstanding: dict[int, tuple[bytes, float]] = {}
    counter = 0
    stop_sending = asyncio.Event()
    slot = asyncio.Semaphore(WINDOW)

    def collect() -> None:
        for rid in [r for r in outstanding if p.answered(r)]:
            body, sent_at = outstanding.pop(rid)
            slot.release()
            if rid in p.replies:
                acked[p.replies[rid]["r"][0][0]] = body
                ack_times.append((sent_at, time.monotonic()))
            else:
                errors.append(p.errors[rid])

    async def sender() -> None:
        nonlocal counter
        while not stop_sending.is_set():
            await slot.acquire()
            counter += 1
            body = b"m-%08d" % counter
            rid = p.rid()
            outstanding[rid] = (body, time.monotonic())
            engine.send(p, rid, topic, [[body, None, [], {}, 0]], False)

    async def collector() -> None:
        while not stop_sending.is_set() or outstanding:
            collect()
            await asyncio.sleep(0.005)

    tasks = [asyncio.create_task(sender()), asyncio.create_task(collector())]
    try:
        deadline = time.monotonic() + 30
        while len(acked) < 500:  # warm up
            assert time.monotonic() < deadline, "no progress before the kill"
            await asyncio.sleep(0.05)
        leader = await _stream_leader(engine, ts.name)
        killed_at = time.monotonic()
        await asyncio.to_thread(cluster.kill9, leader)
        # publish on until sends issued after the kill are acknowledged for 3 s
        deadline = time.monotonic() + 60
        while True:
            resumed = [a for s, a in ack_times if s > killed_at]
            if resumed and time.monotonic() - min(resumed) > 3:
                break
            assert time.monotonic() < deadline, "sending did not resume within 60 s of the kill"
            await asyncio.sleep(0.05)
        stop_sending.set()
        for _ in range(WINDOW):  # unblock the sender if it waits for a slot
            slot.release()
        await asyncio.wait_for(asyncio.gather(*tasks), 60)
    finally:
        stop_sending.set()
        for t in tasks:
            t.cancel()
    pause = min(a for s, a in ack_times if s > killed_at) - killed_at
    new_leader = await _stream_leader(engine, ts.name)
    assert new_leader != leader
    assert all(isinstance(e, BrokerUnavailableError) for e in errors), errors[:3]

    # read everything back from the survivors: every acknowledged send is there, once
    handle = await engine.groups_api.subscribe(GroupSpec(f"verify{unique}", topic, ack_wait=60))
    stored: dict[int, bytes] = {}
    try:
        info = await engine.client.api(f"STREAM.INFO.{ts.name}")
        total = int(info["state"]["messages"])
        deadline = time.monotonic() + 60
        while len(stored) < total:
            assert time.monotonic() < deadline, f"read back {len(stored)} of {total}"
            for d in await handle.fetch(1000, timeout=2):
                stored[d.stream_seq] = d.record.body
    finally:
        await handle.close()
    lost = [seq for seq, body in acked.items() if stored.get(seq) != body]
    bodies = list(stored.values())
    duplicated = len(bodies) - len(set(bodies))
    with capsys.disabled():
        print(f"\n[kill -9 stream leader {leader} -> {new_leader}] acknowledged {len(acked)}, "
              f"stored {total}, lost {len(lost)}, duplicated {duplicated}, errors {len(errors)}, "
              f"sends resumed {pause:.1f} s after the kill")
    assert lost == []
    assert duplicated == 0
    assert naming.decode_msg_id(ts.prefix + f"{max(acked):016X}")[1] == max(acked)
