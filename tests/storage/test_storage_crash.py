"""Crash safety: kill -9 of a writer, torn tails and flipped bytes."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess

import pytest

from storage import IndexTarget, MessageStore, Metadata, NewRecord

CHILD = r"""
import asyncio, sys, zlib
from storage import BundleTarget, MessageStore, NewBundle, NewRecord, IndexTarget

async def main():
    base = int(sys.argv[2])
    store = await MessageStore.open(sys.argv[1], segment_size=16384, flush="sync")
    out = sys.stdout
    async def worker(w):
        i = w
        while True:
            if w == 7:  # a bundle of three messages
                ns = [base + i, base + 60000 + i, base + 80000 + i]
                bodies = [(b"%d:" % n) * (1 + i % 40) for n in ns]
                await store.append_batch([NewBundle(1, [{"n": n} for n in ns], bodies, BundleTarget("k", w % 3, [0] * 3))])
            else:
                ns = [base + i]
                body = (b"%d:" % (base + i)) * (1 + i % 40)
                await store.append_one(NewRecord(1, {"n": base + i}, body, IndexTarget("k", w % 3)))
            for n in ns:
                out.write(f"{n}\n")
            out.flush()
            i += 8
    await asyncio.gather(*(worker(w) for w in range(8)))

asyncio.run(main())
"""


def body_for(n: int) -> bytes:
    return (b"%d:" % n) * (1 + (n % 100000) % 40)


async def _run_and_kill(python, script, data, base: int, env, kill_after: int) -> list[bytes]:
    """Run the child script until it has printed ``kill_after`` lines, kill -9 it, and
    return every line it printed (those printed before the kill count too)."""
    proc = await asyncio.create_subprocess_exec(python, str(script), str(data), str(base), env=env, stdout=subprocess.PIPE)
    lines = []
    while len(lines) < kill_after:
        line = await asyncio.wait_for(proc.stdout.readline(), 15)
        assert line, "child exited early"
        lines.append(line.strip())
    proc.send_signal(signal.SIGKILL)
    lines += (await proc.stdout.read()).split()
    await proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return lines


async def test_acked_appends_survive_kill9(tmp_path, python, child_env):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    data = tmp_path / "data"
    rng = random.Random(1234)
    acked: set[int] = set()
    for round_no in range(20):
        base = round_no * 100000
        lines = await _run_and_kill(python, script, data, base, child_env, rng.randint(1, 300))
        acked.update(int(x) for x in lines)
        async with MessageStore.open(data, segment_size=16384) as s:
            assert not s.recovered_clean
            seen = {}
            for r in s.iter_log():
                seen[r.header["n"]] = r.body
            missing = acked - seen.keys()
            assert not missing, f"round {round_no}: acked records lost: {sorted(missing)[:10]}"
            for n in acked:
                assert seen[n] == body_for(n)
            indexed = sum(s.queue_end("k", q) - s.queue_start("k", q) for q in range(3))
            assert indexed == len(seen)
            # index entries point at the right records
            for q in range(3):
                for _, r in s.read_queue_records("k", q, 0, 100000):
                    assert r.body == body_for(r.header["n"])


CHILD_MANY = r"""
import asyncio, sys
from storage import MessageStore, NewRecord, IndexTarget

async def main():
    base = int(sys.argv[2])
    store = await MessageStore.open(sys.argv[1], flush="sync")
    out = sys.stdout
    told = False
    async def worker(w):
        nonlocal told
        i = w
        while True:
            n = base + i
            await store.append_one(NewRecord(1, {"n": n}, b"%09d" % n * 110, IndexTarget("m", w % 4)))
            out.write(f"{n}\n")
            if not told and store.stats["handed_off"]:
                told = True
                out.write("handed\n")
            out.flush()
            i += 1024
    await asyncio.gather(*(worker(w) for w in range(1024)))

