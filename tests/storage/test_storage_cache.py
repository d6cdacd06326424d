"""The recent-record cache and the batched encode/read paths agree with the disk."""

from __future__ import annotations

import os
import random

import pytest

from storage import IndexTarget, MessageStore, Metadata, NewRecord

SEG = 4096


def _records(rng: random.Random, n: int, tag: int = 0) -> list[NewRecord]:
    return [
        NewRecord(
            rng.randrange(256),
            {"i": i, "tag": tag},
            rng.randbytes(rng.randrange(0, 900)),
            IndexTarget("q", i % 3, i) if rng.random() < 0.8 else None,
        )
        for i in range(n)
    ]


def _disk_read(s: MessageStore, pos: int):
    return s._log.read(pos)  # bypasses the cache


async def test_cache_reads_equal_disk_reads(tmp_path):
    rng = random.Random(7)
    async with MessageStore.open(tmp_path, segment_size=SEG) as s:
        stored = []
        for k in range(12):
            stored += await s.append_batch(_records(rng, 15, k))
        stored.append(await s.append_one(NewRecord(1, {"last": True}, b"tail")))
        assert s._rc_bytes > 0 and s._rc_lo <= stored[0].pos  # everything is cached
        for st in stored:
            cached = s.read(st.pos)
            assert cached == _disk_read(s, st.pos)
            assert (cached.pos, cached.size, cached.store_time) == (st.pos, st.size, st.store_time)
        # next_pos chains through the gaps at segment ends, as on disk
        recs = [s.read(st.pos) for st in stored]
        for a, b in zip(recs, recs[1:], strict=False):
            assert a.next_pos == b.pos
        assert list(s.iter_log()) == recs
        for q in range(3):
            got = s.read_queue_records("q", q, 0, 1000)
            assert [r for _, r in got] == [_disk_read(s, e.pos) for _, e in s.read_queue("q", q, 0, 1000)]
        with pytest.raises(ValueError):
            s.read(stored[3].pos + 1)  # not a record start, served by the cache
        with pytest.raises(KeyError):
            s.read(s.end_pos)
    # the same store without a cache gives the same answers
    async with MessageStore.open(tmp_path, segment_size=SEG, cache_bytes=0) as s:
        assert s._rc_bytes == 0
        assert [s.read(st.pos) for st in stored] == recs
        with pytest.raises(ValueError):
            s.read(stored[3].pos + 1)


async def test_cache_is_bounded_and_evicted_reads_fall_back_to_disk(tmp_path):
    rng = random.Random(3)
    async with MessageStore.open(tmp_path, cache_bytes=20_000) as s:
        stored = []
        for k in range(40):
            stored += await s.append_batch(_records(rng, 10, k))
        assert s._rc_bytes <= 20_000 + 10 * 1000
        assert s._rc_lo > stored[0].pos  # old records were evicted
        for st in stored:
            assert s.read(st.pos) == _disk_read(s, st.pos)
        for q in range(3):
            ents = s.read_queue("q", q, 0, 1000)
            got = s.read_queue_records("q", q, 0, 1000)
            assert [(o, r.pos) for o, r in got] == [(o, e.pos) for o, e in ents]


async def test_cache_never_serves_truncated_records_after_crash(tmp_path):
    rng = random.Random(11)
    async with MessageStore.open(tmp_path, segment_size=SEG) as s:
        first = await s.append_batch(_records(rng, 20, 1))
    md = await Metadata.open(tmp_path / "meta.sqlite")
    checkpoint = await md.get("storage.checkpoint")
    await md.close()
    async with MessageStore.open(tmp_path, segment_size=SEG) as s:
        second = await s.append_batch(_records(rng, 20, 2))
        # cached in this process: reads come from memory
        assert s.read(second[-1].pos).header == {"i": 19, "tag": 2}
    # crash: torn tail in the middle of the second batch, no marker, old checkpoint
    (tmp_path / "CLEAN").unlink()
    md = await Metadata.open(tmp_path / "meta.sqlite")
    await md.put("storage.checkpoint", checkpoint)
    await md.close()
    cut = second[10].pos + 5
    base = cut - cut % SEG
    os.truncate(tmp_path / "log" / f"{base:020d}", cut - base)
    for f in os.listdir(tmp_path / "log"):
        if int(f) > base:
            os.unlink(tmp_path / "log" / f)
    async with MessageStore.open(tmp_path, segment_size=SEG) as s:
        assert not s.recovered_clean
        assert s.end_pos == second[10].pos
        for st in second[10:]:
            with pytest.raises(KeyError):
                s.read(st.pos)
        # new records reuse the truncated positions: reads must return the new ones
        again = await s.append_batch([NewRecord(5, {"new": i}, b"n%d" % i, IndexTarget("q", 0)) for i in range(30)])
        assert again[0].pos == second[10].pos
        for i, st in enumerate(again):
            r = s.read(st.pos)
            assert (r.rtype, r.header, r.body) == (5, {"new": i}, b"n%d" % i)
            assert r == _disk_read(s, st.pos)
        got = list(s.iter_log())
        assert [r.pos for r in got] == [x.pos for x in first + second[:10] + again]
        tail = s.read_queue_records("q", 0, again[0].queue_offset, 100)
        assert [r.header for _, r in tail] == [{"new": i} for i in range(30)]


