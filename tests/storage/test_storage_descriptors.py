"""Bounded index descriptors: many queues through a small cache of open index files."""

from __future__ import annotations

import os

import pytest

from storage import IndexTarget, MessageStore, NewRecord
from storage.queue_index import IndexFiles


def index_fds(data_dir) -> int:
    """Descriptors of this process open on the store's index files."""
    index = str(data_dir / "index")
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += os.readlink(f"/proc/self/fd/{fd}").startswith(index)
        except OSError:
            pass
    return n


pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to count descriptors")


async def test_many_queues_hold_a_bounded_number_of_descriptors(tmp_path):
    queues = 200
    async with MessageStore.open(tmp_path, segment_size=1 << 16, max_open_indexes=8) as s:
        for round_ in range(3):  # small batches on the loop, one big one through the writer thread
            recs = [NewRecord(1, {"r": round_}, b"x%d" % q * (1 + 300 * (round_ == 2)), IndexTarget(f"t{q}", q % 3))
                    for q in range(queues)]
            await s.append_batch(recs)
            assert index_fds(tmp_path) <= 8
        for q in range(queues):
            got = s.read_queue_records(f"t{q}", q % 3, 0, 10)
            assert [r.header["r"] for _, r in got] == [0, 1, 2]
        assert index_fds(tmp_path) <= 8
        await s._checkpoint()  # fsyncs every dirty index file without the cache growing
        assert index_fds(tmp_path) <= 8
    assert index_fds(tmp_path) == 0
    async with MessageStore.open(tmp_path, max_open_indexes=8) as s:
        assert index_fds(tmp_path) <= 8
        assert len(s.queues()) == queues
        assert all(s.queue_end(f"t{q}", q % 3) == 3 for q in range(queues))


async def test_recovery_rebuilds_many_indexes_through_the_cache(tmp_path):
    s = await MessageStore.open(tmp_path, max_open_indexes=4)
    await s.append_batch([NewRecord(1, {"q": q}, b"b", IndexTarget(f"t{q}", 0)) for q in range(50)])
    # a crash: no checkpoint, no clean marker; the index files lose what they held
    s._writer_task.cancel()
    for t in s._tasks:
        t.cancel()
    s._files.close_all()
    s._log.close()
    await s.metadata.close()
    s._lock.release()
    for q in range(50):
        os.truncate(tmp_path / "index" / f"t{q}" / "0.idx", 24)
    async with MessageStore.open(tmp_path, max_open_indexes=4) as s:
        assert not s.recovered_clean
        assert index_fds(tmp_path) <= 4
        for q in range(50):
            got = s.read_queue_records(f"t{q}", 0, 0, 5)
            assert [(o, r.header) for o, r in got] == [(0, {"q": q})]


def test_the_cache_closes_the_least_recently_used(tmp_path):
    from storage.queue_index import QueueIndexFile

    files = IndexFiles(2)
    qs = [QueueIndexFile.open(tmp_path, f"t{i}", 0, files) for i in range(3)]
    assert len(files) == 2 and qs[2].fd < 0  # (no room: opened, read and closed again)
    qs[0].write_entries(0, bytes(24))  # used: kept over q1
    qs[2].write_entries(0, bytes(24))
    assert qs[0].fd >= 0 and qs[1].fd < 0 and qs[2].fd >= 0
    files.close_all()
    assert all(q.fd < 0 for q in qs)
    with pytest.raises(ValueError):
        IndexFiles(0)
