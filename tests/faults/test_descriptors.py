"""Bounded descriptors: any number of queues, a fixed number of open index files.

Finding 2 of issue 11: every (topic, queue) index file stayed open forever, so a client
auto-creating topics made sends fail with ``EMFILE`` and, after a restart that reopened them
all, broke the broker for good. Here a broker runs under a low ``RLIMIT_NOFILE`` (soft and
hard, so it cannot raise it) while one client creates far more topics than the limit.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from consumer_sdk import ConsumeResult, PushConsumer
from producer_sdk import Producer

NOFILE = 512  # the broker keeps a quarter (128) of it for open index files
TOPICS = 600  # one index file each: more than the whole descriptor limit


def open_index_files(pid: int, data_dir: Path) -> int:
    """Descriptors of process ``pid`` open on files under ``data_dir/index``."""
    index = str(data_dir / "index")
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(index):
                n += 1
        except OSError:
            pass
    return n


async def send_each(address: str, topics: list[str], body: str) -> None:
    async with Producer(address) as p:
        sem = asyncio.Semaphore(64)

        async def one(t: str) -> None:
            async with sem:
                await p.send(t, f"{body} {t}")

        await asyncio.gather(*(one(t) for t in topics))


async def first_message(address: str, topic: str) -> bytes:
    got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def on(m):
        if not got.done():
            got.set_result(m.body)
        return ConsumeResult.SUCCESS

    async with PushConsumer(address, group="reader", topic=topic, listener=on):
        return await asyncio.wait_for(got, 20)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to count descriptors")
async def test_more_topics_than_descriptors_survive_kill9(broker_factory):
    b = broker_factory("--max-topics", "100000", "--default-queues", "1", nofile=NOFILE)
    old = [f"t{i}" for i in range(TOPICS)]
    await send_each(b.address, old, "old")  # every send succeeds (none gets EMFILE)
    held = open_index_files(b.proc.pid, b.data_dir)
    assert held <= NOFILE // 4, f"{held} index files open for {TOPICS} queues"

    b.kill9()
    b.start()  # recovery must not open every index file at once
    new = [f"n{i}" for i in range(TOPICS // 2)]
    await send_each(b.address, new + old[::7], "again")
    held = open_index_files(b.proc.pid, b.data_dir)
    assert held <= NOFILE // 4, f"{held} index files open after the restart"
    for t in (old[0], old[TOPICS // 2], old[-1], new[-1]):
        body = await first_message(b.address, t)
        assert body == (f"old {t}" if t in old else f"again {t}").encode()
