"""Faults under load, through gateways and the SDKs (``-m slow``: each takes 30-90 s).

Each test runs ``tests.cluster.workload.Workload`` (plain sends, transactions decided by
END_TX and by check-back, one consumer group) through gateways over a private 3-node
cluster, injects one kind of fault while it runs, and checks the invariants: every
acknowledged send and every committed transaction delivered, no rolled-back one, one
visible copy per transaction; plus, where a node dies, that sends resume within 10 s.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.cluster.conftest import GATEWAY_TEST_ARGS
from tests.cluster.faultproxy import FaultProxy
from tests.cluster.workload import Workload

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


async def _stream_leader(cluster, topic: str) -> str:
    import nats

    nc = await nats.connect(servers=cluster.urls, connect_timeout=5)
    try:
        info = await nc.jetstream(timeout=10).stream_info(f"HMQ_T_{topic}")
        return str(info.cluster.leader)
    finally:
        await nc.close()


async def _hit_the_leader(cluster, address: str, topic: str, fault) -> float:
    """Run the workload, ``await fault(leader)`` on the topic stream's leader, check the
    invariants; returns the longest pause of acknowledged sends from the fault on."""
    w = await Workload(address, topic).start()
    try:
        await w.wait_traffic(300)
        leader = await _stream_leader(cluster, topic)
        t0 = time.monotonic()
        await fault(leader)
        await w.wait_traffic(300, timeout=60)
        pause = w.longest_pause_since(t0)
        await w.stop()
        await w.check(cluster.urls)
    finally:
        await w.close()
    return pause


async def test_kill9_of_the_stream_leader_under_load(cluster_factory, gateway_factory, unique):
    cluster = cluster_factory()
    a = gateway_factory(cluster, *GATEWAY_TEST_ARGS)
    b = gateway_factory(cluster, *GATEWAY_TEST_ARGS)

    async def kill(leader: str) -> None:
        await asyncio.to_thread(cluster.kill9, leader)

    pause = await _hit_the_leader(cluster, f"{a.address},{b.address}", unique, kill)
    assert pause <= 10.0, f"sends paused {pause:.1f} s after the leader's kill"


async def test_sigstop_of_the_stream_leader_past_the_election_timeout(cluster_factory, gateway_factory, unique):
    """The Jepsen process-pause case: the old leader wakes up after a new one was elected."""
    cluster = cluster_factory()
    a = gateway_factory(cluster, *GATEWAY_TEST_ARGS)

    async def pause_12s(leader: str) -> None:
        t0 = time.monotonic()
        cluster.pause(leader)
        try:
            while time.monotonic() - t0 < 12.0:  # past the 4-9 s election timeout
                await asyncio.sleep(0.2)
        finally:
            cluster.resume(leader)

    pause = await _hit_the_leader(cluster, a.address, unique, pause_12s)
    assert pause <= 10.0, f"sends paused {pause:.1f} s while the leader was stopped"


async def test_kill9_of_a_gateway_mid_send_and_holding_leases_with_transactions(
        cluster_factory, gateway_factory, unique):
    """Gateway A dies with sends, transactions and leases under way, then B: the clients
    end on C, and everything promised arrives (leases come back after --ack-timeout)."""
    cluster = cluster_factory()
    gws = [gateway_factory(cluster, *GATEWAY_TEST_ARGS) for _ in range(3)]
    w = await Workload(",".join(g.address for g in gws), unique).start()
    try:
        await w.wait_traffic(300)
        for g in gws[:2]:
            g.kill9()
            await w.wait_traffic(300, timeout=60)
        await w.stop()
        await w.check(cluster.urls, timeout=120)
    finally:
        await w.close()


async def test_a_proxy_between_gateway_and_engine_resets_stalls_and_drops(
        cluster_factory, gateway_factory, unique):
    cluster = cluster_factory()
    proxies = [FaultProxy("127.0.0.1", int(u.rsplit(":", 1)[1])) for u in cluster.urls]
    for p in proxies:
        await p.start()
    try:  # (the proxies run on this loop: the gateway is started from a thread)
        gw = await asyncio.to_thread(gateway_factory, cluster, *GATEWAY_TEST_ARGS,
                                     "--engine", ",".join(p.url for p in proxies))
    except BaseException:
        for p in proxies:
            await p.close()
        raise
    w = await Workload(gw.address, unique).start()
    try:
        await w.wait_traffic(300)
        for p in proxies:  # every engine connection reset at once
            p.reset()
        await w.wait_traffic(200, timeout=60)
        for p in proxies:  # a frozen path: nothing arrives for 5 s
            p.stall()
        await asyncio.sleep(5.0)
        for p in proxies:
            p.resume()
        await w.wait_traffic(200, timeout=60)
        for p in proxies:  # cut, and refused for 3 s
            p.drop()
        await asyncio.sleep(3.0)
        for p in proxies:
            p.allow()
        await w.wait_traffic(200, timeout=60)
        await w.stop()
        await w.check(cluster.urls, timeout=120)
        assert sum(p.connections for p in proxies) >= 2  # the gateway did reconnect
    finally:
        await w.close()
        for p in proxies:
            await p.close()
