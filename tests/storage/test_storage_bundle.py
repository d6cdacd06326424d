"""Bundles: many messages of one queue in one record, each member readable on its own."""

from __future__ import annotations

import os
import random

import pytest

from storage import BundleTarget, IndexTarget, MessageStore, Metadata, NewBundle, NewRecord
from storage.framing import CorruptRecordError

SEG = 8192


async def _crash(path, checkpoint) -> None:
    """Make the directory look like a crash: no clean marker, ``checkpoint`` as the last one."""
    (path / "CLEAN").unlink()
    md = await Metadata.open(path / "meta.sqlite")
    if checkpoint is None:
        await md.delete("storage.checkpoint")
    else:
        await md.put("storage.checkpoint", checkpoint)
    await md.close()


def _bundle(rng: random.Random, q: int, n: int, tag: int = 0) -> NewBundle:
    return NewBundle(
        7,
        [[f"m{tag}-{k}", k] for k in range(n)],
        [rng.randbytes(rng.randrange(0, 300)) for _ in range(n)],
        BundleTarget("t", q, [tag * 100 + k for k in range(n)]),
    )


def _expand(items, stored):
    """(Stored, rtype, header, body, queue, tag) per message, in the order append returns them."""
    rows = []
    for item in items:
        if isinstance(item, NewBundle):
            for h, b, t in zip(item.headers, item.bodies, item.index.tag_hashes, strict=True):
                rows.append((item.rtype, h, b, item.index.queue_id, t))
        else:
            rows.append((item.rtype, item.header, item.body, item.index.queue_id if item.index else None,
                         item.index.tag_hash if item.index else None))
    assert len(rows) == len(stored)
    return [(st, *row) for st, row in zip(stored, rows, strict=True)]


def _check(s: MessageStore, rows) -> None:
    for st, rtype, h, b, _q, _t in rows:
        rec = s.read(st.pos)
        assert (rec.pos, rec.size, rec.rtype, rec.header, rec.body) == (st.pos, st.size, rtype, h, b)
    by_queue: dict[int, list] = {}
    for row in rows:
        if row[4] is not None:
            by_queue.setdefault(row[4], []).append(row)
    for q, want in by_queue.items():
        got = s.read_queue_records("t", q, 0, 1000)
        assert [(o, r.pos, r.header, r.body) for o, r in got] == [
            (st.queue_offset, st.pos, h, b) for st, _, h, b, _, _ in want
        ]
        assert [(e.pos, e.size, e.tag_hash) for _, e in s.read_queue("t", q, 0, 1000)] == [
            (st.pos, st.size, t) for st, *_, t in want
        ]
    logged = list(s.iter_log())
    assert [(r.pos, r.header, r.body) for r in logged] == [(st.pos, h, b) for st, _, h, b, _, _ in rows]
    for a, b in zip(logged, logged[1:], strict=False):
        assert a.next_pos <= b.pos  # (after a record, the next one may be a bundle: its members follow its framing)


async def test_bundle_members_read_like_records_from_cache_disk_and_recovery(tmp_path):
    rng = random.Random(3)
    items = []
    for k in range(30):
        if k % 3 == 0:
            items.append(NewRecord(1, {"k": k}, rng.randbytes(200), IndexTarget("t", k % 2, 5)))
        else:
            items.append(_bundle(rng, k % 2, rng.randrange(1, 12), k))
    async with MessageStore.open(tmp_path, segment_size=SEG) as s:
        stored = []
        for i in range(0, len(items), 4):
            stored += await s.append_batch(items[i : i + 4])
        assert len(s._log.segments) > 3  # bundles rolled over segment ends too
        rows = _expand(items, stored)
        _check(s, rows)  # from the recent-record cache
        # positions inside a member are not messages
        with pytest.raises(ValueError):
            s.read(rows[1][0].pos + 1)
    async with MessageStore.open(tmp_path, segment_size=SEG, cache_bytes=0) as s:
        _check(s, rows)  # from the disk
        with pytest.raises(CorruptRecordError):
            s.read(rows[1][0].pos + 1)
    # a crash with no checkpoint and no index files: the index is rebuilt from the log
    await _crash(tmp_path, None)
    for f in (tmp_path / "index").rglob("*.idx"):
        f.unlink()
    async with MessageStore.open(tmp_path, segment_size=SEG, cache_bytes=0) as s:
        assert not s.recovered_clean
        _check(s, rows)
        more = await s.append_batch([_bundle(rng, 0, 3, 99)])
        assert more[0].queue_offset == max(st.queue_offset for st, *_, q, _t in rows if q == 0) + 1


