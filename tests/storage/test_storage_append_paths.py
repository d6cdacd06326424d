"""Appends: concurrent ``append_one`` calls encoded together (one bad record fails alone,
one cancelled waiter cancels no other), call order, ``append`` of many records over several
queues and segments, big synced batches handed to the writer thread (publish order, a
failed write, resolving only after the write, close, descriptors); the CRC the log uses."""

from __future__ import annotations

import asyncio
import os
import threading
import zlib

import pytest

import storage.handoff as handoff_mod
from storage import IndexTarget, MessageStore, NewRecord
from storage.framing import crc32
from storage.store import StoreClosedError

KIB = b"k" * 1024

def _rec(i: int, q: int = 0, body: bytes | None = None) -> NewRecord:
    return NewRecord(
        3, {"i": i}, body if body is not None else f"body-{i}".encode() * 7, IndexTarget("t", q, i)
    )


async def _until(cond, what: str) -> None:
    """Let the loop turn until ``cond()`` holds (at most 5 s)."""
    deadline = asyncio.get_running_loop().time() + 5
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, f"still waiting: {what}"
        await asyncio.sleep(0)


def _hold_writer_thread(monkeypatch) -> threading.Event:
    """Hand-off jobs wait in the writer thread until the returned event is set."""
    gate = threading.Event()
    real = handoff_mod._pwrite_all

    def held(pwrite, writes):
        assert gate.wait(10)
        return real(pwrite, writes)

    monkeypatch.setattr(handoff_mod, "_pwrite_all", held)
    return gate


def test_crc32_is_zlibs():
    for data in (b"", b"x", bytes(range(256)) * 9, b"\xff" * 1500):
        assert crc32(data) == zlib.crc32(data)
        assert crc32(data, 0x1234_5678) == zlib.crc32(data, 0x1234_5678)


async def test_concurrent_append_one_one_bad_record_fails_alone(tmp_path):
    async with MessageStore.open(tmp_path, segment_size=64 * 1024) as s:
        recs = [_rec(i, i % 3) for i in range(300)]
        recs[123] = _rec(123, 0, body=b"x" * 70_000)  # larger than a segment
        results = await asyncio.gather(*(s.append_one(r) for r in recs), return_exceptions=True)
        assert isinstance(results[123], ValueError) and "exceeds segment size" in str(results[123])
        good = [
            (r, st) for r, st in zip(recs, results, strict=True) if not isinstance(st, Exception)
        ]
        assert len(good) == 299
        # positions follow call order, and each queue's offsets run 0, 1, 2, ...
        positions = [st.pos for _, st in good]
        assert positions == sorted(positions)
        for q in range(3):
            offs = [st.queue_offset for r, st in good if r.index.queue_id == q]
            assert offs == list(range(len(offs)))
        for r, st in good:
            got = s.read(st.pos)
            assert (got.header, got.body) == (r.header, r.body)


async def test_cancelled_append_one_does_not_cancel_the_others(tmp_path):
    async with MessageStore.open(tmp_path) as s:
        recs = [_rec(i) for i in range(50)]
        async with s._io_lock:  # hold the writer before its write
            tasks = [asyncio.create_task(s.append_one(r)) for r in recs]
            await _until(lambda: s._singles is not None and len(s._singles.records) == 50, "all queued")
            await _until(lambda: s._singles is None and not s._batch.futures, "the writer took the batch")
            assert all(not t.done() for t in tasks)
            tasks[7].cancel()
            await asyncio.sleep(0)
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert isinstance(results[7], asyncio.CancelledError)
        stored = [st for k, st in enumerate(results) if k != 7]
        assert all(not isinstance(st, BaseException) for st in stored)
        for k, st in enumerate(results):
            if k != 7:
                assert s.read(st.pos).body == recs[k].body
        # the cancelled one was already in the batch: it is stored too, in order
        assert s.read_queue("t", 0, 0, 100)[7][1].pos > stored[6].pos


