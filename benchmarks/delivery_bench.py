"""The broker's own CPU per delivered and acked message, in one process, without sockets.

How this works
--------------
A real ``MessageStore`` (``--flush async``, in a temporary directory) is filled with
``--count`` messages of 1 KiB, in bundles of 100 as an SDK's micro-batched SEND stores them,
spread over the topic's 8 queues. Then one consumer group with one push member
(prefetch 1024) is driven as the embedded engine's dispatch drives it: poll (lease, build
the wire messages), encode one DELIVER frame for the lot, ack every token, take the acked
offsets and encode their ``RT_ACK`` record, with the broker's garbage-collector settings.
What is measured is only that loop: the delivery and ack path of the broker's core and the
record reads it makes (from the store's cache of recent records), nothing of the socket,
the log writes or the fsync.

Prints the CPU time per message (``time.process_time``). On a shared machine that moves
with the other load; run it under ``valgrind --tool=cachegrind --cache-sim=no`` with two
``--count`` values, each also with ``--fill-only``, for instruction counts that do not:
(full - fill) at the larger count minus the same at the smaller, over the difference of
counts, is the delivery path's cost per message without the start-up and the filling.

``python -m benchmarks.delivery_bench [--count N] [--fill-only]``
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
import tempfile
import time
from typing import Any

import msgpack

__all__ = ["delivery_bench_main"]

BODY = b"x" * 1024
PER_SEND = 100
QUEUES = 8


async def _run(count: int, fill_only: bool = False) -> float:
    from broker.core.delivery import GroupDelivery
    from broker.core.records import ACK_TOPIC, RT_ACK, RT_MSG, build_wire
    from protocol import Op, encode_frame
    from storage import BundleTarget, IndexTarget, MessageStore, NewBundle, NewRecord

    with tempfile.TemporaryDirectory() as d:
        store = await MessageStore.open(d, flush="async")
        try:
            sent = 0
            qid = 0
            while sent < count:
                n = min(PER_SEND, count - sent)
                await store.append_batch([NewBundle(
                    RT_MSG, [["t", None, (), {}, 0, store.epoch] for _ in range(n)], [BODY] * n,
                    BundleTarget("t", qid % QUEUES, [0] * n))])
                sent += n
                qid += 1
            if fill_only:
                return 0.0
            gd = GroupDelivery("g", store, queue_counts=lambda _t: QUEUES, retry_delays=(1.0,),
                               ack_timeout=60.0)
            gd.subscribe("m", "t", tags=None, prefetch=1024, max_reconsume_times=16)
            member = gd.members["m"]
            ack_many = getattr(gd, "ack_many", None)
            gc.freeze()  # the broker's settings (broker.cli)
            gc.set_threshold(50_000, 20, 100)
            done = 0
            start = time.process_time()
            while done < count:
                member.budget = 1 << 30
                now = time.time()
                out, _wake = gd.poll(now, build_wire)
                if not out:
                    raise RuntimeError(f"nothing to deliver after {done} of {count}")
                encode_frame(Op.DELIVER, 0, {"d": [[token, wire] for _m, token, wire in out]})
                acks = [(token, True) for _m, token, _wire in out]
                if ack_many is not None:
                    ack_many("m", acks, now)
                else:  # a core without ack_many (to compare with older code)
                    for token, ok in acks:
                        gd.ack("m", token, ok, now)
                msgpack.packb([RT_ACK, {"g": "g", "a": gd.take_acked()}])
                NewRecord(RT_ACK, {}, b"", IndexTarget(ACK_TOPIC, 0))
                done += len(out)
            return (time.process_time() - start) / count
        finally:
            await store.close()


def delivery_bench_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.delivery_bench", description=__doc__.split("\n")[0])
    ap.add_argument("--count", type=int, default=200_000, help="messages (default 200000)")
    ap.add_argument("--fill-only", action="store_true",
                    help="only fill the store (subtract its instruction count from a full run's)")
    args = ap.parse_args(argv)
    per: Any = asyncio.run(_run(args.count, args.fill_only))
    print(f"delivery+ack: {per * 1e6:.2f} us CPU per message ({args.count} messages)")
    return 0


if __name__ == "__main__":
    sys.exit(delivery_bench_main())
