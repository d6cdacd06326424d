"""Real faults: ``kill -9`` of the broker or of a consumer process, restarts during backoff.

On both engines (``tests.engines``): in cluster mode "the broker" is both gateways, killed
and restarted together over the engine, which keeps everything; that variant runs under
``-m slow`` (``slow_cluster_broker_factory``).
"""

from __future__ import annotations

import asyncio
import sys
import time

from consumer_sdk import ConsumeResult, PushConsumer
from producer_sdk import HalfMQError, Producer
from tests.conftest import ROOT, wait_for
from tests.engines import slow_cluster_broker_factory

__all__ = ["slow_cluster_broker_factory"]


async def collect(address: str, group: str, topic: str, want: set[str], timeout: float = 20.0) -> dict[str, int]:
    """Consume with a new group until every id in ``want`` arrived; return id -> deliveries."""
    seen: dict[str, int] = {}

    async def on(m):
        seen[m.msg_id] = seen.get(m.msg_id, 0) + 1
        return ConsumeResult.SUCCESS

    async with PushConsumer(address, group=group, topic=topic, listener=on):
        await wait_for(lambda: want <= set(seen), timeout=timeout, what=f"{len(want - set(seen))} missing messages")
    return seen


async def test_kill9_broker_mid_stream_loses_no_acknowledged_send(broker_factory):
    b = broker_factory()
    acked: set[str] = set()
    stop = asyncio.Event()

    async with Producer(b.address, send_timeout=2.0) as p:

        async def sender(n: int) -> None:
            i = 0
            while not stop.is_set():
                try:
                    r = await p.send("stream", f"{n}-{i}".encode())
                    acked.add(r.msg_id)
                except HalfMQError:
                    pass  # in flight when the broker died: not acknowledged, may or may not exist
                i += 1

        senders = [asyncio.create_task(sender(n)) for n in range(16)]
        await wait_for(lambda: len(acked) >= 500, what="500 acknowledged sends")
        b.kill9()
        killed_at = len(acked)
        stop.set()
        await asyncio.gather(*senders)
    assert killed_at >= 500
    b.start()
    seen = await collect(b.address, "after-crash", "stream", set(acked))
    assert set(acked) <= set(seen)


async def test_kill9_consumer_holding_leases_redelivers_to_another_member(broker_factory):
    b = broker_factory("--ack-timeout", "1500ms")
    async with Producer(b.address) as p:
        sent = {(await p.send("leases", f"m{i}".encode())).msg_id for i in range(5)}
    holder = await asyncio.create_subprocess_exec(
        sys.executable, str(ROOT / "tests/faults/hold_consumer.py"), b.address, "g", "leases",
        cwd=ROOT, stdout=asyncio.subprocess.PIPE,
    )
    try:
        held = set()
        deadline = time.monotonic() + 15
        while held != sent and time.monotonic() < deadline:
            line = await asyncio.wait_for(holder.stdout.readline(), 15)
            if line:
                held.add(line.decode().split()[0])
        assert held == sent
    finally:
        holder.kill()  # SIGKILL: the leases are never acked
        await holder.wait()
    got: dict[str, int] = {}
    killed = time.monotonic()

    async def on(m):
        got[m.msg_id] = m.reconsume_times
        return ConsumeResult.SUCCESS

    async with PushConsumer(b.address, group="g", topic="leases", listener=on):
        await wait_for(lambda: set(got) == sent, timeout=15, what="redelivery after ack timeout")
    assert all(n == 1 for n in got.values()), got
    assert time.monotonic() - killed < 15


async def test_broker_restart_during_backoff_keeps_retry_count_and_schedule(broker_factory):
    b = broker_factory("--retry-delays", "3s")
    async with Producer(b.address) as p:
        msg_id = (await p.send("backoff", b"x")).msg_id
    attempts: list[tuple[int, float]] = []

    async def fail_first(m):
        attempts.append((m.reconsume_times, time.time()))
        return ConsumeResult.RECONSUME_LATER if m.reconsume_times == 0 else ConsumeResult.SUCCESS

    async with PushConsumer(b.address, group="g", topic="backoff", listener=fail_first) as c:
        await wait_for(lambda: attempts, what="first delivery")
        failed_at = attempts[0][1]
        await c.close()  # acks flushed: the retry is recorded before the restart
    b.kill9()
    b.start()
    async with PushConsumer(b.address, group="g", topic="backoff", listener=fail_first):
        await wait_for(lambda: len(attempts) >= 2, timeout=15, what="redelivery after restart")
    assert attempts[1][0] == 1  # the retry count survived
    assert attempts[1][1] >= failed_at + 3.0 - 0.05  # and so did the schedule
    assert msg_id


async def _consume_all(address: str, group: str, topic: str, want: set[str]) -> None:
    seen: set[str] = set()

    async def track(m):
        seen.add(m.msg_id)
        return ConsumeResult.SUCCESS

    async with PushConsumer(address, group=group, topic=topic, listener=track) as c:
        await wait_for(lambda: want <= seen, what="every message consumed")
        await c.close()  # graceful: in-flight acks are sent and confirmed


async def test_c8_acked_messages_not_redelivered_after_graceful_restart(broker_factory):
    b = broker_factory()
    async with Producer(b.address) as p:
        sent = {r.msg_id for r in await p.send_batch("c8", [f"m{i}" for i in range(50)])}
    await _consume_all(b.address, "g", "c8", sent)
    assert b.restart().proc is not None  # SIGTERM, then start on the same data dir
    again: list[str] = []

    async def on(m):
        again.append(m.msg_id)
        return ConsumeResult.SUCCESS

    async with Producer(b.address) as p, PushConsumer(b.address, group="g", topic="c8", listener=on):
        marker = (await p.send("c8", b"after restart")).msg_id
        await wait_for(lambda: marker in again, what="the marker sent after the restart")
    assert again == [marker]  # nothing acked before the restart came back


async def test_c8_after_kill9_acked_messages_may_return_but_none_is_lost(broker_factory):
    # the killed broker's leases: lost with it on the embedded engine; in cluster mode they
    # stay in the engine until the ack timeout ends them (the gateways fetch ahead of what the
    # consumer was handed), so that timeout is made shorter than collect()'s wait
    b = broker_factory("--ack-timeout", "5s")
    async with Producer(b.address) as p:
        sent = {r.msg_id for r in await p.send_batch("c8k", [f"m{i}" for i in range(200)])}
    acked: set[str] = set()

    async def half(m):
        acked.add(m.msg_id)
        return ConsumeResult.SUCCESS

    async with PushConsumer(b.address, group="g", topic="c8k", listener=half, prefetch=8, concurrency=1):
        await wait_for(lambda: len(acked) >= 100, what="half of the messages acked")
        b.kill9()
    b.start()
    redelivered = await collect(b.address, "g", "c8k", sent - acked)
    assert sent - acked <= set(redelivered)  # never a message lost
