"""The delivery core's FIFO order, pull requests and per-lease deadlines, with an injected
clock and an in-memory queue reader (no sockets, no sleeps)."""

from __future__ import annotations

import pytest

from broker.core.delivery import EXPIRED_LEVEL, GroupDelivery, StaleHandleError
from broker.core.records import RT_MSG, RT_RETRY, message_header, tag_hash
from storage import IndexTarget, NewRecord
from tests.broker.test_delivery import MemoryStore


def build(rec, topic, qid, off, reconsume, _=None):
    t, g, k, p, b = rec.header[:5]
    return [f"id{rec.pos}", topic, rec.body, g, k, p, b, rec.store_time, qid, off, reconsume]


def send(store: MemoryStore, body: bytes, group: str | None, qid: int = 0) -> int:
    header = message_header("t", None, [], {}, 0, 1, {"g": group} if group else None)
    return store.append(NewRecord(RT_MSG, header, body, IndexTarget("t", qid, tag_hash(None))))


def apply(store: MemoryStore, gd: GroupDelivery, pending) -> None:
    for pr in pending if isinstance(pending, list) else [pending]:
        if pr is not None:
            store.append(pr.record)
            gd.durable(pr)


def fifo_group(store: MemoryStore, **kw) -> GroupDelivery:
    return GroupDelivery("g", store, queue_counts=lambda t: 1, retry_delays=(10.0, 30.0), ack_timeout=60.0,
                         fifo=True, **kw)


def bodies(out) -> list[bytes]:
    return [w[2] for _m, _t, w in out]


def test_fifo_one_message_per_group_at_a_time_other_groups_go_on():
    store = MemoryStore()
    for i in range(3):
        send(store, f"a{i}".encode(), "A")
        send(store, f"b{i}".encode(), "B")
    gd = fifo_group(store)
    gd.subscribe("m1", "t", tags="*", prefetch=10, max_reconsume_times=5)
    gd.subscribe("m2", "t", tags="*", prefetch=10, max_reconsume_times=5)
    out, _ = gd.poll(0.0, build)
    assert sorted(bodies(out)) == [b"a0", b"b0"]  # one of each group, whatever the room
    by_body = {w[2]: (m, t) for m, t, w in out}
    assert gd.poll(0.0, build)[0] == []
    gd.ack(*by_body[b"a0"], True, 0.0)
    out, _ = gd.poll(0.0, build)
    assert bodies(out) == [b"a1"]  # a1 after a0, b still held by b0
    by_body.update({w[2]: (m, t) for m, t, w in out})
    gd.ack(*by_body[b"b0"], True, 0.0)
    gd.ack(*by_body[b"a1"], True, 0.0)
    out, _ = gd.poll(0.0, build)
    assert sorted(bodies(out)) == [b"a2", b"b1"]


def test_fifo_failure_holds_its_group_through_the_retry():
    store = MemoryStore()
    send(store, b"a0", "A")
    send(store, b"a1", "A")
    send(store, b"x", None)
    gd = fifo_group(store)
    gd.subscribe("m", "t", tags="*", prefetch=10, max_reconsume_times=5)
    out, _ = gd.poll(0.0, build)
    assert bodies(out) == [b"a0", b"x"]  # messages without a group are not ordered
    (m, tok, _w) = out[0]
    apply(store, gd, gd.ack(m, tok, False, 0.0))
    assert gd.poll(5.0, build)[0] == []  # a1 must not overtake a0 while a0 waits its retry
    out, _ = gd.poll(10.0, build)
    assert bodies(out) == [b"a0"] and out[0][2][10] == 1
    gd.ack(out[0][0], out[0][1], True, 10.0)
    assert bodies(gd.poll(10.0, build)[0]) == [b"a1"]


def test_fifo_dead_letter_releases_the_group_when_durable():
    store = MemoryStore()
    send(store, b"a0", "A")
    send(store, b"a1", "A")
    gd = fifo_group(store)
    gd.subscribe("m", "t", tags="*", prefetch=10, max_reconsume_times=0)
    (m, tok, _w), = gd.poll(0.0, build)[0]
    pr = gd.ack(m, tok, False, 0.0)
    assert pr.dead_letter
    assert gd.poll(1.0, build)[0] == []  # not before the dead letter is stored
    apply(store, gd, pr)
    assert bodies(gd.poll(1.0, build)[0]) == [b"a1"]


def test_fifo_reads_no_further_than_the_lookahead(monkeypatch):
    import broker.core.delivery as delivery

    monkeypatch.setattr(delivery, "LOOKAHEAD", 5)
    store = MemoryStore()
    for i in range(20):
        send(store, f"a{i}".encode(), "A")
    gd = fifo_group(store)
    gd.subscribe("m", "t", tags="*", prefetch=100, max_reconsume_times=5)
    gd.poll(0.0, build)
    cur = gd.cursors[("t", 0)]
    assert cur.next_offset == 5 and len(gd.fifo.parked["A"]) == 4


