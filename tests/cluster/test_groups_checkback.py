"""Consumer groups, dead letters, TXCHECK and check-back routing on a real cluster."""

from __future__ import annotations

import asyncio
import time

import pytest

from broker.engines.jetstream import naming
from broker.engines.jetstream.groups import ORIGIN_TOPIC, GroupSpec

pytestmark = pytest.mark.timeout(90)


def _msg(body: bytes, tags: str | None = None, keys=(), props=None, born=1000) -> list:
    return [body, tags, list(keys), dict(props or {}), born]


async def _fetch_all(handle, want: int, timeout: float = 10.0) -> list:
    got: list = []
    deadline = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < deadline:
        got += await handle.fetch(want - len(got), timeout=0.5)
    return got


async def test_tag_filters_and_start_positions(layer, unique):
    tags = ["A", "B", "C", None, "a.b c"]
    await layer.writer.store(unique, [_msg(b"old-" + str(t).encode(), t) for t in tags])
    both = await layer.groups.subscribe(GroupSpec("g_ab", unique, tags="A || a.b c", ack_wait=5))
    every = await layer.groups.subscribe(GroupSpec("g_all", unique, tags="*", ack_wait=5))
    late = await layer.groups.subscribe(GroupSpec("g_new", unique, start="latest", ack_wait=5))
    await layer.writer.store(unique, [_msg(b"new", "B")])
    try:
        got = await _fetch_all(both, 2)
        assert sorted(d.record.tags for d in got) == ["A", "a.b c"]
        for d in got:
            await d.ack()
        assert await both.fetch(5, timeout=0.3) == []  # B, C, untagged and the new B are not for it
        got = await _fetch_all(every, 6)
        assert len(got) == 6 and {d.record.tags for d in got} == {"A", "B", "C", None, "a.b c"}
        got = await _fetch_all(late, 1)
        assert [d.record.body for d in got] == [b"new"]
        wire = await got[0].resolve()
        ts = await layer.streams.ensure_topic(unique)
        assert wire[0] == naming.encode_msg_id(ts.prefix, got[0].stream_seq) and wire[1] == unique
        assert wire[2:5] == [b"new", "B", []] and wire[10] == 0
    finally:
        for h in (both, every, late):
            await h.close()


async def test_two_members_share_a_group(layer, unique):
    """One durable consumer, two fetchers (two gateways): each message goes to one of them."""
    await layer.writer.store(unique, [_msg(b"%d" % i) for i in range(20)])
    m1 = await layer.groups.subscribe(GroupSpec("g", unique, ack_wait=30))
    m2 = await layer.groups.subscribe(GroupSpec("g", unique, ack_wait=30))
    try:
        # m1 takes all 7 its pull request leases (a fetch returns with the first to arrive,
        # the rest of the request lands in m1's buffer later: leased to m1, not to m2); none
        # is acked, so none may come back to anyone within the ack wait
        a = await _fetch_all(m1, 7)
        b = await _fetch_all(m2, 20 - len(a))
        bodies = [d.record.body for d in a + b]
        assert sorted(bodies) == sorted(b"%d" % i for i in range(20)) and len(set(bodies)) == 20
    finally:
        await m1.close()
        await m2.close()


async def test_nak_delay_is_honoured_and_counted(layer, unique):
    await layer.writer.store(unique, [_msg(b"retry-me")])
    h = await layer.groups.subscribe(GroupSpec("g", unique, ack_wait=30))
    try:
        (d,) = await _fetch_all(h, 1)
        assert d.attempt == 0
        naked_at = time.monotonic()
        await d.retry(1.5)
        again: list = []
        while not again:
            again = await h.fetch(1, timeout=0.5)
        waited = time.monotonic() - naked_at
        assert waited >= 1.45, f"redelivered after {waited:.2f}s, before the 1.5 s delay"
        assert again[0].attempt == 1 and again[0].stream_seq == d.stream_seq
        assert (await again[0].resolve())[10] == 1  # reconsume_times on the wire
        await again[0].ack()
        assert await h.fetch(1, timeout=0.5) == []
    finally:
        await h.close()


