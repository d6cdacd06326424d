"""Storage behaviour: round trips, group commit, lock, clean marker, retention, ref_pos."""

from __future__ import annotations

import asyncio
import os
import subprocess
import zlib

import pytest

from storage import (
    DataDirLockedError,
    IndexTarget,
    MessageStore,
    Metadata,
    NewRecord,
    StoreClosedError,
)


def rec(i: int, topic: str = "t", qid: int = 0, body: bytes | None = None) -> NewRecord:
    return NewRecord(7, {"i": i}, body if body is not None else b"body-%d" % i, IndexTarget(topic, qid, zlib.crc32(b"tag")))


async def test_round_trip_and_reopen(tmp_path):
    async with MessageStore.open(tmp_path, segment_size=4096) as s:
        assert s.epoch == 1
        stored = await s.append_batch([rec(i, qid=i % 3) for i in range(200)])
        one = await s.append_one(NewRecord(1, {"x": [1, 2]}, b""))
        assert one.queue_offset == -1
        assert [st.queue_offset for st in stored[:6]] == [0, 0, 0, 1, 1, 1]
        assert s.read(stored[5].pos).header == {"i": 5}
        assert s.read(one.pos).body == b""
        assert s.queues() == [("t", 0), ("t", 1), ("t", 2)]
        assert s.queue_end("t", 1) == 67 and s.queue_start("t", 1) == 0
        got = s.read_queue_records("t", 1, 10, 5)
        assert [(o, r.header["i"]) for o, r in got] == [(o, 1 + 3 * o) for o in range(10, 15)]
        entries = s.read_queue("t", 1, 66, 10)
        assert len(entries) == 1 and entries[0][1].tag_hash == zlib.crc32(b"tag")
        assert len(list(s.iter_log())) == 201
        assert s.end_pos == one.pos + one.size
        with pytest.raises(KeyError):
            s.read(s.end_pos)
        with pytest.raises(ValueError):
            s.read(stored[0].pos + 1)
    async with MessageStore.open(tmp_path, segment_size=4096) as s:
        assert s.epoch == 2 and s.recovered_clean
        assert s.queue_end("t", 1) == 67
        recs = list(s.iter_log())
        assert len(recs) == 201 and recs[-1].header == {"x": [1, 2]}
        # next_pos chains through segment gaps
        for a, b in zip(recs, recs[1:], strict=False):
            assert a.next_pos == b.pos
        st = await s.append_one(rec(999, qid=1))
        assert st.queue_offset == 67
    store = await MessageStore.open(tmp_path)
    await store.close()
    await store.close()  # idempotent
    with pytest.raises(StoreClosedError):
        store.append([rec(1)])


async def test_visibility_after_write(tmp_path):
    async with MessageStore.open(tmp_path) as s:
        stored, fut = s.append([rec(i) for i in range(10)])
        assert s.queue_end("t", 0) == 0 and s.read_queue("t", 0, 0, 10) == []
        with pytest.raises(KeyError):
            s.read(stored[0].pos)
        await fut
        assert s.queue_end("t", 0) == 10


async def test_group_commit_1000_concurrent_appends(tmp_path):
    async with MessageStore.open(tmp_path, flush="sync") as s:
        results = await asyncio.gather(*(s.append_one(rec(i, qid=i % 4)) for i in range(1000)))
        assert s.stats["fsyncs"] <= 50, s.stats
        assert s.stats["records"] == 1000
        assert len({r.pos for r in results}) == 1000
        assert sum(s.queue_end("t", q) for q in range(4)) == 1000


async def test_append_batch_is_one_write_one_fsync(tmp_path):
    async with MessageStore.open(tmp_path) as s:
        before = dict(s.stats)
        await s.append_batch([rec(i) for i in range(1000)])
        assert s.stats["fsyncs"] - before["fsyncs"] == 1
        assert s.stats["writes"] - before["writes"] == 1


async def test_async_flush_mode(tmp_path):
    async with MessageStore.open(tmp_path, flush="async", flush_interval=0.05) as s:
        await s.append_batch([rec(i) for i in range(100)])
        assert s.queue_end("t", 0) == 100
        deadline = asyncio.get_running_loop().time() + 5
        while s.stats["fsyncs"] == 0:  # the timer fsyncs
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.01)
        await s.flush()


