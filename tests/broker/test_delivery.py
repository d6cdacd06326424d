"""The delivery core with an in-memory queue reader and an injected clock: no sockets, no sleeps."""

from __future__ import annotations

from collections import Counter

import pytest

from broker.core.delivery import GroupDelivery
from broker.core.records import RT_DLQ, RT_MSG, RT_RETRY, tag_hash
from storage import IndexEntry, NewRecord, Record


class MemoryStore:
    """Just enough of MessageStore for the core: queues of index entries over records."""

    def __init__(self) -> None:
        self.records: dict[int, Record] = {}
        self.queues: dict[tuple[str, int], list[IndexEntry]] = {}
        self.pos = 0
        self.now_ms = 0

    def append(self, rec: NewRecord) -> int:
        pos = self.pos
        self.pos += 100
        self.records[pos] = Record(pos, 100, rec.rtype, self.now_ms, rec.header, rec.body, pos + 100)
        if rec.index is not None:
            target = rec.index.ref_pos if rec.index.ref_pos is not None else pos
            self.queues.setdefault((rec.index.topic, rec.index.queue_id), []).append(
                IndexEntry(target, 100, rec.index.tag_hash, self.now_ms)
            )
        return pos

    def send(self, topic: str, qid: int, body: bytes, tags: str | None = None) -> int:
        from storage import IndexTarget

        header = [topic, tags, [], {}, 0, 1]
        return self.append(NewRecord(RT_MSG, header, body, IndexTarget(topic, qid, tag_hash(tags))))

    def read_queue(self, topic, queue_id, offset, max_count):
        q = self.queues.get((topic, queue_id), [])
        return [(o, q[o]) for o in range(offset, min(len(q), offset + max_count))]

    def queue_end(self, topic, queue_id):
        return len(self.queues.get((topic, queue_id), []))

    def queue_start(self, topic, queue_id):
        return 0

    def read(self, pos):
        return self.records[pos]

    def read_queue_records(self, topic, queue_id, offset, max_count):
        return [(o, self.records[e.pos]) for o, e in self.read_queue(topic, queue_id, offset, max_count)]


def build(rec, topic, qid, off, reconsume, _=None):
    t, g, k, p, b, _e = rec.header
    return [f"id{rec.pos}", topic, rec.body, g, k, p, b, rec.store_time, qid, off, reconsume]


@pytest.fixture
def env():
    store = MemoryStore()
    gd = GroupDelivery("g", store, queue_counts=lambda t: 2 if not t.startswith("%") else 1,
                       retry_delays=(10.0, 30.0), ack_timeout=60.0)
    return store, gd


def apply(store: MemoryStore, gd: GroupDelivery, pending) -> None:
    """What the shell does with the core's records: append them, then report them durable."""
    for pr in pending if isinstance(pending, list) else [pending]:
        if pr is None:
            continue
        store.append(pr.record)
        gd.record_durable(pr.qkey, pr.offset)


def test_every_message_delivered_once_across_members_and_committed_after_acks(env):
    store, gd = env
    for i in range(10):
        store.send("t", i % 2, f"m{i}".encode())
    gd.subscribe("a", "t", tags="*", prefetch=3, max_reconsume_times=2)
    gd.subscribe("b", "t", tags="*", prefetch=3, max_reconsume_times=2)
    seen: list[bytes] = []
    per_member: Counter[str] = Counter()
    for _ in range(10):
        out, _wake = gd.poll(0.0, build)
        for member, token, wire in out:
            seen.append(wire[2])
            per_member[member] += 1
            assert gd.ack(member, token, True, 0.0) is None
    assert sorted(seen) == sorted(f"m{i}".encode() for i in range(10))
    assert per_member["a"] and per_member["b"]  # clustering: both members took part
    assert gd.committed_offsets()[("t", 0)] == 5 and gd.committed_offsets()[("t", 1)] == 5
    assert gd.lag() == 0


