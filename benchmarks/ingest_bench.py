"""The broker's own CPU per stored message on the SEND path, in one process, without sockets.

How this works
--------------
A real ``EmbeddedEngine`` (``--flush async``: written, not fsynced, so no disk wait is in
the count) is started in a temporary directory, with the native front end's
``ClientConnection`` on a stand-in transport that only keeps the bytes written to it. The
connection gets a HELLO, then SEND frames as the producer SDK builds them for ``send`` calls
from many tasks: micro-batches of ``--per-send`` messages (64, the SDK's largest) of 1 KiB,
``[body, None, [], {}, born]`` each, several frames per read (``--frames-per-read``, 2 by
default: a producer with 256 sends in flight has four micro-batches of 64 KiB on the wire,
which a 256 KiB socket read splits in about two). Each read goes
through ``data_received``; the loop then runs until every SEND of it is answered. What is
measured is the broker's whole ingest path: frame splitting and decoding, the request's
checks, records built (a micro-batch of 16 or more is one bundle record), the append into
the log's batch, the writer's ``pwrite`` of the batch and its index entries, the REPLY
frames encoded and written to the transport, and the event-loop iterations in between;
nothing of a real socket or an fsync, and no consumer (``dispatch`` finds no group).

Prints the CPU time per message (``time.process_time``). On a shared machine that moves
with the other load; run it under ``valgrind --tool=cachegrind --cache-sim=no`` with two
``--count`` values, each also with ``--setup-only`` (the same start, the frames built, no
frame fed), for instruction counts that do not: (full - setup) at the larger count minus
the same at the smaller, over the difference of counts, is the ingest path's cost per
message without the start-up.

``python -m benchmarks.ingest_bench [--count N] [--per-send N] [--frames-per-read N] [--setup-only]``
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
import tempfile
import time
from typing import Any

__all__ = ["ingest_bench_main"]

BODY = b"x" * 1024


class _Transport(asyncio.Transport):
    """Keeps the size of what the broker writes; nothing goes anywhere."""

    def __init__(self) -> None:
        super().__init__()
        self.written = 0
        self._closing = False
        self.conn: Any = None
        self.waiter: asyncio.Future[None] | None = None

    def write(self, data: Any) -> None:
        self.written += len(data)
        if self.waiter is not None and not self.conn._inflight:  # every request answered
            self.waiter.set_result(None)
            self.waiter = None

    def get_write_buffer_size(self) -> int:
        return 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 1) if name == "peername" else default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        self._closing = True

    def abort(self) -> None:
        self._closing = True


async def _run(count: int, per_send: int, per_read: int, setup_only: bool) -> float:
    from broker.config import BrokerConfig
    from broker.engines.embedded.engine import EmbeddedEngine
    from broker.frontends.native.connection import ClientConnection
    from broker.frontends.native.listener import NativeListener
    from broker.security import BrokerSecurity
    from protocol import PROTOCOL_VERSION, Op, encode_frame

    with tempfile.TemporaryDirectory() as d:
        config = BrokerConfig(data_dir=d, flush="async", auto_create_topics=True)
        engine = EmbeddedEngine(config)
        await engine.start()
        try:
            listener = NativeListener(engine, config, security=BrokerSecurity(engine, config))
            conn = ClientConnection(listener)
            transport = _Transport()
            conn.connection_made(transport)
            conn.data_received(encode_frame(Op.HELLO, 1, {"version": PROTOCOL_VERSION, "client_id": "bench",
                                                          "role": "producer"}))
            # the reads, built before the clock starts: frames as the SDK encodes them
            reads: list[bytes] = []
            rid = 1
            sent = 0
            while sent < count:
                frames = []
                for _ in range(per_read):
                    n = min(per_send, count - sent)
                    if n <= 0:
                        break
                    rid += 1
                    born = int(time.time() * 1000)
                    frames.append(encode_frame(Op.SEND, rid, {
                        "topic": "t", "msgs": [[BODY, None, [], {}, born] for _ in range(n)], "half": False}))
                    sent += n
                reads.append(b"".join(frames))
            if setup_only:
                return 0.0
            gc.freeze()  # the broker's settings (broker.cli)
            gc.set_threshold(50_000, 20, 100)
            loop = asyncio.get_running_loop()
            transport.conn = conn
            start = time.process_time()
            for data in reads:
                transport.waiter = waiter = loop.create_future()
                conn.data_received(data)
                await waiter  # every SEND of this read answered
            elapsed = time.process_time() - start
            if conn.closed or engine.stats["sent"] != count:
                raise RuntimeError(f"stored {engine.stats['sent']} of {count} messages")
            return elapsed / count
        finally:
            await engine.stop()


def ingest_bench_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.ingest_bench", description=__doc__.split("\n")[0])
    ap.add_argument("--count", type=int, default=200_000, help="messages (default 200000)")
    ap.add_argument("--per-send", type=int, default=64, help="messages per SEND frame (default 64)")
    ap.add_argument("--frames-per-read", type=int, default=2, help="SEND frames per read (default 2)")
    ap.add_argument("--setup-only", action="store_true",
                    help="start and build the frames only (subtract its instruction count from a full run's)")
    args = ap.parse_args(argv)
    try:
        import uvloop  # the broker's loop (broker.cli)
    except ImportError:  # pragma: no cover
        run: Any = asyncio.run
    else:
        run = uvloop.run
    per: Any = run(_run(args.count, args.per_send, args.frames_per_read, args.setup_only))
    print(f"ingest: {per * 1e6:.2f} us CPU per message ({args.count} messages, {args.per_send} per SEND)")
    return 0


if __name__ == "__main__":
    sys.exit(ingest_bench_main())