async def test_references_to_members_and_torn_bundle_tail(tmp_path):
    rng = random.Random(5)
    async with MessageStore.open(tmp_path, segment_size=SEG) as s:
        first = await s.append_batch([_bundle(rng, 0, 5, 1)])
    md = await Metadata.open(tmp_path / "meta.sqlite")
    checkpoint = await md.get("storage.checkpoint")
    await md.close()
    async with MessageStore.open(tmp_path, segment_size=SEG, cache_bytes=0) as s:
        # an entry in another queue that refers to a member (a dead letter, say)
        ref = await s.append_one(NewRecord(2, {"ref": 1}, b"", IndexTarget("dlq", 0, ref_pos=first[3].pos)))
        got = s.read_queue_records("dlq", 0, 0, 10)
        assert [(r.pos, r.header) for _, r in got] == [(first[3].pos, ["m1-3", 3])]
        second = await s.append_batch([_bundle(rng, 0, 6, 2)])
    # crash after the second bundle, torn in its middle: it is gone as a whole
    await _crash(tmp_path, checkpoint)
    at = second[3].pos + 5
    base = at - at % SEG
    os.truncate(tmp_path / "log" / f"{base:020d}", at - base)
    async with MessageStore.open(tmp_path, segment_size=SEG) as s:
        assert not s.recovered_clean
        assert [r.header for r in s.iter_log()] == [[f"m1-{k}", k] for k in range(5)] + [{"ref": 1}]
        assert s.queue_end("t", 0) == 5
        assert s.end_pos == ref.pos + ref.size
        again = await s.append_batch([_bundle(rng, 0, 2, 3)])
        assert [st.queue_offset for st in again] == [5, 6]


async def test_bad_bundles_are_refused_and_leave_nothing(tmp_path):
    async with MessageStore.open(tmp_path, segment_size=SEG) as s:
        ok = NewRecord(1, {}, b"x", IndexTarget("t", 0))
        for bad in (
            NewBundle(1, [], [], BundleTarget("t", 0, [])),
            NewBundle(1, [{}], [b"a", b"b"], BundleTarget("t", 0, [0, 0])),
            NewBundle(1, [{}, {}], [b"a", b"b"], BundleTarget("t", 0, [0])),
            NewBundle(1, [{}], [bytes(SEG)], BundleTarget("t", 0, [0])),  # larger than a segment
        ):
            with pytest.raises(ValueError):
                s.append([ok, bad])
        assert s.queue_end("t", 0) == 0
        assert (await s.append_batch([ok]))[0].queue_offset == 0


async def test_retention_deletes_whole_bundles_and_moves_queue_start(tmp_path):
    rng = random.Random(9)
    now = [1_000_000.0]
    async with MessageStore.open(tmp_path, segment_size=SEG, retention=60, clock=lambda: now[0]) as s:
        stored, items = [], []
        for k in range(40):
            items.append(_bundle(rng, 0, 6, k))
            stored += await s.append_batch(items[-1:])
        rows = _expand(items, stored)
        assert len(os.listdir(tmp_path / "log")) >= 4
        now[0] += 61
        g = len(stored) // 2  # a member in the middle of the log
        guard = stored[g]
        s.set_retention_guard(lambda: guard.pos)
        assert await s.run_retention() > 0
        assert (s.read(guard.pos).header, s.read(guard.pos).body) == rows[g][2:4]  # still readable
        survivors = [st for st in stored if st.pos >= s.start_pos]
        assert guard in survivors and len(survivors) < len(stored)
        with pytest.raises(KeyError):
            s.read(stored[0].pos)
        assert s.queue_start("t", 0) == survivors[0].queue_offset
        got = s.read_queue_records("t", 0, 0, 1000)
        assert [(o, r.pos) for o, r in got] == [(st.queue_offset, st.pos) for st in survivors]