async def test_lease_expiry_redelivers_with_the_count_raised(layer, unique):
    await layer.writer.store(unique, [_msg(b"lease")])
    h = await layer.groups.subscribe(GroupSpec("g", unique, ack_wait=1.0))
    try:
        (d,) = await _fetch_all(h, 1)
        leased_at = time.monotonic()
        again: list = []
        while not again:  # not acked: the engine redelivers after the ack wait
            again = await h.fetch(1, timeout=0.5)
        assert time.monotonic() - leased_at >= 0.95
        assert again[0].attempt == 1 and again[0].stream_seq == d.stream_seq
        info = await h.info()
        assert info["num_redelivered"] >= 1 and info["num_ack_pending"] == 1
        await again[0].ack()
        assert (await h.info())["num_ack_pending"] == 0
    finally:
        await h.close()


async def test_dead_letter_copy_then_never_again(layer, unique):
    ts, rows = await layer.writer.store(unique, [_msg(b"poison", "T", keys=["k1"], props={"p": "v"})])
    msg_id = naming.encode_msg_id(ts.prefix, rows[0][0])
    gd = f"gd{unique}"  # the DLQ stream is shared by every test
    h = await layer.groups.subscribe(GroupSpec(gd, unique, ack_wait=30))
    dlq = await layer.groups.subscribe(GroupSpec("reader", f"%DLQ%{gd}", ack_wait=30))
    try:
        (d,) = await _fetch_all(h, 1)
        wire = await d.resolve()
        first = await d.dead_letter(wire)
        again = await layer.groups.publish_dead(gd, wire)  # a repeat after a crash: stored once
        assert again.duplicate and again.seq == first.seq
        assert await h.fetch(1, timeout=1.2) == []  # terminated: never redelivered
        (dead,) = await _fetch_all(dlq, 1)
        dw = await dead.resolve()
        assert dw[0] == msg_id and dw[1] == f"%DLQ%{gd}" and dw[2] == b"poison" and dw[3] == "T"
        assert dw[4] == ["k1"] and dw[5] == {"p": "v", ORIGIN_TOPIC: unique}
        await dead.ack()
        # admin resend: back to the topic, for group gd only
        other = await layer.groups.subscribe(GroupSpec("g_other", unique, start="latest", ack_wait=30))
        try:
            assert await layer.groups.resend(gd, "F" * 24) is None
            sent = await layer.groups.resend(gd, msg_id)
            assert sent is not None and not sent.duplicate
            (back,) = await _fetch_all(h, 1)
            bw = await back.resolve()
            assert bw[0] == msg_id and bw[2] == b"poison" and bw[5] == {"p": "v"} and bw[10] == 0
            assert await other.fetch(1, timeout=0.5) == []
        finally:
            await other.close()
    finally:
        await h.close()
        await dlq.close()


async def test_committed_pointer_is_delivered_as_the_half(layer, unique):
    h = await layer.groups.subscribe(GroupSpec("g", unique, ack_wait=30))
    try:
        ts, rows = await layer.writer.store(
            unique, [_msg(b"tx-body", "Tx", keys=["tx-1"], props={"a": "b"}, born=42)] * 2,
            half=True, group=f"pg{unique}", instance="p1")
        committed, rolled = (naming.encode_msg_id(ts.prefix, r[0]) for r in rows)
        assert await h.fetch(1, timeout=0.5) == []  # T1: halves are invisible
        await layer.ledger.end(committed, "COMMIT")
        await layer.ledger.end(rolled, "ROLLBACK")
        (d,) = await _fetch_all(h, 1)
        wire = await d.resolve()
        # T9: the half's id, tags, keys and properties
        assert wire[0] == committed and wire[2:7] == [b"tx-body", "Tx", ["tx-1"], {"a": "b"}, 42]
        assert wire[9] == rows[0][0]
        await d.ack()
        assert await h.fetch(1, timeout=0.5) == []  # T3: the rollback never shows
    finally:
        await h.close()


async def test_txcheck_hands_each_half_to_one_fetcher(layer, unique):
    ts, rows = await layer.writer.store(unique, [_msg(b"h%d" % i) for i in range(4)], half=True,
                                        group=f"pg{unique}", instance="p1")
    await layer.writer.store(unique, [_msg(b"visible")])
    t1 = await layer.groups.txcheck(unique, ack_wait=30)
    t2 = await layer.groups.txcheck(unique, ack_wait=30)
    try:
        a = await t1.fetch(2, timeout=2)
        b = await _fetch_all(t2, 4 - len(a))
        seqs = sorted(d.stream_seq for d in a + b)
        assert seqs == sorted(r[0] for r in rows)  # only the halves, each once
        assert all(d.record.producer_group == f"pg{unique}" and d.record.producer_instance == "p1" for d in a + b)
        for d in a + b:
            await d.ack()
    finally:
        await t1.close()
        await t2.close()