def test_fifo_recovery_blocks_a_group_with_a_pending_retry():
    store = MemoryStore()
    a0 = send(store, b"a0", "A")
    send(store, b"a1", "A")
    store.append(NewRecord(RT_RETRY, {"id": f"id{a0}", "rp": a0, "rt": 1, "ot": "t", "oq": 0, "oo": 0, "g": "g"},
                           b"", IndexTarget("%RETRY%g", 0, 0)))
    gd = fifo_group(store, offsets={("t", 0): 0})
    gd.subscribe("m", "t", tags="*", prefetch=10, max_reconsume_times=5)
    assert gd.poll(1.0, build)[0] == []  # a0 is skipped (retried), a1 waits behind it
    out, _ = gd.poll(10.0, build)
    assert bodies(out) == [b"a0"]
    gd.ack(out[0][0], out[0][1], True, 10.0)
    assert bodies(gd.poll(10.0, build)[0]) == [b"a1"]


def test_pull_leases_have_their_own_deadlines_and_handles():
    store = MemoryStore()
    for i in range(3):
        send(store, f"m{i}".encode(), None)
    gd = GroupDelivery("g", store, queue_counts=lambda t: 1, retry_delays=(10.0,), ack_timeout=60.0)
    gd.add_receiver("r1", "t", tags="*", max_messages=2, invisible=5.0)
    out, _ = gd.poll(0.0, build)
    assert [m for m, _t, _w in out] == ["r1", "r1"]
    gd.member_gone("r1")
    h0, h1 = gd.handle(out[0][1]), gd.handle(out[1][1])
    gd.add_receiver("r2", "t", tags="*", max_messages=5, invisible=100.0)
    out2, _ = gd.poll(0.0, build)
    assert bodies(out2) == [b"m2"]
    gd.member_gone("r2")
    assert gd.settle(h0, "ack", 0, 1.0) == (None, None)
    with pytest.raises(StaleHandleError):
        gd.settle(h0, "ack", 0, 1.0)  # acked already
    new = gd.settle(h1, "cid", 20_000, 1.0)[1]
    with pytest.raises(StaleHandleError):
        gd.settle(h1, "ack", 0, 1.0)  # changed: the old handle is stale
    assert gd.expire(10.0) == []  # moved to 21.0
    assert gd.next_expiry() == pytest.approx(21.0)
    (pr,) = gd.expire(21.0)
    assert pr.record.index.queue_id == EXPIRED_LEVEL and pr.record.header["rt"] == 1
    with pytest.raises(StaleHandleError):
        gd.settle(new, "ack", 0, 21.0)


def test_nack_redelivers_after_its_delay_with_one_more_attempt():
    store = MemoryStore()
    send(store, b"m", None)
    gd = GroupDelivery("g", store, queue_counts=lambda t: 1, retry_delays=(10.0,), ack_timeout=60.0)
    gd.add_receiver("r", "t", tags="*", max_messages=1, invisible=30.0)
    (_m, tok, _w), = gd.poll(0.0, build)[0]
    gd.member_gone("r")
    gd.settle(gd.handle(tok), "nack", 2000, 0.0)
    assert gd.expire(1.9) == []
    apply(store, gd, gd.expire(2.0))
    gd.add_receiver("r2", "t", tags="*", max_messages=1, invisible=30.0)
    (_m, _tok, w), = gd.poll(2.0, build)[0]
    assert w[2] == b"m" and w[10] == 1


def test_group_settings_override_the_subscription():
    store = MemoryStore()
    send(store, b"m", None)
    gd = GroupDelivery("g", store, queue_counts=lambda t: 1, retry_delays=(10.0,), ack_timeout=60.0,
                       max_reconsume_times=0)
    gd.subscribe("m", "t", tags="*", prefetch=1, max_reconsume_times=16)
    (m, tok, _w), = gd.poll(0.0, build)[0]
    assert gd.ack(m, tok, False, 0.0).dead_letter  # one attempt allowed by the group
    gd.configure(retry_delays=(1.0, 2.0, 3.0), max_reconsume_times=None)
    assert 2 in gd._retry_levels


def test_renew_moves_the_deadline_and_keeps_the_handle():
    store = MemoryStore()
    send(store, b"m", None)
    gd = GroupDelivery("g", store, queue_counts=lambda t: 1, retry_delays=(10.0,), ack_timeout=60.0)
    gd.add_receiver("r", "t", tags="*", max_messages=1, invisible=5.0)
    (_m, tok, _w), = gd.poll(0.0, build)[0]
    gd.member_gone("r")
    handle = gd.handle(tok)
    assert gd.settle(handle, "renew", 10_000, 4.0) == (None, None)
    assert gd.expire(5.0) == []  # the first deadline no longer counts
    assert gd.next_expiry() == pytest.approx(14.0)
    assert gd.handle(tok) == handle
    assert gd.settle(handle, "ack", 0, 6.0) == (None, None)  # the same handle still acks
    assert gd.expire(20.0) == []


def test_dlq_action_dead_letters_at_once_and_releases_a_fifo_group():
    store = MemoryStore()
    send(store, b"a0", "A")
    send(store, b"a1", "A")
    gd = fifo_group(store)
    gd.add_receiver("r", "t", tags="*", max_messages=5, invisible=30.0)
    (_m, tok, w), = gd.poll(0.0, build)[0]
    gd.member_gone("r")
    assert w[2] == b"a0"
    pr, new = gd.settle(gd.handle(tok), "dlq", 0, 1.0)
    assert new is None and pr.dead_letter and pr.record.index.topic == "%DLQ%g"
    with pytest.raises(StaleHandleError):
        gd.handle(tok)
    apply(store, gd, pr)
    gd.add_receiver("r2", "t", tags="*", max_messages=5, invisible=30.0)
    assert bodies(gd.poll(1.0, build)[0]) == [b"a1"]  # the group goes on after its dead letter