async def test_append_one_then_append_keeps_call_order(tmp_path):
    async with MessageStore.open(tmp_path) as s:
        first = asyncio.create_task(s.append_one(_rec(0)))
        await asyncio.sleep(0)  # it has queued its record (not yet encoded)
        stored, fut = s.append([_rec(1)])
        await fut
        assert (await first).pos < stored[0].pos
        assert [e.pos for _, e in s.read_queue("t", 0, 0, 10)] == [(await first).pos, stored[0].pos]


@pytest.mark.parametrize("queues", [1, 3, 20])
async def test_append_of_many_records_reads_back_per_queue(tmp_path, queues):
    async with MessageStore.open(tmp_path) as s:
        await s.append_batch([_rec(i, i % queues) for i in range(queues)])  # targets now known
        recs = [_rec(i, (i * 7) % queues) for i in range(500)]
        stored = await s.append_batch(recs)
        assert [st.pos for st in stored] == sorted(st.pos for st in stored)
        for q in range(queues):
            mine = [(r, st) for r, st in zip(recs, stored, strict=True) if r.index.queue_id == q]
            got = s.read_queue_records("t", q, 1, len(mine) + 5)
            assert [g.body for _, g in got] == [r.body for r, _ in mine]
            assert [st.queue_offset for _, st in mine] == list(range(1, len(mine) + 1))
    async with MessageStore.open(tmp_path) as s:  # and after a reopen, from disk
        for q in range(queues):
            assert s.queue_end("t", q) == 1 + sum(1 for i in range(500) if (i * 7) % queues == q)


