"""References records: one record that gives a queue one index entry per earlier record."""

from __future__ import annotations

import os
import random

import pytest

from storage import (
    BundleTarget,
    IndexTarget,
    MessageStore,
    Metadata,
    NewBundle,
    NewRecord,
    RefsTarget,
)
from storage.framing import MEMBER_BIT
from tests.storage.test_storage_bundle import _crash

SEG = 8192


async def _stored_targets(s: MessageStore, rng: random.Random, n: int) -> list[tuple]:
    """``n`` records to refer to (plain ones and bundle members): ``(pos, entry size, header,
    body)`` each."""
    out = []
    plain = [NewRecord(1, {"k": k}, rng.randbytes(rng.randrange(1, 300)), IndexTarget("%HALF%", 0)) for k in range(n // 2)]
    for rec, st in zip(plain, await s.append_batch(plain), strict=True):
        out.append((st.pos, st.size, rec.header, rec.body))
    rest = n - len(out)
    bundle = NewBundle(2, [[f"m{k}"] for k in range(rest)], [rng.randbytes(rng.randrange(1, 300)) for _ in range(rest)],
                       BundleTarget("%HALF%", 0, [0] * rest))
    for h, b, st in zip(bundle.headers, bundle.bodies, await s.append_batch([bundle]), strict=True):
        out.append((st.pos, st.size | MEMBER_BIT, h, b))
    return out


async def _targets_closed(path, rng: random.Random, n: int) -> tuple[list[tuple], dict]:
    """``_stored_targets`` in a store then closed; with its last checkpoint."""
    async with MessageStore.open(path, segment_size=SEG) as s:
        targets = await _stored_targets(s, rng, n)
    md = await Metadata.open(path / "meta.sqlite")
    checkpoint = await md.get("storage.checkpoint")
    await md.close()
    return targets, checkpoint


def _check(s: MessageStore, queue_id: int, want: list[tuple], tags: list[int]) -> None:
    got = s.read_queue_records("t", queue_id, 0, 1000)
    assert [(o, r.pos, r.header, r.body) for o, r in got] == [(k, p, h, b) for k, (p, _z, h, b) in enumerate(want)]
    entries = s.read_queue("t", queue_id, 0, 1000)
    assert [(e.pos, e.size, e.tag_hash) for _, e in entries] == [
        (p, z & ~MEMBER_BIT, t) for (p, z, _h, _b), t in zip(want, tags, strict=True)]


async def test_references_record_gives_one_entry_each_read_from_cache_disk_and_recovery(tmp_path):
    rng = random.Random(7)
    async with MessageStore.open(tmp_path, segment_size=SEG) as s:
        targets = await _stored_targets(s, rng, 12)
        rng.shuffle(targets)  # (a reference may point anywhere earlier, in any order)
        a, b = targets[:7], targets[7:]
        tags_a, tags_b = [k + 1 for k in range(7)], [0xFFFFFFFF] * 5
        stored = await s.append_batch([
            NewRecord(6, {"ids": ["a"]}, b"", RefsTarget("t", 0, [(p, z, t) for (p, z, _h, _b), t in zip(a, tags_a, strict=True)])),
            NewRecord(6, {"ids": ["b"]}, b"", RefsTarget("t", 1, [(p, z, t) for (p, z, _h, _b), t in zip(b, tags_b, strict=True)])),
        ])
        assert [st.queue_offset for st in stored] == [0, 0] and s.stats["ref_records"] == 2
        assert s.queue_end("t", 0) == 7 and s.queue_end("t", 1) == 5
        _check(s, 0, a, tags_a)  # from the recent-record cache
        _check(s, 1, b, tags_b)
        assert s.read(stored[0].pos).header == {"ids": ["a"]}
    async with MessageStore.open(tmp_path, segment_size=SEG, cache_bytes=0) as s:
        _check(s, 0, a, tags_a)  # from the disk
    # a crash with no checkpoint and no index files: the entries come back from the record
    await _crash(tmp_path, None)
    for f in (tmp_path / "index").rglob("*.idx"):
        f.unlink()
    async with MessageStore.open(tmp_path, segment_size=SEG, cache_bytes=0) as s:
        assert not s.recovered_clean
        _check(s, 0, a, tags_a)
        _check(s, 1, b, tags_b)
        more = await s.append_batch([NewRecord(6, {}, b"", RefsTarget("t", 0, [(a[0][0], a[0][1], 0)]))])
        assert more[0].queue_offset == 7


async def test_torn_references_record_is_gone_as_a_whole(tmp_path):
    targets, checkpoint = await _targets_closed(tmp_path, random.Random(9), 6)
    async with MessageStore.open(tmp_path, segment_size=SEG) as s:
        first = await s.append_batch([NewRecord(6, {}, b"", RefsTarget("t", 0, [(p, z, 0) for p, z, _h, _b in targets[:3]]))])
        second = await s.append_batch([NewRecord(6, {}, b"", RefsTarget("t", 0, [(p, z, 0) for p, z, _h, _b in targets[3:]]))])
    await _crash(tmp_path, checkpoint)
    at = second[0].pos + second[0].size - 4  # the second one torn in its last reference
    base = at - at % SEG
    os.truncate(tmp_path / "log" / f"{base:020d}", at - base)
    async with MessageStore.open(tmp_path, segment_size=SEG) as s:
        assert not s.recovered_clean
        assert s.end_pos == first[0].pos + first[0].size
        _check(s, 0, targets[:3], [0, 0, 0])


async def test_bad_references_records_are_refused_and_leave_nothing(tmp_path):
    async with MessageStore.open(tmp_path, segment_size=SEG) as s:
        ok = NewRecord(1, {}, b"x", IndexTarget("t", 0))
        st = (await s.append_batch([ok]))[0]
        for bad in (
            RefsTarget("t", 0, []),
            RefsTarget("t", 0, [(st.pos, st.size, 1 << 32)]),  # tag hash out of range
            RefsTarget("t", 0, [(st.pos, -1, 0)]),  # a size no record has
            RefsTarget("t", 0, [(st.pos, st.size, 0)] * (SEG // 16)),  # larger than a segment
        ):
            with pytest.raises(ValueError):
                s.append([ok, NewRecord(6, {}, b"", bad)])
        assert s.queue_end("t", 0) == 1
        assert (await s.append_batch([ok]))[0].queue_offset == 1


async def test_references_records_ending_the_log_are_listed_after_a_crash(tmp_path):
    """``recovered_refs_tail``: the references records after the log's last record of any
    other kind, as a crash recovery finds them; none after a clean close."""
    targets, checkpoint = await _targets_closed(tmp_path, random.Random(11), 4)

    def refs(k: int, ids: list[str]) -> NewRecord:
        p, z, _h, _b = targets[k]
        return NewRecord(6, {"ids": ids}, b"", RefsTarget("t", 0, [(p, z, 0)]))

    async with MessageStore.open(tmp_path, segment_size=SEG) as s:
        assert s.recovered_clean and s.recovered_refs_tail == []
        # references, another record, then two references records ending the log
        stored = await s.append_batch([refs(0, ["a"]), NewRecord(3, {"ops": []}, b"", IndexTarget("%OP%", 0)),
                                       refs(1, ["b"]), refs(2, ["c"])])
    await _crash(tmp_path, checkpoint)
    async with MessageStore.open(tmp_path, segment_size=SEG) as s:
        assert not s.recovered_clean
        assert s.recovered_refs_tail == [stored[2].pos, stored[3].pos]
        assert [s.read(p).header["ids"] for p in s.recovered_refs_tail] == [["b"], ["c"]]
        await s.append_batch([NewRecord(3, {"ops": []}, b"", IndexTarget("%OP%", 0))])
    await _crash(tmp_path, checkpoint)
    async with MessageStore.open(tmp_path, segment_size=SEG) as s:
        assert not s.recovered_clean and s.recovered_refs_tail == []
