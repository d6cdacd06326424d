"""Many scheduled messages keep the broker's memory bounded: the schedule lives in the log.

The broker's RSS is read with psutil. While sending, the store's cache of recent records
(32 MiB) fills up whatever is sent. The broker is then killed (``kill -9``) and restarted:
every message must still be scheduled. Recovering after a crash reads back what was
written since the last checkpoints (transient memory, whose high-water mark the allocator
keeps), so the RSS is measured after one more, graceful, restart: the cache is empty and
the schedule is loaded from its snapshot, and the RSS shows what the scheduled messages
themselves cost -- next to nothing per message. 200,000 run in CI;
a million (about 1.5 minutes) only when asked for::

    HALFMQ_TEST_MILLION=1 python -m pytest -m slow tests/faults/test_schedule_memory.py
"""

from __future__ import annotations

import os
import time

import pytest

from producer_sdk import Producer
from tests.sdk.schedule_helpers import topic_view

psutil = pytest.importorskip("psutil", reason="the memory checks read the broker's RSS with psutil")

MB = 1 << 20


def _rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss  # type: ignore[no-any-return]


async def _check_memory(broker_factory, n: int) -> None:
    """Schedule ``n`` messages (due in 1-2 h) on a new broker, kill -9 it, restart it (every
    message still scheduled), restart it again gracefully; check its RSS along the way."""
    b = broker_factory()
    async with Producer(b.address, send_timeout=30) as p:
        await p.send("mem", "warm-up")
    # the baseline is a restarted broker too, started the way the one measured at the end is
    b.restart()
    fresh = _rss(b.proc.pid)
    async with Producer(b.address, send_timeout=30) as p:
        now = time.time()
        for k in range(0, n, 1000):
            await p.send_batch("mem", [{"body": b"x" * 64, "deliver_at": now + 3600 + (k + j) % 3600}
                                       for j in range(1000)])
    sent = _rss(b.proc.pid)
    assert topic_view(b.http_url, "mem")["scheduled"] == n
    b.kill9()
    b.start(timeout=120)
    view = topic_view(b.http_url, "mem")
    assert view["scheduled"] == n and view["messages"] == 1  # every one still scheduled, none released
    b.restart()
    assert topic_view(b.http_url, "mem")["scheduled"] == n
    restarted = _rss(b.proc.pid)
    print(f"RSS fresh {fresh / MB:.1f} MB, sent {sent / MB:.1f} MB, restarted {restarted / MB:.1f} MB")
    # while sending: the record cache (32 MiB) and allocator slack, not an object per message
    assert sent - fresh < 80 * MB, f"RSS grew {(sent - fresh) / MB:.1f} MB while sending"
    # after the restart the schedule costs its fixed-size wheel, not a Python object per message
    assert restarted - fresh < 10 * MB, f"RSS after restart {(restarted - fresh) / MB:.1f} MB over a fresh broker"


@pytest.mark.timeout(240)
async def test_200k_scheduled_messages_keep_memory_bounded(broker_factory):
    await _check_memory(broker_factory, 200_000)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("HALFMQ_TEST_MILLION") != "1",
                    reason="a million scheduled messages take minutes: set HALFMQ_TEST_MILLION=1")
@pytest.mark.timeout(900)
async def test_a_million_scheduled_messages_keep_memory_bounded(broker_factory):
    await _check_memory(broker_factory, 1_000_000)