async def test_append_of_many_records_across_a_segment_boundary(tmp_path):
    async with MessageStore.open(tmp_path, segment_size=4096) as s:
        await s.append_batch([_rec(0)])
        recs = [_rec(i) for i in range(1, 200)]  # ~20 segments' worth
        stored = await s.append_batch(recs)
        assert {st.pos // 4096 for st in stored} == set(range(stored[-1].pos // 4096 + 1))
        assert [r.body for _, r in s.read_queue_records("t", 0, 0, 300)] == [_rec(0).body] + [
            r.body for r in recs
        ]


async def test_append_of_many_with_a_bad_header_stores_nothing(tmp_path):
    async with MessageStore.open(tmp_path) as s:
        await s.append_batch([_rec(0)])
        end = s._next_pos
        recs = [_rec(i) for i in range(1, 20)]
        recs[5] = NewRecord(3, {"x": object()}, b"", IndexTarget("t", 0, 5))
        with pytest.raises(TypeError):
            s.append(recs)
        assert s._next_pos == end and s.queue_end("t", 0) == 1
        await s.append_batch([_rec(1)])
        assert [r.body for _, r in s.read_queue_records("t", 0, 0, 5)] == [
            _rec(0).body,
            _rec(1).body,
        ]



async def test_many_appenders_hand_batches_off_and_publish_in_order(tmp_path):
    async with MessageStore.open(tmp_path, flush="sync") as s:
        recs = [_rec(i, i % 4, body=KIB) for i in range(3000)]
        results = await asyncio.gather(*(s.append_one(r) for r in recs))
        assert s.stats["handed_off"] >= 2, s.stats  # batches of 512 x 1 KiB: over 256 KiB
        assert s.stats["fsyncs"] <= 20, s.stats
        assert [st.pos for st in results] == sorted(st.pos for st in results)
        for q in range(4):
            got = s.read_queue_records("t", q, 0, 1000)
            assert [r.header["i"] for _, r in got] == list(range(q, 3000, 4))
        # a small append after handed-off batches is published after them
        more = [asyncio.create_task(s.append_one(_rec(i, 0, body=KIB))) for i in range(3000, 4024)]
        await asyncio.sleep(0)
        stored, fut = s.append([_rec(9999, 0)])
        await fut
        assert s.queue_end("t", 0) == 750 + 1024 + 1  # everything before it is visible too
        assert max(st.pos for st in await asyncio.gather(*more)) < stored[0].pos
    async with MessageStore.open(tmp_path) as s:  # and read back from disk
        assert s.queue_end("t", 0) == 750 + 1024 + 1
        assert s.read(results[1234].pos).body == KIB


async def test_a_failed_handed_off_write_fails_its_appends_and_the_store(tmp_path, monkeypatch):
    def broken(pwrite, writes):
        raise OSError(5, "Input/output error")

    async with MessageStore.open(tmp_path, flush="sync") as s:
        monkeypatch.setattr(handoff_mod, "_pwrite_all", broken)
        results = await asyncio.gather(*(s.append_one(_rec(i, body=KIB)) for i in range(1024)), return_exceptions=True)
        assert all(isinstance(r, OSError) for r in results), {type(r) for r in results}
        with pytest.raises(StoreClosedError):
            s.append([_rec(0)])
        with pytest.raises(StoreClosedError):
            await s.append_one(_rec(0))


async def test_handed_off_appends_resolve_only_after_their_write(tmp_path, monkeypatch):
    async with MessageStore.open(tmp_path, flush="sync") as s:
        gate = _hold_writer_thread(monkeypatch)
        tasks = [asyncio.create_task(s.append_one(_rec(i, body=KIB))) for i in range(1024)]
        # both batches of 512 handed off, neither written
        await _until(lambda: s.stats["handed_off"] >= 2, "two hand-offs")
        assert not any(t.done() for t in tasks)
        assert s.queue_end("t", 0) == 0  # nothing visible yet
        gate.set()
        stored = await asyncio.gather(*tasks)
        assert s.queue_end("t", 0) == 1024
        assert s.read(stored[-1].pos).body == KIB


async def test_a_full_segment_gives_up_its_synced_write_descriptor(tmp_path):
    async with MessageStore.open(tmp_path, flush="sync", segment_size=2 << 20) as s:
        for _ in range(6):  # ~6 MiB over 2 MiB segments, in batches of 512 KiB
            await asyncio.gather(*(s.append_one(_rec(i, body=KIB)) for i in range(1024)))
        segs = s._log.segments
        assert len(segs) >= 3 and s.stats["handed_off"] >= 6
        assert all(seg.dsync_fd == -1 for seg in segs[:-1])
    async with MessageStore.open(tmp_path) as s:
        assert s.queue_end("t", 0) == 6 * 1024


async def test_close_waits_for_handed_off_batches(tmp_path, monkeypatch):
    s = await MessageStore.open(tmp_path, flush="sync")
    gate = _hold_writer_thread(monkeypatch)
    tasks = [asyncio.create_task(s.append_one(_rec(i, body=KIB))) for i in range(1024)]
    await _until(lambda: s.stats["handed_off"] >= 2, "two hand-offs")
    closing = asyncio.create_task(s.close())
    await asyncio.sleep(0.01)
    assert not closing.done()  # it waits for the writes in flight
    gate.set()
    await closing
    stored = await asyncio.gather(*tasks)
    async with MessageStore.open(tmp_path) as s2:
        assert s2.recovered_clean
        assert s2.queue_end("t", 0) == 1024
        assert s2.read(stored[-1].pos).body == KIB


async def test_a_hand_off_that_cannot_start_fails_its_appends(tmp_path, monkeypatch):
    real_open = os.open

    def no_dsync(path, flags, *a):
        if flags & os.O_DSYNC:
            raise OSError(24, "Too many open files")
        return real_open(path, flags, *a)

    async with MessageStore.open(tmp_path, flush="sync") as s:
        monkeypatch.setattr(s._io, "open", no_dsync)  # (the real file layer's open)
        results = await asyncio.wait_for(
            asyncio.gather(*(s.append_one(_rec(i, body=KIB)) for i in range(1024)), return_exceptions=True), 10
        )
        monkeypatch.undo()
        assert all(isinstance(r, OSError) and r.errno == 24 for r in results), {type(r) for r in results}
        with pytest.raises(StoreClosedError):
            s.append([_rec(0)])


async def test_append_one_after_close_began_is_refused_and_queued_ones_are_written(tmp_path):
    s = await MessageStore.open(tmp_path)
    async with s._io_lock:  # the writer takes the first batch and waits here
        first, fut = s.append([_rec(0)])
        await _until(lambda: not s._batch.futures, "the writer took it")
        queued = [asyncio.create_task(s.append_one(_rec(i))) for i in range(1, 11)]
        await asyncio.sleep(0)  # all ten queued behind it, not encoded yet
        assert s._singles is not None and len(s._singles.records) == 10
        closing = asyncio.create_task(s.close())
        await asyncio.sleep(0)  # close has begun
        with pytest.raises(StoreClosedError):
            await asyncio.wait_for(s.append_one(_rec(99)), 5)
    await closing
    assert len(await asyncio.gather(fut, *queued)) == 11
    async with MessageStore.open(tmp_path) as s2:
        assert s2.queue_end("t", 0) == 11


@pytest.mark.parametrize("flush", ["sync", "async"])
async def test_append_now_writes_at_once_when_the_writer_is_idle(tmp_path, flush):
    async with MessageStore.open(tmp_path, flush=flush) as s:
        await s.append_batch([_rec(0)])  # the writer runs and goes back to sleep
        await _until(lambda: s._wake is not None and not s._wake.done() and s._zero_job is None,
                     "the writer asleep, no zero-fill running")
        batches = s.stats["batches"]
        stored, fut = s.append([_rec(1), _rec(2, 1)], now=True)
        assert fut.done() and fut.exception() is None  # written (and synced) before returning
        assert s.stats["batches"] == batches + 1
        assert s.queue_end("t", 0) == 2 and s.queue_end("t", 1) == 1
        assert s.read(stored[1].pos).header == {"i": 2}
        assert not s._wake.done()  # the writer was not woken for it
        if flush == "sync":
            assert s.stats["fsyncs"] >= batches + 1
        # the next append goes through the writer as usual
        stored2, fut2 = s.append([_rec(3)])
        assert not fut2.done()
        await fut2
        assert s.queue_end("t", 0) == 3
    async with MessageStore.open(tmp_path) as s:
        assert [r.header["i"] for _, r in s.read_queue_records("t", 0, 0, 10)] == [0, 1, 3]


async def test_append_now_leaves_the_batch_to_a_busy_writer(tmp_path, monkeypatch):
    async with MessageStore.open(tmp_path, flush="sync") as s:
        gate = _hold_writer_thread(monkeypatch)
        tasks = [asyncio.create_task(s.append_one(_rec(i, body=KIB))) for i in range(600)]
        await _until(lambda: s.stats["handed_off"] >= 1, "a hand-off")
        stored, fut = s.append([_rec(9999)], now=True)
        assert not fut.done()  # behind the batch in the writer thread, in order
        gate.set()
        await fut
        assert max(st.pos for st in await asyncio.gather(*tasks)) < stored[0].pos
        assert s.read(stored[0].pos).header == {"i": 9999}


async def test_append_now_a_failed_write_fails_its_future_and_the_store(tmp_path, monkeypatch):
    async with MessageStore.open(tmp_path, flush="sync") as s:
        await s.append_batch([_rec(0)])
        await _until(lambda: s._wake is not None and not s._wake.done() and s._zero_job is None,
                     "the writer asleep, no zero-fill running")

        def broken(fd, data, at):
            raise OSError(5, "Input/output error")

        monkeypatch.setattr(s._io, "pwrite", broken)
        _stored, fut = s.append([_rec(1)], now=True)
        assert fut.done() and isinstance(fut.exception(), OSError)
        with pytest.raises(StoreClosedError):
            s.append([_rec(2)], now=True)
        monkeypatch.undo()