def test_prefetch_bounds_unacked_leases(env):
    store, gd = env
    for _ in range(20):
        store.send("t", 0, b"x")
    gd.subscribe("a", "t", tags="*", prefetch=4, max_reconsume_times=2)
    out, _ = gd.poll(0.0, build)
    assert len(out) == 4
    assert gd.poll(0.0, build)[0] == []
    gd.ack("a", out[0][1], True, 0.0)
    assert len(gd.poll(0.0, build)[0]) == 1


def test_ack_many_is_ack_one_by_one(env):
    """The shell's batch of acks: the same outcome as ``ack`` per item, in order (unknown,
    other members' and repeated tokens ignored, a failure becomes a retry record)."""
    store, gd = env
    for i in range(6):
        store.send("t", 0, f"m{i}".encode())
    gd.subscribe("a", "t", tags="*", prefetch=4, max_reconsume_times=2)
    gd.subscribe("b", "t", tags="*", prefetch=4, max_reconsume_times=2)
    out, _ = gd.poll(0.0, build)
    mine = [token for member, token, _w in out if member == "a"]
    theirs = [token for member, token, _w in out if member == "b"]
    assert len(mine) == 3 and len(theirs) == 3
    pending = gd.ack_many("a", [(mine[0], True), (theirs[0], True), (999, True), (mine[1], False),
                                (mine[0], True), (mine[2], True)], 0.0)
    assert [pr.record.rtype for pr in pending] == [RT_RETRY]
    assert gd.stats["acked"] == 2 and gd.stats["failed"] == 1
    assert len(gd.members["a"].leases) == 0 and len(gd.members["b"].leases) == 3
    assert sorted(o for _t, _q, o in gd.take_acked()) == sorted(
        w[9] for member, token, w in out if token in (mine[0], mine[2]))
    apply(store, gd, pending)
    assert gd.ack_many("b", [(t, True) for t in theirs], 0.0) == []
    assert gd.committed_offsets()[("t", 0)] == 6


def test_committed_offset_waits_for_the_lowest_unacked(env):
    store, gd = env
    for _ in range(3):
        store.send("t", 0, b"x")
    gd.subscribe("a", "t", tags="*", prefetch=10, max_reconsume_times=2)
    out, _ = gd.poll(0.0, build)
    gd.ack("a", out[1][1], True, 0.0)
    gd.ack("a", out[2][1], True, 0.0)
    assert gd.committed_offsets()[("t", 0)] == 0
    gd.ack("a", out[0][1], True, 0.0)
    assert gd.committed_offsets()[("t", 0)] == 3


def test_failure_retries_after_the_delay_with_reconsume_times_plus_one(env):
    store, gd = env
    store.send("t", 0, b"x")
    gd.subscribe("a", "t", tags="*", prefetch=10, max_reconsume_times=5)
    (member, token, wire), = gd.poll(0.0, build)[0]
    pending = gd.ack(member, token, False, 0.0)
    assert pending is not None and pending.record.rtype == RT_RETRY
    apply(store, gd, pending)
    out, wake = gd.poll(5.0, build)
    assert out == [] and wake == pytest.approx(10.0)
    (member, token, wire2), = gd.poll(10.0, build)[0]
    assert wire2[2] == b"x" and wire2[10] == 1 and wire2[0] == wire[0]
    store.now_ms = 10_000  # the retry record is stored at t=10 s
    apply(store, gd, gd.ack(member, token, False, 10.0))
    assert gd.poll(10.0 + 29.9, build)[0] == []  # second failure waits retry_delays[1]
    (member, token, wire3), = gd.poll(10.0 + 30.0, build)[0]
    assert wire3[10] == 2
    store.now_ms = 40_000
    apply(store, gd, gd.ack(member, token, False, 40.0))
    assert gd.poll(40.0 + 29.9, build)[0] == []  # past the end of retry_delays the last repeats
    (_, _, wire4), = gd.poll(40.0 + 30.0, build)[0]
    assert wire4[10] == 3