async def test_lock_refused_in_process_and_from_other_process(tmp_path, python, child_env):
    async with MessageStore.open(tmp_path) as s:
        with pytest.raises(DataDirLockedError) as ei:
            await MessageStore.open(tmp_path)
        assert str(os.getpid()) in str(ei.value) and str(tmp_path.resolve()) in str(ei.value)
        code = (
            "import asyncio, sys\n"
            "from storage import MessageStore, DataDirLockedError\n"
            "async def main():\n"
            "    try:\n"
            "        await MessageStore.open(sys.argv[1])\n"
            "    except DataDirLockedError as e:\n"
            "        print(e); return 3\n"
            "    return 0\n"
            "sys.exit(asyncio.run(main()))\n"
        )
        proc = await asyncio.create_subprocess_exec(
            python, "-c", code, str(tmp_path), env=child_env, stdout=subprocess.PIPE
        )
        out, _ = await proc.communicate()
        assert proc.returncode == 3
        msg = out.decode()
        assert str(os.getpid()) in msg and str(tmp_path.resolve()) in msg
        assert s.epoch == 1
    async with MessageStore.open(tmp_path) as s:  # released on close
        assert s.epoch == 2


async def test_clean_marker_skips_scan(tmp_path):
    async with MessageStore.open(tmp_path, segment_size=4096) as s:
        stored = await s.append_batch([rec(i) for i in range(50)])
        end = s.end_pos
    seg = tmp_path / "log" / f"{0:020d}"
    data = bytearray(seg.read_bytes())
    data[stored[3].pos + stored[3].size - 1] ^= 0xFF  # corrupt an early record
    seg.write_bytes(bytes(data))
    async with MessageStore.open(tmp_path, segment_size=4096) as s:
        assert s.recovered_clean
        assert s.end_pos == end  # no scan happened: nothing truncated
        assert not (tmp_path / "CLEAN").exists()  # removed while open
        with pytest.raises(ValueError):
            s.read(stored[3].pos)
    assert (tmp_path / "CLEAN").exists()


async def test_retention_respects_guard_and_age(tmp_path):
    now = [1_000_000.0]
    async with MessageStore.open(
        tmp_path, segment_size=4096, retention=3600, clock=lambda: now[0]
    ) as s:
        stored = await s.append_batch([rec(i, body=b"x" * 300) for i in range(100)])
        assert len(os.listdir(tmp_path / "log")) >= 8
        assert await s.run_retention() == 0  # too young
        now[0] += 3601
        guard_rec = stored[40]
        s.set_retention_guard(lambda: guard_rec.pos)
        deleted = await s.run_retention()
        assert deleted == guard_rec.pos // 4096
        assert s.read(guard_rec.pos).header == {"i": 40}
        first_kept = s.start_pos
        survivors = [st for st in stored if st.pos >= first_kept]
        with pytest.raises(KeyError):
            s.read(stored[0].pos)
        assert s.queue_start("t", 0) == survivors[0].queue_offset
        got = s.read_queue_records("t", 0, 0, 1000)
        assert [o for o, _ in got] == [st.queue_offset for st in survivors]
        s.set_retention_guard(lambda: 1 << 62)
        await s.run_retention()
        assert len(os.listdir(tmp_path / "log")) == 1  # the active segment stays
        assert s.queue_start("t", 0) == s.queue_end("t", 0) or s.read_queue("t", 0, 0, 1)
        await s.append_one(rec(1000))
    async with MessageStore.open(tmp_path, segment_size=4096, clock=lambda: now[0]) as s:
        assert s.queue_end("t", 0) == 101
        assert s.read_queue_records("t", 0, 0, 1000)[-1][1].header == {"i": 1000}