async def test_check_back_routing(layer, nats_cluster, unique):
    from broker.engines.jetstream.checkback import CheckRouter
    from broker.engines.jetstream.client import EngineClient

    wire = ["X" * 24, unique, b"b", None, [], {}, 0, 0, 0, -1, 0]
    # no gateway holds a producer of the group: not reached, not counted
    r = await layer.router.check(wire, group=f"pg{unique}", instance=f"i-{unique}")
    assert (r.reached, r.state) == (False, None)

    # two other "gateways" on the asking one's server: interest changes are seen at once
    # there (between servers they travel asynchronously: see the last part)
    here = str(layer.client.nc.connected_url.geturl())
    gw_a = EngineClient([here])
    gw_b = EngineClient([here])
    await gw_a.connect()
    await gw_b.connect()
    asked: list[str] = []

    def answering(name: str, state: str | None):
        async def handler(w):  # a gateway asking its producer: None when it has none
            assert w == wire
            asked.append(name)
            if state is None:
                return None
            answer = asyncio.get_running_loop().create_future()
            answer.set_result({"state": state})
            return answer
        return handler

    try:
        ra, rb = CheckRouter(gw_a, timeout=1.0), CheckRouter(gw_b, timeout=1.0)
        # the producer instance that sent the half is on gateway A; B has another member
        sub_i = await ra.serve_instance(f"i {unique}.x", answering("instance", "COMMIT"))
        sub_ga = await ra.serve_group(f"pg{unique}", answering("group-a", "ROLLBACK"))
        sub_gb = await rb.serve_group(f"pg{unique}", answering("group-b", "ROLLBACK"))
        await gw_a.nc.flush()
        await gw_b.nc.flush()
        r = await layer.router.check(wire, group=f"pg{unique}", instance=f"i {unique}.x")
        assert (r.reached, r.state, r.via, asked) == (True, "COMMIT", "instance", ["instance"])
        # the instance is gone: any member of the group answers
        await sub_i.unsubscribe()
        await gw_a.nc.flush()
        r = await layer.router.check(wire, group=f"pg{unique}", instance=f"i {unique}.x")
        assert (r.reached, r.state, r.via) == (True, "ROLLBACK", "group")
        # a gateway whose producer left between routing and asking: not reached
        await sub_ga.unsubscribe()
        await sub_gb.unsubscribe()
        await gw_a.nc.flush()  # the server has dropped A's interest (else its requests vanish)
        sub_gone = await rb.serve_group(f"pg{unique}", answering("gone", None))
        await gw_b.nc.flush()
        r = await layer.router.check(wire, group=f"pg{unique}", instance=None)
        assert (r.reached, r.state) == (False, None)
        await sub_gone.unsubscribe()

        # a producer that never answers: reached (counted), no state
        async def silent(w):
            return asyncio.get_running_loop().create_future()  # asked; never answers
        sub_slow = await rb.serve_group(f"pg{unique}", silent)
        await gw_b.nc.flush()
        # (asked again while not reached: on a busy machine the first ask can miss the new
        # subscription's interest; a check that reached nobody is not counted)
        for _ in range(5):
            r = await layer.router.check(wire, group=f"pg{unique}", instance=None)
            if r.reached:
                break
        assert (r.reached, r.state) == (True, None)
        await sub_slow.unsubscribe()

        # from a gateway on another server: reached once the interest has travelled there
        sub_far = await rb.serve_group(f"pg{unique}", answering("far", "COMMIT"))
        await gw_b.nc.flush()
        elsewhere = EngineClient([u for u in nats_cluster.urls if u.split("//")[1] not in here][:1])
        await elsewhere.connect()
        try:
            far = CheckRouter(elsewhere, timeout=1.0)
            deadline = asyncio.get_running_loop().time() + 10
            while (r := await far.check(wire, group=f"pg{unique}", instance=None)).state is None:
                assert not r.reached
                assert asyncio.get_running_loop().time() < deadline, "interest never arrived"
            assert (r.reached, r.state, r.via) == (True, "COMMIT", "group")
        finally:
            await elsewhere.close()
        await sub_far.unsubscribe()
    finally:
        await gw_a.close()
        await gw_b.close()
