"""FIFO consumer groups and message groups on ``JetStreamEngine`` (a real cluster)."""

from __future__ import annotations

import asyncio
import zlib

import pytest

from protocol.errors import BadRequestError
from tests.cluster.sessions import RecordingSession, Sub
from tests.cluster.test_engine import _ack, _holds, _rows, _send, _subscribe
from tests.conftest import wait_for

pytestmark = pytest.mark.timeout(90)


def _groups_on(queue: int, n: int, queues: int = 4, prefix: str = "order") -> list[str]:
    """``n`` message-group names whose messages go to ``queue``."""
    out, i = [], 0
    while len(out) < n:
        name = f"{prefix}-{i}"
        if zlib.crc32(name.encode()) % queues == queue:
            out.append(name)
        i += 1
    return out


def _fifo(group: str, topic: str, **kw) -> Sub:
    sub = Sub(group, topic, **kw)
    sub.fifo = True
    return sub


async def _consume_in_order(engine, members, expected: dict[str, list[bytes]], fail_first: set[str]):
    """Ack deliveries as they come (failing the first delivery of each group in
    ``fail_first`` once) and check that a group never has two messages out and arrives
    in send order; returns the groups in the order their first message was acked."""
    out: dict[str, str] = {}  # message group -> conn_id holding its message
    seen: dict[str, list[bytes]] = {g: [] for g in expected}
    done_order: list[str] = []
    cursor = {m.conn_id: 0 for m in members}
    failed: set[str] = set()

    def total() -> int:
        return sum(len(v) for v in seen.values())

    want = sum(len(v) for v in expected.values())
    while total() < want:
        await wait_for(lambda: any(len(m.deliveries) > cursor[m.conn_id] for m in members), timeout=20,
                       what=f"deliveries ({total()} of {want} acked)")
        for m in members:
            batch = m.deliveries[cursor[m.conn_id]:]
            cursor[m.conn_id] += len(batch)
            acks = []
            for token, wire in batch:
                g = wire[11]["g"]
                assert g not in out, f"group {g}: a second message out before the first was settled"
                if g in fail_first and g not in failed:
                    failed.add(g)
                    acks.append((token, False))
                    continue
                seen[g].append(wire[2])
                assert seen[g] == expected[g][:len(seen[g])], f"group {g} out of order: {seen[g]}"
                if len(seen[g]) == 1:
                    done_order.append(g)
                acks.append((token, True))
            if acks:
                await _ack(engine[m.conn_id] if isinstance(engine, dict) else engine, m, acks)
    return done_order


async def test_fifo_groups_in_order_across_two_gateways(engine_factory, unique):
    a = await engine_factory(retry_delays=(0.3,))
    b = await engine_factory(retry_delays=(0.3,))
    p = RecordingSession(role="producer")
    groups = [g for q in range(4) for g in _groups_on(q, 2)]
    expected = {g: [f"{g}:{i}".encode() for i in range(6)] for g in groups}
    for i in range(6):  # interleaved sends, one batch per round
        await _send(a, p, unique, [[*r, {"group": g}] for g in groups for r in _rows(expected[g][i])])
    ma, mb = RecordingSession(role="consumer"), RecordingSession(role="consumer")
    await _subscribe(a, ma, _fifo(f"g{unique}", unique))
    await _subscribe(b, mb, _fifo(f"g{unique}", unique))
    engines = {ma.conn_id: a, mb.conn_id: b}
    await _consume_in_order(engines, [ma, mb], expected, fail_first={groups[0], groups[3]})
    assert (await a.admin_group_settings(f"g{unique}"))["fifo"] is True
    listed = {g["group"]: g for g in await a.admin_groups()}[f"g{unique}"]  # its queues' consumers, summed
    assert listed["topics"] == [unique] and listed["members"] == 1 and listed["in_flight"] == 0
    assert ma.deliveries and mb.deliveries  # both gateways took part


async def test_fifo_holds_its_queue_and_refusals(engine_factory, unique):
    """Cluster mode difference (README): the unit of order is the queue, so a failing
    message also holds the other message groups of its queue; other queues go on."""
    engine = await engine_factory(retry_delays=(0.1,))
    await engine.admin_set_group_settings(f"g{unique}", fifo=True, retry_delays=[1.0])  # the group's own
    p = RecordingSession(role="producer")
    x, y = _groups_on(1, 2, prefix="x")
    (z,) = _groups_on(2, 1, prefix="z")
    await _send(engine, p, unique, [[*_rows(b"x1")[0], {"group": x}], [*_rows(b"y1")[0], {"group": y}],
                                    [*_rows(b"z1")[0], {"group": z}]])
    c = RecordingSession(role="consumer")
    await _subscribe(engine, c, _fifo(f"g{unique}", unique))
    await wait_for(lambda: len(c.deliveries) == 2, what="the heads of queues 1 and 2")
    assert sorted(w[2] for _t, w in c.deliveries) == [b"x1", b"z1"]
    t_x = next(t for t, w in c.deliveries if w[2] == b"x1")
    await _ack(engine, c, [(t, w[2] != b"x1") for t, w in c.deliveries])  # x1 fails: back in 1 s
    await _holds(lambda: len(c.deliveries) == 2, 0.6)  # y1 waits behind x1 (same queue)
    await wait_for(lambda: len(c.deliveries) == 3, what="x1 again")
    assert c.deliveries[2][1][2] == b"x1" and c.deliveries[2][1][10] == 1 and t_x != c.deliveries[2][0]
    await _ack(engine, c, [(c.deliveries[2][0], True)])
    await wait_for(lambda: len(c.deliveries) == 4, what="y1 after x1")
    assert c.deliveries[3][1][2] == b"y1"
    await _ack(engine, c, [(c.deliveries[3][0], True)])
    # an existing group that is not FIFO is not turned FIFO by a subscription
    plain = RecordingSession(role="consumer")
    await _subscribe(engine, plain, Sub(f"p{unique}", unique))
    other = RecordingSession(role="consumer")
    rid = other.rid()
    engine.subscribe(other, rid, _fifo(f"p{unique}", unique))
    await wait_for(lambda: other.answered(rid), what="the refusal")
    assert isinstance(other.errors[rid], BadRequestError) and "not FIFO" in str(other.errors[rid])
    with pytest.raises(BadRequestError, match="max_attempts"):
        await engine.admin_set_group_settings(f"p{unique}", max_attempts=0)