async def test_ref_pos_entries_point_at_referenced_record(tmp_path):
    async with MessageStore.open(tmp_path) as s:
        half = await s.append_one(NewRecord(2, {"half": 1}, b"the body"))
        commit = await s.append_one(NewRecord(3, {"commit": 1}, b"", IndexTarget("t", 0, 5, ref_pos=half.pos)))
        [(off, entry)] = s.read_queue("t", 0, 0, 10)
        assert (off, entry.pos, entry.size, entry.tag_hash) == (0, half.pos, half.size, 5)
        assert entry.store_time == commit.store_time
        [(_, r)] = s.read_queue_records("t", 0, 0, 10)
        assert r.body == b"the body" and r.header == {"half": 1}
        # referencing a record still in flight works too
        h2, _ = s.append([NewRecord(2, {}, b"in flight")])
        c2 = await s.append_one(NewRecord(3, {}, b"", IndexTarget("t", 0, ref_pos=h2[0].pos)))
        assert s.read_queue("t", 0, 1, 1)[0][1].size == h2[0].size and c2.queue_offset == 1
        # a caller that has the referenced record's size passes it (nothing is read back)
        c3 = await s.append_one(NewRecord(3, {}, b"", IndexTarget("t", 0, ref_pos=half.pos, ref_size=half.size)))
        [(_, r3)] = s.read_queue_records("t", 0, c3.queue_offset, 1)
        assert r3.body == b"the body" and r3.size == half.size
        with pytest.raises(KeyError):
            s.append([NewRecord(3, {}, b"", IndexTarget("t", 0, ref_pos=s.end_pos + 10))])
        with pytest.raises(ValueError):
            s.append([NewRecord(3, {}, b"", IndexTarget("t", 0, ref_pos=half.pos + 1))])
        assert s.queue_end("t", 0) == 3  # failed appends left nothing behind
    # rebuilt identically after a crash (no marker, no checkpoint)
    (tmp_path / "CLEAN").unlink()
    md = await Metadata.open(tmp_path / "meta.sqlite")
    await md.delete("storage.checkpoint")
    await md.close()
    for f in (tmp_path / "index").rglob("*.idx"):
        f.unlink()
    async with MessageStore.open(tmp_path) as s:
        assert not s.recovered_clean
        assert [(o, e.pos, e.size) for o, e in s.read_queue("t", 0, 0, 10)] == [
            (0, half.pos, half.size),
            (1, h2[0].pos, h2[0].size),
            (2, half.pos, half.size),
        ]


async def test_metadata(tmp_path):
    md = await Metadata.open(tmp_path / "m.sqlite")
    try:
        await md.put("a.x", {"k": [1, 2]})
        await md.put_many({"a.y": 2, "b": b"raw"})
        assert await md.get("a.x") == {"k": [1, 2]}
        assert await md.get("missing", 5) == 5
        assert await md.items("a.") == {"a.x": {"k": [1, 2]}, "a.y": 2}
        await md.delete("a.x")
        assert await md.items("a.") == {"a.y": 2}
        await md.put_topic("orders", 4)
        await md.put_topic("orders", 8)
        assert await md.get_topics() == {"orders": 8}
    finally:
        await md.close()


async def test_record_too_large(tmp_path):
    async with MessageStore.open(tmp_path, segment_size=4096) as s:
        with pytest.raises(ValueError):
            s.append([rec(1, body=b"x" * 5000)])
        assert s.end_pos == 0


async def test_scan_across_read_chunks(tmp_path):
    """Records straddling the 1 MiB scan-chunk boundary are iterated and recovered."""
    sizes = [1, 700, 5000, 70_000, 3, 300_000, 9]
    async with MessageStore.open(tmp_path, segment_size=8 << 20) as s:
        stored = []
        for k in range(40):
            stored.append(await s.append_one(rec(k, body=b"y" * sizes[k % len(sizes)])))
        assert [r.pos for r in s.iter_log()] == [x.pos for x in stored]
    (tmp_path / "CLEAN").unlink()
    md = await Metadata.open(tmp_path / "meta.sqlite")
    await md.delete("storage.checkpoint")
    await md.close()
    async with MessageStore.open(tmp_path, segment_size=8 << 20) as s:
        assert s.end_pos == stored[-1].pos + stored[-1].size
        assert s.queue_end("t", 0) == 40
        assert [r.header["i"] for r in s.iter_log(stored[10].pos)] == list(range(10, 40))
