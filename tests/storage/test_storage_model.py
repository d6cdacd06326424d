"""A Hypothesis state machine: the store agrees with an in-memory model across reopen."""

from __future__ import annotations

import asyncio
import shutil
import tempfile

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from storage import BundleTarget, IndexTarget, MessageStore, NewBundle, NewRecord

SEG = 4096
QUEUES = [("a", 0), ("a", 1), ("b", 0)]

new_records = st.builds(
    lambda rtype, n, body, q: NewRecord(rtype, {"n": n}, body, None if q is None else IndexTarget(*QUEUES[q], tag_hash=n)),
    st.integers(0, 255),
    st.integers(0, 2**31),
    st.binary(max_size=900),
    st.none() | st.integers(0, len(QUEUES) - 1),
)

new_bundles = st.builds(
    lambda rtype, q, items: NewBundle(
        rtype, [{"m": n} for n, _ in items], [b for _, b in items], BundleTarget(*QUEUES[q], [n for n, _ in items])
    ),
    st.integers(0, 255),
    st.integers(0, len(QUEUES) - 1),
    st.lists(st.tuples(st.integers(0, 2**31), st.binary(max_size=300)), min_size=1, max_size=8),
)


def _messages(items):
    """A bundle's members as the records they read back as."""
    out = []
    for r in items:
        if isinstance(r, NewBundle):
            out += [NewRecord(r.rtype, h, b, IndexTarget(*r.index[:2], tag_hash=t))
                    for h, b, t in zip(r.headers, r.bodies, r.index.tag_hashes, strict=True)]
        else:
            out.append(r)
    return out


class StoreModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="halfmq-sm-")
        self.loop = asyncio.new_event_loop()
        self.store = self.run(MessageStore.open(self.dir, segment_size=SEG))
        self.records: dict[int, NewRecord] = {}  # pos -> record
        self.order: list[int] = []
        self.bundled: list[dict] = []  # headers of bundle members
        self.queues: dict[tuple[str, int], list[tuple[int, int]]] = {q: [] for q in QUEUES}

    def run(self, aw):
        return self.loop.run_until_complete(aw)

    def _remember(self, recs, stored) -> None:
        for r, s in zip(recs, stored, strict=True):
            self.records[s.pos] = r
            self.order.append(s.pos)
            if r.index is not None:
                key = (r.index.topic, r.index.queue_id)
                target = s.pos if r.index.ref_pos is None else r.index.ref_pos
                assert s.queue_offset == len(self.queues[key])
                self.queues[key].append((target, s.pos))

    @rule(r=new_records)
    def append_one(self, r) -> None:
        s = self.run(self.store.append_one(r))
        self._remember([r], [s])

    @rule(rs=st.lists(new_records | new_bundles, max_size=12))
    def append_batch(self, rs) -> None:
        stored = self.run(self.store.append_batch(rs))
        self._remember(_messages(rs), stored)
        self.bundled += [h for r in rs if isinstance(r, NewBundle) for h in r.headers]

    @precondition(lambda self: self.order)
    @rule(data=st.data(), q=st.integers(0, len(QUEUES) - 1))
    def commit_ref(self, data, q) -> None:
        ref = data.draw(st.sampled_from(self.order))
        r = NewRecord(9, {"ref": ref}, b"", IndexTarget(*QUEUES[q], ref_pos=ref))
        self._remember([r], [self.run(self.store.append_one(r))])

    @precondition(lambda self: self.order)
    @rule(data=st.data())
    def read(self, data) -> None:
        pos = data.draw(st.sampled_from(self.order))
        got = self.store.read(pos)
        want = self.records[pos]
        assert (got.rtype, got.header, got.body) == (want.rtype, want.header, want.body)

    @rule(q=st.integers(0, len(QUEUES) - 1), offset=st.integers(0, 60), count=st.integers(0, 20))
    def read_queue(self, q, offset, count) -> None:
        key = QUEUES[q]
        model = self.queues[key][offset : offset + count]
        got = self.store.read_queue_records(*key, offset, count)
        assert [o for o, _ in got] == list(range(offset, offset + len(model)))
        for (_, rec), (target, _) in zip(got, model, strict=True):
            want = self.records[target]
            assert rec.pos == target and rec.body == want.body and rec.header == want.header

    @rule(clean=st.booleans())
    def reopen(self, clean) -> None:
        self.run(self.store.close())
        if not clean:  # pretend a crash: no marker, so recovery scans from the checkpoint
            import os

            os.unlink(os.path.join(self.dir, "CLEAN"))
        self.store = self.run(MessageStore.open(self.dir, segment_size=SEG))
        assert self.store.recovered_clean == clean

    @invariant()
    def ends_agree(self) -> None:
        for key, entries in self.queues.items():
            assert self.store.queue_end(*key) == len(entries)
        end = max((p + self.store.read(p).size for p in self.order[-1:]), default=0)
        if self.order and self.store.read(self.order[-1]).header in self.bundled:
            assert self.store.end_pos >= end  # a bundle's bodies follow its member markers
        else:
            assert self.store.end_pos == end

    def teardown(self) -> None:
        self.run(self.store.close())
        self.loop.close()
        shutil.rmtree(self.dir, ignore_errors=True)


StoreModel.TestCase.settings = settings(
    max_examples=30,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestStoreModel = StoreModel.TestCase


def test_iter_log_matches_model_after_many_rollovers(tmp_path):
    async def main():
        async with MessageStore.open(tmp_path, segment_size=SEG) as s:
            stored = []
            for k in range(20):
                stored += await s.append_batch([NewRecord(1, {"k": k, "j": j}, b"z" * (37 * j)) for j in range(10)])
        async with MessageStore.open(tmp_path, segment_size=SEG) as s:
            got = list(s.iter_log())
            assert [r.pos for r in got] == [x.pos for x in stored]
            mid = stored[77].pos
            assert [r.pos for r in s.iter_log(mid)] == [x.pos for x in stored[77:]]

    asyncio.run(main())


def test_a_record_built_through_its_row_is_the_constructors_record() -> None:
    import dataclasses

    import pytest

    from storage import Record
    from storage.framing import _Row, make_record

    assert _Row.__slots__ == tuple(f.name for f in dataclasses.fields(Record))
    r = make_record(8, 100, 1, 1234, {"a": 1}, b"body", 108)
    assert type(r) is Record
    assert r == Record(8, 100, 1, 1234, {"a": 1}, b"body", 108)
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.pos = 9  # type: ignore[misc]