async def test_receive_on_a_fifo_group_one_message_per_queue_at_a_time(engine_factory, unique):
    from tests.cluster.test_pulling import _receive, _settle

    engine = await engine_factory()
    await engine.admin_set_group_settings(f"g{unique}", fifo=True)
    p, c = RecordingSession(role="producer"), RecordingSession(role="consumer")
    (a,) = _groups_on(0, 1)
    (b,) = _groups_on(3, 1)
    await _send(engine, p, unique, [[*_rows(f"{g}{i}".encode())[0], {"group": g}] for g in (a, b) for i in range(3)])
    heads = await _receive(engine, c, f"g{unique}", unique, n=8, wait=5000)
    assert sorted(w[2] for _h, w in heads) == sorted([f"{a}0".encode(), f"{b}0".encode()])  # one per queue
    assert await _receive(engine, c, f"g{unique}", unique, wait=300) == []  # both held
    (ha,) = [h for h, w in heads if w[11]["g"] == a]
    (hb,) = [h for h, w in heads if w[11]["g"] == b]
    assert await _settle(engine, c, f"g{unique}", [[ha, "nack", 200], [hb, "ack", 0]]) == [True, True]
    seen = {a: [], b: []}
    seen[b].append(b"x")  # b0 acked
    while len(seen[a]) < 3 or len(seen[b]) < 3:
        got = await _receive(engine, c, f"g{unique}", unique, n=8, wait=5000)
        assert got, seen
        for h, w in got:
            g = w[11]["g"]
            if g == a and not seen[a]:
                assert w[2] == f"{a}0".encode() and w[10] == 1  # the nacked head, again
            else:
                assert w[2] == f"{g}{len(seen[g])}".encode(), (g, w[2])
            seen[g].append(w[2])
            assert await _settle(engine, c, f"g{unique}", [[h, "ack", 0]]) == [True]


async def test_fifo_order_over_many_groups_when_a_member_dies_mid_lease(engine_factory, unique):
    """Two gateways, one member each; one dies holding unacked messages: each of them comes
    back (after --ack-timeout) to the survivor before anything later of its queue."""
    a = await engine_factory(ack_timeout=2.0)
    b = await engine_factory(ack_timeout=2.0)
    p = RecordingSession(role="producer")
    groups = [f"order-{i}" for i in range(200)]
    for i in range(3):
        await _send(a, p, unique, [[*_rows(b"%d" % i)[0], {"group": g}] for g in groups])
    ma, mb = RecordingSession(role="consumer"), RecordingSession(role="consumer")
    await _subscribe(a, ma, _fifo(f"g{unique}", unique))
    await _subscribe(b, mb, _fifo(f"g{unique}", unique))
    acked = {g: 0 for g in groups}  # next expected message index per group
    done_b = 0
    died = False
    deadline = asyncio.get_running_loop().time() + 60
    while sum(acked.values()) < 3 * len(groups):
        assert asyncio.get_running_loop().time() < deadline, f"{sum(acked.values())} acked"
        if not died and ma.deliveries and sum(acked.values()) > 150:
            ma.closed = True  # dies holding what it got and did not ack
            a.session_closed(ma)
            died = True
        if not died:
            batch = ma.deliveries[:]
            ma.deliveries.clear()
            for _t, w in batch:
                assert int(w[2]) == acked[w[11]["g"]], (w[11]["g"], w[2])
                acked[w[11]["g"]] += 1
            if batch:
                await _ack(a, ma, [(t, True) for t, _w in batch])
        batch = mb.deliveries[done_b:]
        done_b += len(batch)
        for _t, w in batch:
            assert int(w[2]) == acked[w[11]["g"]], (w[11]["g"], w[2], acked[w[11]["g"]])
            acked[w[11]["g"]] += 1
        if batch:
            await _ack(b, mb, [(t, True) for t, _w in batch])
        await asyncio.sleep(0.01)
    assert died
