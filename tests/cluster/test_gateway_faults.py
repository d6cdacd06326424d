"""Faults under load, through gateways and the SDKs (``-m slow``: each takes 30-90 s).

Each test runs ``tests.cluster.workload.Workload`` (plain sends, transactions decided by
END_TX and by check-back, one consumer group) through gateways over a private 3-node
cluster, injects one kind of fault while it runs, and checks the invariants: every
acknowledged send and every committed transaction delivered, no rolled-back one, one
visible copy per transaction, every half message resolved; plus, where a node dies, that
sends resume within ``FAILOVER_PAUSE_BOUND`` (the goal is 10 s). A gateway killed between a transaction's COMMIT decision and its
commit pointer is made real with the ``after-decision`` failpoint (``broker.failpoint``).
Node faults (meta and consumer leaders, a wiped disk, rolling restarts):
``test_node_faults.py``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from broker.engines.jetstream import naming
from consumer_sdk import ConsumeResult, PushConsumer
from producer_sdk import (
    HalfMQError,
    LocalTransactionState,
    TransactionListener,
    TransactionProducer,
)
from tests.cluster.conftest import FAILOVER_PAUSE_BOUND, FAULT_TEST_ARGS
from tests.cluster.enginestate import stream_leader
from tests.cluster.faultproxy import FaultProxy
from tests.cluster.workload import Workload

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


async def _hit_the_leader(cluster, address: str, topic: str, fault) -> float:
    """Run the workload, ``await fault(leader)`` on the topic stream's leader, check the
    invariants; returns the longest pause of acknowledged sends from the fault on."""
    w = await Workload(address, topic).start()
    try:
        await w.wait_traffic(300)
        leader = await stream_leader(cluster, naming.topic_stream(topic))
        t0 = time.monotonic()
        await fault(leader)
        await w.wait_traffic(300, timeout=60)
        pause = w.longest_pause_since(t0)
        await w.stop()
        await w.check(cluster.urls)
    finally:
        await w.close()
    return pause


async def test_kill9_of_the_stream_leader_under_load(cluster_factory, gateway_factory, unique, capsys):
    cluster = cluster_factory()
    a = gateway_factory(cluster, *FAULT_TEST_ARGS)
    b = gateway_factory(cluster, *FAULT_TEST_ARGS)

    async def kill(leader: str) -> None:
        await asyncio.to_thread(cluster.kill9, leader)

    pause = await _hit_the_leader(cluster, f"{a.address},{b.address}", unique, kill)
    with capsys.disabled():
        print(f"\n[kill -9 of the stream leader: longest pause {pause:.1f} s]")
    assert pause <= FAILOVER_PAUSE_BOUND, f"sends paused {pause:.1f} s after the leader's kill"


async def test_sigstop_of_the_stream_leader_past_the_election_timeout(cluster_factory, gateway_factory, unique,
                                                                      capsys):
    """The Jepsen process-pause case: the old leader wakes up after a new one was elected."""
    cluster = cluster_factory()
    a = gateway_factory(cluster, *FAULT_TEST_ARGS)

    async def pause_12s(leader: str) -> None:
        t0 = time.monotonic()
        cluster.pause(leader)
        try:
            while time.monotonic() - t0 < 12.0:  # past the 4-9 s election timeout
                await asyncio.sleep(0.2)
        finally:
            cluster.resume(leader)

    pause = await _hit_the_leader(cluster, a.address, unique, pause_12s)
    with capsys.disabled():
        print(f"\n[SIGSTOP of the stream leader for 12 s: longest pause {pause:.1f} s]")
    assert pause <= FAILOVER_PAUSE_BOUND, f"sends paused {pause:.1f} s while the leader was stopped"


async def test_kill9_of_a_gateway_mid_send_and_holding_leases_with_transactions(
        cluster_factory, gateway_factory, unique):
    """Gateway A dies with sends, transactions and leases under way, then B: the clients
    end on C, and everything promised arrives (leases come back after --ack-timeout)."""
    cluster = cluster_factory()
    gws = [gateway_factory(cluster, *FAULT_TEST_ARGS) for _ in range(3)]
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
        gw = await asyncio.to_thread(gateway_factory, cluster, *FAULT_TEST_ARGS,
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


class _AlwaysCommit(TransactionListener):
    async def execute_local_transaction(self, message: Any, arg: Any) -> LocalTransactionState:
        return LocalTransactionState.COMMIT

    async def check_local_transaction(self, message: Any) -> LocalTransactionState:
        return LocalTransactionState.COMMIT


async def test_a_gateway_dies_between_the_commit_decision_and_the_pointer(
        cluster_factory, gateway_factory, unique, capsys):
    """Gateway A runs with the ``after-decision`` failpoint (``broker.failpoint``): at its
    100th won COMMIT decision it exits at once, the decision stored, the commit pointer
    not. That transaction's producer (``lone``) reached A only, so no END_TX is repeated
    elsewhere: B's check-back loop must find the decision and publish the pointer, within
    the transaction's deadline (``--tx-timeout``, plus a TXCHECK ack wait in case A held
    the half, plus two fail-overs), and exactly once. Meanwhile the workload runs on A
    (plain sends, consumer) and B (transactions) and fails over to B."""
    from broker.engines.jetstream.txcheck import TXCHECK_ACK_WAIT
    from broker.failpoint import FAILPOINT_EXIT_STATUS
    from tests.cluster.workload import pointer_counts, transaction_problems
    from tests.conftest import wait_for

    cluster = cluster_factory()
    a = gateway_factory(cluster, *FAULT_TEST_ARGS, env={"HALFMQ_FAILPOINT": "after-decision:100"})
    b = gateway_factory(cluster, *FAULT_TEST_ARGS)
    deadline = 1.0 + TXCHECK_ACK_WAIT + 2 * 10.0  # --tx-timeout 1s + a held half + two fail-overs
    lone_topic, lone_group = f"{unique}L", f"{unique}-lone"
    w = await Workload(f"{a.address},{b.address}", unique, tx_address=f"{b.address},{a.address}").start()
    delivered: dict[str, int] = {}
    first_seen: dict[str, float] = {}

    async def on(m: Any) -> ConsumeResult:
        delivered[m.msg_id] = delivered.get(m.msg_id, 0) + 1
        first_seen.setdefault(m.msg_id, time.monotonic())
        return ConsumeResult.SUCCESS

    lone = TransactionProducer(a.address, group=lone_group, listener=_AlwaysCommit(), send_timeout=5.0)
    sent: set[str] = set()
    stop = asyncio.Event()

    async def transactions(n: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            try:
                sent.add((await lone.send_in_transaction(lone_topic, f"{n}-{i}".encode())).msg_id)
            except HalfMQError:
                pass  # A is gone: the half may be stored, its producer comes back below

    async with PushConsumer(b.address, group=f"{unique}-lg", topic=lone_topic, listener=on):
        try:
            await w.wait_traffic(200)
            await lone.start()
            loops = [asyncio.create_task(transactions(n)) for n in range(8)]
            await wait_for(lambda: a.proc.poll() is not None, timeout=60, what="gateway A's failpoint")
            died = time.monotonic()
            assert a.proc.returncode == FAILPOINT_EXIT_STATUS, a.proc.returncode
            fired = [ln for ln in a.log_path.read_text().splitlines() if "failpoint after-decision fired" in ln]
            victim = fired[-1].rsplit(" ", 1)[1]
            stop.set()
            await asyncio.gather(*loops)
            await lone.close()
            # the application comes back through B: check-backs of its undecided halves reach it
            async with TransactionProducer(b.address, group=lone_group, listener=_AlwaysCommit()):
                await wait_for(lambda: victim in delivered or victim in w.got.values(), timeout=deadline,
                               what=f"the decided transaction {victim} made visible")
                visible_after = first_seen.get(victim, time.monotonic()) - died
                await w.wait_traffic(300, timeout=60)
                await w.stop()
                await w.check(cluster.urls)
                await wait_for(lambda: sent <= delivered.keys(), timeout=60,
                               what="every transaction of the lone producer delivered")
                # every lone half (also those whose producer died with A) decided COMMIT, each
                # visible once; the victim, wherever it was, visible once
                in_lone = victim[:8] == next(iter(sent))[:8]
                counts = await pointer_counts(cluster.urls, lone_topic)

                async def lone_resolved() -> bool:
                    nonlocal counts
                    counts = await pointer_counts(cluster.urls, lone_topic)
                    return not await transaction_problems(cluster.urls, lone_topic, victim[:8], counts)

                if in_lone:
                    await wait_for(lone_resolved, timeout=60, what="every lone half resolved")
                victim_counts = counts if in_lone else await pointer_counts(cluster.urls, unique)
        finally:
            stop.set()
            await w.close()
            await lone.close()
    assert visible_after <= deadline, f"visible {visible_after:.1f} s after the gateway died"
    assert victim_counts[naming.decode_msg_id(victim)[1]] == 1
    assert max(counts.values()) == 1 and max(delivered.values()) == 1, "a transaction visible twice"
    with capsys.disabled():
        print(f"\n[gateway A exited at the failpoint after COMMIT of {victim} "
              f"({'lone producer' if in_lone else 'workload'}); visible through B's check-back "
              f"{visible_after:.1f} s later (deadline {deadline:.0f} s); {len(sent)} lone "
              f"transactions acknowledged, {len(delivered)} delivered, each once]")