async def test_retention_drops_cached_records(tmp_path):
    now = [1_000_000.0]
    async with MessageStore.open(tmp_path, segment_size=SEG, retention=10, clock=lambda: now[0]) as s:
        stored = await s.append_batch([NewRecord(1, {"i": i}, b"x" * 300, IndexTarget("t", 0)) for i in range(60)])
        assert s.read(stored[0].pos).header == {"i": 0}  # cached
        now[0] += 11
        assert await s.run_retention() > 0
        for st in stored:
            if st.pos < s.start_pos:
                with pytest.raises(KeyError):
                    s.read(st.pos)
            else:
                assert s.read(st.pos) == _disk_read(s, st.pos)
        got = s.read_queue_records("t", 0, 0, 100)
        assert [r.pos for _, r in got] == [st.pos for st in stored if st.pos >= s.start_pos]


async def test_failed_append_rolls_back_only_its_own_records(tmp_path):
    async with MessageStore.open(tmp_path, segment_size=SEG) as s:
        ok1, fut1 = s.append([NewRecord(1, {"a": i}, b"a" * 200, IndexTarget("t", 0)) for i in range(5)])
        bad = [NewRecord(1, {"b": i}, b"b" * 500, IndexTarget("t", i % 2)) for i in range(12)]
        bad.append(NewRecord(1, {}, b"x" * 5000))  # too large: the whole call fails
        with pytest.raises(ValueError):
            s.append(bad)
        with pytest.raises(KeyError):
            s.append([NewRecord(1, {"c": 0}, b"c", IndexTarget("t", 1)),
                      NewRecord(3, {}, b"", IndexTarget("t", 0, ref_pos=ok1[2].pos + 1))])
        ok2, fut2 = s.append([NewRecord(1, {"d": i}, b"d" * 900, IndexTarget("t", 0)) for i in range(6)])
        ref, fut3 = s.append([NewRecord(3, {}, b"", IndexTarget("t", 1, ref_pos=ok2[4].pos))])  # in flight
        await fut1
        await fut2
        await fut3
        assert [st.queue_offset for st in ok1 + ok2] == list(range(11))
        assert ok2[0].pos == ok1[-1].pos + ok1[-1].size or ok2[0].pos % SEG == 0
        got = [(r.pos, r.header) for r in s.iter_log()]
        assert got == [(st.pos, {"a": i}) for i, st in enumerate(ok1)] + [
            (st.pos, {"d": i}) for i, st in enumerate(ok2)
        ] + [(ref[0].pos, {})]
        assert s.queue_end("t", 0) == 11 and s.queue_end("t", 1) == 1
        [(_, entry)] = s.read_queue("t", 1, 0, 10)
        assert (entry.pos, entry.size) == (ok2[4].pos, ok2[4].size)
    async with MessageStore.open(tmp_path, segment_size=SEG) as s:
        assert [r.header for _, r in s.read_queue_records("t", 0, 0, 100)] == [{"a": i} for i in range(5)] + [
            {"d": i} for i in range(6)
        ]


async def test_read_queue_records_spans_sparse_and_backward_entries(tmp_path):
    """Entries of one queue interleaved with others, and ref entries pointing backwards."""
    async with MessageStore.open(tmp_path, cache_bytes=0) as s:
        stored = await s.append_batch([NewRecord(1, {"i": i}, b"z" * (i * 7), IndexTarget("t", i % 4)) for i in range(400)])
        refs = await s.append_batch(
            [NewRecord(3, {}, b"", IndexTarget("t", 0, ref_pos=stored[k].pos)) for k in (399, 5, 200, 6)]
        )
        assert refs[0].queue_offset == 100
        got = s.read_queue_records("t", 0, 0, 1000)
        want = [stored[i].pos for i in range(0, 400, 4)] + [stored[k].pos for k in (399, 5, 200, 6)]
        assert [r.pos for _, r in got] == want
        assert [o for o, _ in got] == list(range(104))
        for _, r in got:
            assert r == s.read(r.pos)


async def test_sequential_disk_reads_match_scan(tmp_path):
    """read(entry.pos) walking interleaved queues (served by the read-ahead buffer) equals the log scan."""
    rng = random.Random(5)
    async with MessageStore.open(tmp_path, segment_size=64 * 1024, cache_bytes=0) as s:
        for k in range(30):
            await s.append_batch(_records(rng, 20, k))
        by_pos = {r.pos: r for r in s.iter_log()}
        n = 0
        for q in range(3):
            for _, e in s.read_queue("q", q, 0, 10_000):
                assert s.read(e.pos) == by_pos[e.pos]
                n += 1
        assert n == sum(s.queue_end("q", q) for q in range(3)) > 300
        for pos in sorted(by_pos, reverse=True)[:50]:  # backwards too
            assert s.read(pos) == by_pos[pos]
        with pytest.raises(ValueError):
            s.read(sorted(by_pos)[7] + 3)
