"""The active segment is zero-filled ahead of its appends; a clean log ends at its data,
and a crash that leaves a zero-filled tail recovers without calling it damage."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import time

from storage import IndexTarget, MessageStore, NewRecord

SEGMENT = 1 << 20

CHILD = r"""
import asyncio, sys
from storage import MessageStore, NewRecord, IndexTarget

async def main():
    store = await MessageStore.open(sys.argv[1], segment_size=1 << 20, flush="sync")
    i = 0
    while True:
        await store.append_one(NewRecord(1, {"n": i}, b"%d:" % i * 50, IndexTarget("k", 0)))
        sys.stdout.write(f"{i}\n")
        sys.stdout.flush()
        i += 1

asyncio.run(main())
"""


def segment_files(data) -> list:
    return sorted((data / "log").iterdir())


async def wait_zero_filled(store: MessageStore, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        seg = store._log.segments[-1]
        if store._zero_job is None and seg.alloc > seg.size:
            return
        assert time.monotonic() < deadline, "the active segment was never zero-filled"
        await asyncio.sleep(0.01)


async def test_active_segment_is_zero_filled_and_trimmed_at_close(tmp_path):
    async with MessageStore.open(tmp_path, segment_size=SEGMENT, flush="sync") as s:
        for i in range(20):
            await s.append_one(NewRecord(1, {"i": i}, b"x" * 1000, IndexTarget("t", 0)))
        await wait_zero_filled(s)
        end = s.end_pos
        (path,) = segment_files(tmp_path)
        size = path.stat().st_size
        assert size > end
        tail = path.read_bytes()[end:]
        assert len(tail) == size - end and tail.count(0) == len(tail)
        # appends keep going inside the filled part and read back
        for i in range(20, 40):
            await s.append_one(NewRecord(1, {"i": i}, b"y" * 1000, IndexTarget("t", 0)))
        assert [r.header["i"] for _, r in s.read_queue_records("t", 0, 0, 100)] == list(range(40))
        end = s.end_pos
    assert path.stat().st_size == end
    async with MessageStore.open(tmp_path, segment_size=SEGMENT) as s:
        assert s.recovered_clean and s.end_pos == end


async def test_full_segments_end_at_their_data(tmp_path):
    async with MessageStore.open(tmp_path, segment_size=64 * 1024, flush="sync") as s:
        for i in range(300):  # about 5 segments
            await s.append_one(NewRecord(1, {"i": i}, b"z" * 1000, IndexTarget("t", 0)))
        segs = list(s._log.segments)
        for seg in segs[:-1]:
            assert seg.path.stat().st_size == seg.size
        ends = {seg.path: seg.size for seg in segs}
    for path, size in ends.items():
        assert path.stat().st_size == size


async def test_kill9_with_zero_filled_tail_recovers_every_ack(tmp_path, python, child_env, caplog):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    data = tmp_path / "data"
    proc = await asyncio.create_subprocess_exec(python, str(script), str(data), env=child_env, stdout=subprocess.PIPE)
    acked = -1
    # run until the child's active segment has been zero-filled past its data
    deadline = time.monotonic() + 30
    while True:
        line = await asyncio.wait_for(proc.stdout.readline(), 15)
        assert line, "child exited early"
        acked = int(line)
        files = segment_files(data) if (data / "log").exists() else []
        if acked > 100 and files and files[-1].stat().st_size >= SEGMENT // 2:
            break
        assert time.monotonic() < deadline, "no zero-filled tail appeared"
    proc.send_signal(signal.SIGKILL)
    rest = await proc.stdout.read()
    acked = max([acked] + [int(x) for x in rest.split()])
    await proc.wait()
    last = segment_files(data)[-1]
    size_at_crash = last.stat().st_size
    caplog.set_level(logging.INFO, logger="storage")
    async with MessageStore.open(data, segment_size=SEGMENT) as s:
        assert not s.recovered_clean
        seen = [r.header["n"] for r in s.iter_log()]
        assert seen[: acked + 1] == list(range(acked + 1))
        assert last.stat().st_size == s.end_pos - s._log.segments[-1].base < size_at_crash
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert any("zero-filled tail" in r.getMessage() for r in caplog.records)
        n = len(seen)
        await s.append_one(NewRecord(1, {"n": n}, b"after", IndexTarget("k", 0)))
        assert s.read_queue_records("k", 0, n, 1)[0][1].body == b"after"
        end = s.end_pos - s._log.segments[-1].base
    assert last.stat().st_size == end


async def test_a_failed_zero_fill_only_stops_preallocation(tmp_path, monkeypatch, caplog):
    def failing_fill(seg, start, end):  # grows the file, then fails (a full disk, say)
        os.pwrite(seg.fd, bytes(1000), end - 1000)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(MessageStore, "_zero_fill", staticmethod(failing_fill))
    caplog.set_level(logging.WARNING, logger="storage")
    async with MessageStore.open(tmp_path, segment_size=64 * 1024, flush="sync") as s:
        for i in range(200):  # about 3 segments
            await s.append_one(NewRecord(1, {"i": i}, b"w" * 1000, IndexTarget("t", 0)))
        assert not s._prealloc
        assert any("zero-filling" in r.getMessage() for r in caplog.records)
        segs = list(s._log.segments)
        assert len(segs) >= 3
        for seg in segs[:-1]:
            assert seg.path.stat().st_size == seg.size
        end = s.end_pos
    async with MessageStore.open(tmp_path, segment_size=64 * 1024) as s:
        assert s.recovered_clean and s.end_pos == end
        assert [r.header["i"] for _, r in s.read_queue_records("t", 0, 0, 1000)] == list(range(200))


async def test_zero_fill_stays_about_one_chunk_ahead(tmp_path):
    # a big segment: a fill that ran away would zero all of it
    async with MessageStore.open(tmp_path, segment_size=64 << 20, flush="sync") as s:
        for i in range(300):
            await s.append_one(NewRecord(1, {"i": i}, b"x" * 1000, IndexTarget("t", 0)))
            if i % 50 == 0:
                await wait_zero_filled(s)
        await wait_zero_filled(s)
        seg = s._log.segments[-1]
        assert seg.size < seg.alloc <= seg.size + (1 << 20) + (1 << 19)
        assert s._log.segments[-1].alloc == os.fstat(seg.fd).st_size
