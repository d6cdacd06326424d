"""Power loss, not only kill -9: the store recovers from any cut of its unsynced writes.

``kill -9`` keeps the page cache, so it never tests the order of fsyncs. Here, in the
manner of SQLite's crash tests, the store writes through an in-memory file layer
(``tests/storage/powerloss.py``) that records every write, sync and directory change.
Each workload (appends one at a time and in groups, bundles, half messages with their
outcome records and commit references, retry records, ack records, plain records without
an index, batches big enough for the writer thread and the hand-off path, segment rolls,
checkpoints, flushes, a clean close) runs once; Hypothesis then picks cut points in its
trace and, for each, how the unsynced writes fare (kept, dropped or torn by sector) and
which directory changes and metadata writes survive. The store recovers from that disk,
and then:

- every record acknowledged (its append's durability future resolved) before the cut is
  intact, by position and through its queue index;
- every record the recovered log holds is one that was appended, at that position;
- every queue's index is contiguous and each entry points where the append put it;
- the metadata checkpoint is never ahead of the log, nor its queue ends ahead of the
  recovered indexes;
- the store appends again right after the recovered end.

Budget: ``HALFMQ_POWERLOSS_CUTS`` cut points (default 1,150, about 20 s on an idle 2-core
machine; the test prints the counts). A longer run: ``HALFMQ_POWERLOSS_CUTS=20000 python -m pytest -s
tests/storage/test_storage_power_loss.py``.
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import os
import random
import shutil
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from storage import (
    BundleTarget,
    IndexTarget,
    MessageStore,
    Metadata,
    NewBundle,
    NewRecord,
    RefsTarget,
)
from storage.framing import REF, bundle_members
from storage.store import CHECKPOINT_KEY
from tests.storage.powerloss import TracingFS, power_cut

CUTS = int(os.environ.get("HALFMQ_POWERLOSS_CUTS", "1150"))
SEGMENT = 320 * 1024  # a batch of 300 KiB fits (hand-off), and the log rolls often
CLOCK = 1_700_000_000.0
STEPS = 80  # per workload
WORKLOADS = 24  # (many short ones: a cut costs what the log before it holds)

RT_MSG, RT_HALF, RT_TX_OP, RT_COMMIT_REF, RT_RETRY, RT_ACK, RT_PLAIN = 1, 2, 3, 4, 5, 6, 7
TOPICS = ("orders", "pay%ments", "t/3")


@dataclass
class Workload:
    """One recorded run: the trace, and what each append wrote and when it was acked."""

    name: str
    trace: list = field(default_factory=list)
    by_pos: dict = field(default_factory=dict)  # pos -> (rtype, header, body)
    entries: dict = field(default_factory=dict)  # (topic, qid, offset) -> (entry pos, record pos)
    acked: list = field(default_factory=list)  # (trace length when acked, pos, (topic, qid, offset) | None)
    segment_files: int = 0


def _body(rng: random.Random, n: int, size: int | None = None) -> bytes:
    size = rng.randint(0, 600) if size is None else size
    return (b"%d|" % n * (size // 4 + 1))[:size]


class MemoryMetadata:
    """What the store uses of :class:`storage.Metadata`, in memory; each write is logged
    in the trace of ``fs`` (if given), so that a power cut can keep a prefix of them."""

    def __init__(self, values: dict, fs: TracingFS | None) -> None:
        self.values = values
        self.fs = fs

    async def get(self, key: str, default=None):
        return self.values.get(key, default)

    async def put(self, key: str, value) -> None:
        await self.put_many({key: value})

    async def put_many(self, values: dict) -> None:
        self.values.update(values)
        if self.fs is not None:
            self.fs.meta(values)

    async def close(self) -> None:
        pass


@contextmanager
def memory_metadata(values: dict, fs: TracingFS | None):
    """Stores opened meanwhile keep their metadata in ``values`` (no SQLite)."""
    real = Metadata.open

    async def fake_open(path):
        return MemoryMetadata(values, fs)

    Metadata.open = fake_open  # type: ignore[method-assign]
    try:
        yield
    finally:
        Metadata.open = real  # type: ignore[method-assign]


async def _record(root: Path, seed: int) -> Workload:
    """Run one mixed workload against a tracing file layer; return its trace and records."""
    rng = random.Random(seed)
    fs = TracingFS(root)
    w = Workload(f"seed {seed}")
    w.trace = fs.trace
    n = 0
    root.mkdir()  # noqa: ASYNC240 (the lock file's directory)
    with memory_metadata({}, fs):
        store = await MessageStore.open(root, segment_size=SEGMENT, flush="sync", fileio=fs, clock=lambda: CLOCK,
                                        max_open_indexes=4)

        def note(records, stored, fut) -> None:
            """Remember what ``records`` wrote; mark them acked when ``fut`` resolves."""
            k = 0
            rows = []
            for rec in records:
                if isinstance(rec, NewBundle):
                    for h, b in zip(rec.headers, rec.bodies, strict=True):
                        st_ = stored[k]
                        k += 1
                        w.by_pos[st_.pos] = (rec.rtype, h, b)
                        key = (rec.index.topic, rec.index.queue_id, st_.queue_offset)
                        w.entries[key] = (st_.pos, st_.pos)
                        rows.append((st_.pos, key))
                    continue
                st_ = stored[k]
                k += 1
                w.by_pos[st_.pos] = (rec.rtype, rec.header, rec.body)
                key = None
                if isinstance(rec.index, RefsTarget):  # one entry per reference; they are its body
                    w.by_pos[st_.pos] = (rec.rtype, rec.header, b"".join(REF.pack(*r) for r in rec.index.refs))
                    for j, (ref, _size, _tag) in enumerate(rec.index.refs):
                        key = (rec.index.topic, rec.index.queue_id, st_.queue_offset + j)
                        w.entries[key] = (ref, st_.pos)
                        rows.append((st_.pos, key))
                    continue
                if rec.index is not None:
                    key = (rec.index.topic, rec.index.queue_id, st_.queue_offset)
                    ref = rec.index.ref_pos
                    w.entries[key] = (st_.pos if ref is None else ref, st_.pos)
                rows.append((st_.pos, key))

            def done(f) -> None:
                if not f.cancelled() and f.exception() is None:
                    at = len(fs.trace)
                    w.acked.extend((at, pos, key) for pos, key in rows)

            fut.add_done_callback(done)

        def msg(topic=None, q=None) -> NewRecord:
            nonlocal n
            n += 1
            topic = topic or rng.choice(TOPICS)
            return NewRecord(RT_MSG, {"n": n}, _body(rng, n), IndexTarget(topic, rng.randrange(3) if q is None else q,
                                                                         rng.randrange(1 << 32)))

        async def one(rec) -> None:
            fut = asyncio.get_running_loop().create_future()
            note([rec], [await store.append_one(rec)], fut)
            fut.set_result(None)

        async def batch(records) -> list:
            stored, fut = store.append(records)
            note(records, stored, fut)
            await fut
            return stored

        for _step in range(STEPS):
            kind = rng.choice(("singles", "singles", "bundle", "tx", "retry", "ack", "big", "mixed", "checkpoint",
                               "flush", "plain"))
            if kind == "singles":  # concurrent append_one: group commit
                await asyncio.gather(*(one(msg()) for _ in range(rng.randint(1, 16))))
            elif kind == "bundle":
                members = rng.randint(1, 12)
                n += members
                topic = rng.choice(TOPICS)
                await batch([NewBundle(RT_MSG, [{"n": n - i} for i in range(members)],
                                       [_body(rng, n - i) for i in range(members)],
                                       BundleTarget(topic, rng.randrange(3), [i for i in range(members)]))])
            elif kind == "tx" and rng.random() < 0.5:  # a half message, then its outcome and commit reference
                n += 1
                [half] = await batch([NewRecord(RT_HALF, {"n": n, "half": 1}, _body(rng, n),
                                                IndexTarget("%HALF%", 0))])
                topic = rng.choice(TOPICS)
                ref_size = half.size if rng.random() < 0.5 else None  # (or the store reads it back)
                await batch([NewRecord(RT_TX_OP, {"id": n, "s": 1, "hp": half.pos}, b"", IndexTarget("%OP%", 0)),
                              NewRecord(RT_COMMIT_REF, {"id": n}, b"",
                                        IndexTarget(topic, 1, 7, ref_pos=half.pos, ref_size=ref_size))])
            elif kind == "tx":  # half messages, then one references record and one outcome record
                halves = [NewRecord(RT_HALF, {"n": n + i, "half": 1}, _body(rng, n + i), IndexTarget("%HALF%", 0))
                          for i in range(1, rng.randint(2, 9))]
                n += len(halves)
                stored = await batch(halves)
                await batch([NewRecord(RT_COMMIT_REF, {"ids": [h.header["n"] for h in halves]}, b"",
                                       RefsTarget(rng.choice(TOPICS), 2, [(st.pos, st.size, 7) for st in stored])),
                             NewRecord(RT_TX_OP, {"ops": [[h.header["n"], "C"] for h in halves]}, b"",
                                       IndexTarget("%OP%", 0))])
            elif kind == "retry":
                stored = await batch([msg()])
                n += 1
                await batch([NewRecord(RT_RETRY, {"n": n, "rp": stored[0].pos, "rt": r}, b"",
                                       IndexTarget("%RETRY%g", r % 2)) for r in range(rng.randint(1, 4))])
            elif kind == "ack":
                n += 1
                await batch([NewRecord(RT_ACK, {"n": n, "g": "g", "a": [[0, 1, 2]]}, b"", IndexTarget("%ACK%", 0))])
            elif kind == "big":  # past 256 KiB: the writer thread, or the hand-off when in one segment
                recs = []
                for _ in range(rng.randint(66, 75)):
                    n += 1
                    recs.append(NewRecord(RT_MSG, {"n": n}, _body(rng, n, 4000), IndexTarget("big", n % 2)))
                await batch(recs)
            elif kind == "mixed":  # a batch and singles at once
                await asyncio.gather(batch([msg() for _ in range(rng.randint(1, 8))]),
                                     *(one(msg()) for _ in range(rng.randint(1, 8))))
            elif kind == "checkpoint":
                await store._checkpoint()
            elif kind == "flush":
                await store.flush()
            else:  # a record without an index entry (a transaction's outcome in the log only, say)
                n += 1
                await batch([NewRecord(RT_PLAIN, {"n": n}, _body(rng, n))])
        w.segment_files = len(store._log.segments)
        await store.close()
    return w


async def _recover_and_check(w: Workload, root: Path, k: int, mode: str, seed: int) -> dict:
    fs, meta, stats = power_cut(root.parent / "recorded", w.trace, k, mode, seed)
    # the recovered disk: the surviving files and metadata
    root.mkdir()  # noqa: ASYNC240
    fs = _rebase(fs, root.parent / "recorded", root)
    with memory_metadata(meta, None):
        store = await MessageStore.open(root, segment_size=SEGMENT, flush="sync", fileio=fs, clock=lambda: CLOCK,
                                        max_open_indexes=4)
    try:
        _check(w, store, k)
        ck = await store.metadata.get(CHECKPOINT_KEY)
        if isinstance(ck, dict):
            assert ck["pos"] <= store.end_pos, f"checkpoint {ck['pos']} ahead of the log end {store.end_pos}"
            for t, q, end in ck["queues"]:
                assert end <= store.queue_end(t, q), f"checkpointed end {end} of {t}/{q} ahead of its index"
        # the store goes on: a new record lands at the end, at the next offset of its queue
        end, qend = store.end_pos, store.queue_end("orders", 0)
        [s] = await store.append_batch([NewRecord(RT_MSG, {"n": -1}, b"after", IndexTarget("orders", 0))])
        assert s.pos >= end and s.queue_offset == qend
        assert store.read_queue_records("orders", 0, qend, 5)[0][1].body == b"after"
        stats["clean"] = store.recovered_clean
    finally:
        await store.close()
    return stats


def _rebase(fs: TracingFS, old: Path, new: Path) -> TracingFS:
    """The same files with paths under ``new`` instead of ``old``."""
    o, nw = str(old), str(new)
    files = {nw + p[len(o):]: bytes(ino.data) for p, ino in fs.names.items()}
    dirs = {nw + d[len(o):] for d in fs.dirs}
    return TracingFS(new, files, dirs)


def _check(w: Workload, store: MessageStore, k: int) -> None:
    # 1. the log holds nothing that was never appended
    found = {}
    for rec in store.iter_log(store.start_pos):
        for r in list(bundle_members(rec)) if isinstance(rec.header, list) else [rec]:
            found[r.pos] = (r.rtype, r.header, r.body)
            assert w.by_pos.get(r.pos) == found[r.pos], f"unknown record at {r.pos}"
    # 2. each index is contiguous, and points where the append put each entry
    indexed = {}
    for topic, qid in store.queues():
        start, end = store.queue_start(topic, qid), store.queue_end(topic, qid)
        entries = store.read_queue(topic, qid, start, end - start + 1)
        assert [o for o, _ in entries] == list(range(start, end)), f"{topic}/{qid} not contiguous"
        for o, e in entries:
            want = w.entries.get((topic, qid, o))
            assert want is not None, f"{topic}/{qid} entry {o} was never appended"
            assert e.pos == want[0], f"{topic}/{qid} entry {o} points at {e.pos}, not {want[0]}"
            assert want[1] in found, f"{topic}/{qid} entry {o} ahead of the log"
            indexed[(topic, qid, o)] = e.pos
        tail = max(start, end - 16)  # records through the index: the tail, where recovery worked
        recs = store.read_queue_records(topic, qid, tail, end - tail + 1)
        assert [(o, (r.rtype, r.header, r.body)) for o, r in recs] == [(o, found[indexed[(topic, qid, o)]])
                                                                       for o in range(tail, end)]
    # 3. every acknowledged record is intact, in the log and through its queue index
    for at, pos, key in w.acked:
        if at > k:
            break
        assert found.get(pos) == w.by_pos[pos], f"acknowledged record at {pos} lost or changed"
        if key is not None:
            assert indexed.get(key) == w.entries[key][0], f"acknowledged entry {key} lost"


@pytest.mark.timeout(60 + CUTS // 10)  # (about 20 s for the default budget; headroom on a loaded machine)
def test_power_cuts_lose_nothing_acknowledged(tmp_path, capsys):
    t0 = time.monotonic()
    workloads = []
    loop = asyncio.new_event_loop()
    for seed in range(1, WORKLOADS + 1):
        root = tmp_path / "recorded"
        workloads.append(loop.run_until_complete(_record(root, seed)))
        shutil.rmtree(root)
    recorded = time.monotonic() - t0
    firsts = list(accumulate((len(w.trace) + 1 for w in workloads), initial=0))
    positions = firsts.pop()  # cut points: after 0 .. len(trace) operations of each workload
    counts: Counter = Counter()
    cuts: set = set()

    @settings(max_examples=CUTS, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def cut(data) -> None:
        x = data.draw(st.integers(0, 2**32 - 1), "cut point")
        mode = data.draw(st.sampled_from(("mixed", "mixed", "drop", "keep")), "unsynced writes")
        seed = data.draw(st.integers(0, 2**32 - 1), "seed")
        # the cut point (workload and position in its trace): a hash of the whole example,
        # spread over every trace (Hypothesis repeats its favourite integers across
        # examples, but not whole examples)
        digest = hashlib.blake2b(repr((x, mode, seed)).encode(), digest_size=8).digest()
        at = int.from_bytes(digest, "little") % positions
        wi = bisect.bisect_right(firsts, at) - 1
        w, k = workloads[wi], at - firsts[wi]
        note(f"cut after {k} of {len(w.trace)} operations of workload {wi}")
        root = tmp_path / f"cut{counts['cuts']}"
        try:
            stats = loop.run_until_complete(_recover_and_check(w, root, k, mode, seed))
        finally:
            shutil.rmtree(root, ignore_errors=True)
        counts["cuts"] += 1
        counts[f"mode {mode}"] += 1
        counts["clean"] += stats["clean"]
        counts["lost writes"] += stats["dropped"]
        counts["torn writes"] += stats["torn"]
        counts["cut with unsynced changes"] += stats["pending"] > 0
        cuts.add((wi, k))

    try:
        cut()
    finally:
        loop.close()
    elapsed = time.monotonic() - t0
    ops = sum(len(w.trace) for w in workloads)
    acked = sum(len(w.acked) for w in workloads)
    with capsys.disabled():
        print(f"\npower loss: {counts['cuts']} cut points ({len(cuts)} distinct) over {len(workloads)} workloads "
              f"({ops} traced operations, {acked} acknowledged records, "
              f"{sum(w.segment_files for w in workloads)} segment files); {counts['cut with unsynced changes']} cuts "
              f"with unsynced changes, {counts['lost writes']} writes/changes lost, {counts['torn writes']} torn, "
              f"{counts['clean']} clean restarts; modes {dict((m, c) for m, c in counts.items() if m.startswith('mode'))}; "
              f"recorded in {recorded:.1f} s, {elapsed:.1f} s in all")
    assert counts["cuts"] >= min(CUTS, 1000)