asyncio.run(main())
"""


async def test_acked_appends_of_many_appenders_survive_kill9(tmp_path, python, child_env):
    """1,024 appenders of 1 KiB: batches are handed to the writer thread (O_DSYNC writes,
    several in flight); every acknowledged one must survive kill -9."""
    script = tmp_path / "child.py"
    script.write_text(CHILD_MANY)
    data = tmp_path / "data"
    rng = random.Random(99)
    acked: set[int] = set()
    handed = False
    for round_no in range(4):
        base = round_no * 10_000_000
        lines = await _run_and_kill(python, script, data, base, child_env, rng.randint(2_000, 20_000))
        handed = handed or b"handed" in lines
        acked.update(int(x) for x in lines if x != b"handed")
        async with MessageStore.open(data) as s:
            assert not s.recovered_clean
            seen = {r.header["n"]: r.body for r in s.iter_log()}
            missing = acked - seen.keys()
            assert not missing, f"round {round_no}: acked records lost: {sorted(missing)[:10]}"
            assert all(seen[n] == b"%09d" % n * 110 for n in acked)
            assert sum(s.queue_end("m", q) for q in range(4)) == len(seen)
    assert handed, "no batch was handed off: the test did not exercise that path"


def _records(n: int, rng: random.Random, tag: int) -> list[NewRecord]:
    return [
        NewRecord(
            rng.randrange(256),
            {"i": i, "tag": tag},
            rng.randbytes(rng.randrange(0, 700)),
            IndexTarget("q", i % 2, i) if rng.random() < 0.8 else None,
        )
        for i in range(n)
    ]


@pytest.mark.parametrize("seed", range(16))
async def test_torn_or_flipped_tail_recovers_to_intact_prefix(tmp_path, seed):
    rng = random.Random(seed)
    seg = 4096
    async with MessageStore.open(tmp_path, segment_size=seg) as s:
        recs1 = _records(30, rng, 1)
        first = await s.append_batch(recs1)
    md = await Metadata.open(tmp_path / "meta.sqlite")
    checkpoint = await md.get("storage.checkpoint")
    await md.close()
    async with MessageStore.open(tmp_path, segment_size=seg) as s:
        recs2 = _records(30, rng, 2)
        second = await s.append_batch(recs2)
    # simulate a crash after the second batch: no marker, checkpoint from before it
    (tmp_path / "CLEAN").unlink()
    md = await Metadata.open(tmp_path / "meta.sqlite")
    await md.put("storage.checkpoint", checkpoint)
    await md.close()
    pairs = list(zip(first, recs1, strict=True)) + list(zip(second, recs2, strict=True))
    flip = seed % 2 == 1
    if flip:
        victim_i = rng.randrange(len(second) - 5, len(second))
        victim = second[victim_i]
        at = victim.pos + rng.randrange(victim.size)
        path = tmp_path / "log" / f"{at - at % seg:020d}"
        raw = bytearray(path.read_bytes())
        raw[at % seg] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(raw))
        intact = [(st, r) for st, r in pairs if st.pos < victim.pos]
    else:
        lo, hi = second[0].pos, second[-1].pos + second[-1].size
        at = rng.randrange(lo, hi)
        base = at - at % seg
        os.truncate(tmp_path / "log" / f"{base:020d}", at - base)
        for f in os.listdir(tmp_path / "log"):
            if int(f) > base:
                os.unlink(tmp_path / "log" / f)
        intact = [(st, r) for st, r in pairs if st.pos + st.size <= at]
    async with MessageStore.open(tmp_path, segment_size=seg) as s:
        assert not s.recovered_clean
        got = list(s.iter_log())
        assert [(r.pos, r.size) for r in got] == [(st.pos, st.size) for st, _ in intact]
        for r, (_, want) in zip(got, intact, strict=True):
            assert (r.rtype, r.header, r.body) == (want.rtype, want.header, want.body)
        for q in (0, 1):
            exp = [(st.queue_offset, st.pos) for st, r in intact if r.index and r.index.queue_id == q]
            assert [(o, e.pos) for o, e in s.read_queue("q", q, 0, 1000)] == exp
            assert s.queue_end("q", q) == len(exp)
        end = intact[-1][0].pos + intact[-1][0].size if intact else 0
        # appending continues after the damage
        more = await s.append_one(NewRecord(1, {"i": 0, "tag": 3}, b"after", IndexTarget("q", 0)))
        assert more.pos >= end and s.read(more.pos).body == b"after"
    async with MessageStore.open(tmp_path, segment_size=seg) as s:
        assert s.read(more.pos).body == b"after"
        assert s.read_queue("q", 0, more.queue_offset, 1)[0][1].pos == more.pos