def test_last_failure_goes_to_the_dead_letter_queue(env):
    store, gd = env
    store.send("t", 0, b"x")
    gd.subscribe("a", "t", tags="*", prefetch=10, max_reconsume_times=1)
    now = 0.0
    (m, tok, _), = gd.poll(now, build)[0]
    apply(store, gd, gd.ack(m, tok, False, now))
    now = 10.0
    (m, tok, wire), = gd.poll(now, build)[0]
    assert wire[10] == 1
    pending = gd.ack(m, tok, False, now)
    assert pending.dead_letter and pending.record.rtype == RT_DLQ
    assert pending.record.index.topic == "%DLQ%g" and pending.record.index.ref_pos is not None
    apply(store, gd, pending)
    assert gd.poll(1e9, build)[0] == []  # never delivered to the group again
    assert gd.stats["dead_lettered"] == 1


def test_expired_lease_is_redelivered_to_another_member_as_an_attempt(env):
    store, gd = env
    store.send("t", 0, b"x")
    gd.subscribe("a", "t", tags="*", prefetch=10, max_reconsume_times=5)
    (m, tok, _), = gd.poll(0.0, build)[0]
    gd.member_gone("a")
    gd.subscribe("b", "t", tags="*", prefetch=10, max_reconsume_times=5)
    assert gd.expire(59.9) == []
    assert gd.next_expiry() == pytest.approx(60.0)
    apply(store, gd, gd.expire(60.0))
    (m2, tok2, wire), = gd.poll(60.0, build)[0]
    assert m2 == "b" and wire[10] == 1
    assert gd.ack("a", tok, True, 61.0) is None  # a late ack of the expired lease is ignored


def test_tag_filter_skips_other_tags(env):
    store, gd = env
    for tag in ["A", "B", "C", None, "A"]:
        store.send("t", 0, tag.encode() if tag else b"-", tags=tag)
    gd.subscribe("a", "t", tags="A || C", prefetch=10, max_reconsume_times=1)
    out, _ = gd.poll(0.0, build)
    assert [w[3] for _, _, w in out] == ["A", "C", "A"]
    for m, tok, _ in out:
        gd.ack(m, tok, True, 0.0)
    assert gd.committed_offsets()[("t", 0)] == 5


def test_start_latest_skips_the_backlog_and_saved_offsets_win(env):
    store, gd = env
    store.send("t", 0, b"old")
    gd.subscribe("a", "t", tags="*", prefetch=10, max_reconsume_times=1, start="latest")
    assert gd.poll(0.0, build)[0] == []
    store.send("t", 0, b"new")
    (_, _, wire), = gd.poll(0.0, build)[0]
    assert wire[2] == b"new"
    gd2 = GroupDelivery("g", store, queue_counts=lambda t: 2, retry_delays=(1.0,), ack_timeout=5.0,
                        offsets={("t", 0): 1})
    gd2.subscribe("x", "t", tags="*", prefetch=10, max_reconsume_times=1, start="earliest")
    (_, _, wire), = gd2.poll(0.0, build)[0]
    assert wire[2] == b"new"


def test_acked_leases_leave_no_trace_and_the_oldest_expires_first(env):
    store, gd = env
    gd.subscribe("a", "t", tags="*", prefetch=1000, max_reconsume_times=5)
    batches = []
    for i in range(3):  # 100 messages leased at t = 0, 10, 20
        for _ in range(100):
            store.send("t", 0, b"x")
        batches.append(gd.poll(i * 10.0, build)[0])
    assert [len(b) for b in batches] == [100, 100, 100]
    for batch in batches:
        for m, tok, _ in batch[1:]:
            gd.ack(m, tok, True, 25.0)
    assert len(gd.leases) == 3  # only unacked leases are held, whatever the throughput
    assert gd.next_expiry() == pytest.approx(60.0)
    assert len(gd.expire(75.0)) == 2
    assert gd.next_expiry() == pytest.approx(80.0)
