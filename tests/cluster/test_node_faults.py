"""Engine node faults under load, through two gateways (``-m slow``: each takes 20-90 s).

Each test runs ``tests.cluster.workload.Workload`` (plain sends, transactions decided by
END_TX and by check-back, one consumer group) through two gateways over a private 3-node
cluster, injects the fault while it runs and checks every invariant (``Workload.check``:
every acknowledged send and committed transaction delivered, none rolled back, one visible
copy per transaction, every half message resolved with one decision). Pauses are the
longest time without an acknowledged send from the fault on; they are printed, and must
stay within ``FAILOVER_PAUSE_BOUND`` (11 s: election timeout plus one engine attempt; the
goal is 10 s) after a kill, within 10 s for each rolling restart.

- kill -9 of the JetStream meta leader (the Raft group that creates streams and
  consumers), with a new topic and a new consumer group created right after it (their
  clients started again after a retriable error, as an application does);
- kill -9 of the leader of the group's durable consumer (moved off the stream's leader
  first, so it is a consumer fault alone);
- a node's disk lost: kill -9, store deleted, restarted empty, caught up (every stream
  and consumer replica current), then kill -9 of another node: the rebuilt one must hold
  what was acknowledged;
- rolling restarts: each node, then each gateway, stopped and started again one at a
  time, waiting for recovery in between.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from broker.engines.jetstream import naming
from producer_sdk import HalfMQError
from tests.cluster.conftest import FAILOVER_PAUSE_BOUND, FAULT_TEST_ARGS
from tests.cluster.enginestate import (
    consumer_leader,
    stream_leader,
    wait_all_current,
    wait_consumer_leader_apart,
)
from tests.cluster.workload import Workload

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

ROLLING_PAUSE_GOAL = 10.0  # a restart is no fail-over: the goal itself


def _report(capsys, line: str) -> None:
    with capsys.disabled():
        print(f"\n[{line}]")


async def _two_gateways(cluster_factory, gateway_factory):
    cluster = await asyncio.to_thread(cluster_factory)
    a = await asyncio.to_thread(gateway_factory, cluster, *FAULT_TEST_ARGS)
    b = await asyncio.to_thread(gateway_factory, cluster, *FAULT_TEST_ARGS)
    return cluster, a, b


async def _new_meta_leader(cluster, old: str, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        leader = await asyncio.to_thread(cluster.meta_leader)
        if leader and leader != old:
            return leader
        assert time.monotonic() < deadline, f"no meta leader other than {old} after {timeout:.0f} s"
        await asyncio.sleep(0.1)


async def _start_retrying(make: Callable[[], Workload], timeout: float = 60.0) -> tuple[Workload, int]:
    """Start a workload as an application does: again after a retriable error (a consumer's
    SUBSCRIBE needs the meta leader to create its durable consumer); returns it and the
    number of failed starts."""
    deadline = time.monotonic() + timeout
    failed = 0
    while True:
        w = make()
        try:
            return await w.start(), failed
        except HalfMQError as exc:
            await w.close()
            failed += 1
            assert exc.retriable and time.monotonic() < deadline, f"start failed {failed} times: {exc!r}"


async def test_kill9_of_the_meta_leader_under_load(cluster_factory, gateway_factory, unique, capsys):
    cluster, a, b = await _two_gateways(cluster_factory, gateway_factory)
    w = await Workload(f"{a.address},{b.address}", unique).start()
    late: Workload | None = None
    try:
        await w.wait_traffic(300)
        meta = await asyncio.to_thread(cluster.meta_leader)
        assert meta
        topic_leader = await stream_leader(cluster, naming.topic_stream(unique))
        t0 = time.monotonic()
        await asyncio.to_thread(cluster.kill9, meta)
        # what only the meta group can do, asked for while it elects: a new topic's stream,
        # a new group's consumer, a new TXCHECK consumer
        late, failed_starts = await _start_retrying(
            lambda: Workload(f"{b.address},{a.address}", f"{unique}x"))
        new_meta = await _new_meta_leader(cluster, meta)
        elected = time.monotonic() - t0
        await w.wait_traffic(300, timeout=60)
        await late.wait_traffic(100, timeout=60)
        first_late = min(late.ack_times) - t0
        pause = w.longest_pause_since(t0)
        await w.stop()
        await late.stop()
        await w.check(cluster.urls)
        await late.check(cluster.urls)
    finally:
        await w.close()
        if late is not None:
            await late.close()
    _report(capsys, f"kill -9 meta leader {meta} (topic stream leader {topic_leader}) -> {new_meta} "
                    f"in {elected:.1f} s; longest pause {pause:.1f} s; new topic's first ack "
                    f"{first_late:.1f} s after the kill ({failed_starts} failed starts of its "
                    f"clients before); {len(w.acked)} + {len(late.acked)} acked, "
                    f"{w.errors + late.errors} failed sends")
    assert pause <= FAILOVER_PAUSE_BOUND, f"sends paused {pause:.1f} s after the meta leader's kill"


async def test_kill9_of_the_consumer_leader_under_load(cluster_factory, gateway_factory, unique, capsys):
    cluster, a, b = await _two_gateways(cluster_factory, gateway_factory)
    stream, consumer = naming.topic_stream(unique), naming.group_consumer_name(f"{unique}-g")
    w = await Workload(f"{a.address},{b.address}", unique).start()
    try:
        await w.wait_traffic(300)
        leader = await wait_consumer_leader_apart(cluster, stream, consumer)
        s_leader = await stream_leader(cluster, stream)
        consumed = len(w.got)
        t0 = time.monotonic()
        await asyncio.to_thread(cluster.kill9, leader)
        await w.wait_traffic(300, timeout=60)
        pause = w.longest_pause_since(t0)
        consume_pause = w.longest_consume_pause_since(t0)
        await w.stop()
        await w.check(cluster.urls)
        new_leader = await consumer_leader(cluster, stream, consumer)
    finally:
        await w.close()
    _report(capsys, f"kill -9 consumer leader {leader} (stream leader {s_leader}) -> {new_leader}; "
                    f"longest pause: sends {pause:.1f} s, deliveries {consume_pause:.1f} s; "
                    f"{consumed} consumed before, {len(w.got)} after; {w.errors} failed sends")
    assert new_leader != leader
    assert pause <= FAILOVER_PAUSE_BOUND and consume_pause <= FAILOVER_PAUSE_BOUND, (pause, consume_pause)


async def test_a_nodes_disk_wiped_and_rebuilt_then_another_node_killed(
        cluster_factory, gateway_factory, unique, capsys):
    cluster, a, b = await _two_gateways(cluster_factory, gateway_factory)
    stream = naming.topic_stream(unique)
    w = await Workload(f"{a.address},{b.address}", unique).start()
    try:
        await w.wait_traffic(1000)
        wiped = await stream_leader(cluster, stream)
        await asyncio.to_thread(cluster.kill9, wiped)
        await asyncio.to_thread(cluster.wipe_store, wiped)
        await w.wait_traffic(1000, timeout=60)  # two nodes of three carry on
        acked_before_rebuild = len(w.acked)
        await asyncio.to_thread(cluster.start_node, wiped)
        caught_up = await wait_all_current(cluster, timeout=90)
        await w.wait_traffic(200, timeout=60)
        # the rebuilt node is now one of the two that remain: kill the stream's leader if
        # it is another node, else any other node
        leader = await stream_leader(cluster, stream)
        second = leader if leader != wiped else next(n.name for n in cluster.nodes if n.name != wiped)
        t0 = time.monotonic()
        await asyncio.to_thread(cluster.kill9, second)
        await w.wait_traffic(300, timeout=60)
        pause = w.longest_pause_since(t0)
        await w.stop()
        await w.check(cluster.urls)
        survivor_leader = await stream_leader(cluster, stream)
    finally:
        await w.close()
    _report(capsys, f"disk of {wiped} wiped, restarted empty, every replica current "
                    f"{caught_up:.1f} s after its start ({acked_before_rebuild} sends acknowledged "
                    f"before); then kill -9 {second}: stream leader {survivor_leader}, longest pause "
                    f"{pause:.1f} s; {len(w.acked)} acked, {len(w.tx_ids)} transactions, none lost")
    assert pause <= FAILOVER_PAUSE_BOUND, f"sends paused {pause:.1f} s after the second kill"


async def test_rolling_restarts_of_every_node_then_every_gateway_under_load(
        cluster_factory, gateway_factory, unique, capsys):
    cluster, a, b = await _two_gateways(cluster_factory, gateway_factory)
    w = await Workload(f"{a.address},{b.address}", unique).start()
    pauses: dict[str, float] = {}
    try:
        await w.wait_traffic(300)
        for node in [n.name for n in cluster.nodes]:
            t0 = time.monotonic()
            await asyncio.to_thread(cluster.stop_node, node)
            await w.wait_traffic(100, timeout=60)
            await asyncio.to_thread(cluster.start_node, node)
            await wait_all_current(cluster, timeout=60)
            await w.wait_traffic(100, timeout=60)
            pauses[node] = w.longest_pause_since(t0, until=time.monotonic())
        for name, gw in (("gateway A", a), ("gateway B", b)):
            t0 = time.monotonic()
            await asyncio.to_thread(gw.stop)
            await w.wait_traffic(100, timeout=60)
            await asyncio.to_thread(gw.start, 60)
            await w.wait_traffic(100, timeout=60)
            pauses[name] = w.longest_pause_since(t0, until=time.monotonic())
        await w.stop()
        await w.check(cluster.urls)
    finally:
        await w.close()
    _report(capsys, "rolling restarts, longest pause of sends per restart: "
            + ", ".join(f"{k} {v:.1f} s" for k, v in pauses.items())
            + f"; {len(w.acked)} acked, {len(w.tx_ids)} transactions, {w.errors} failed sends")
    assert max(pauses.values()) <= ROLLING_PAUSE_GOAL, pauses
