"""The broker's cost per lone SEND: one message per frame, the client waiting for each reply.

How this works
--------------
A broker is started in its own process (``python -m broker``, a fresh data directory,
``--flush sync`` by default) and a bare client on a real TCP socket sends a HELLO, then
``--count`` SEND frames of one 1 KiB message each (``[body, None, [], {}, born]``, as the
producer SDK builds a lone ``send``), each only after the reply to the one before: the
one-at-a-time pattern of the harness's ``latency`` scenario, with no SDK cost on the client
side. What it prints per message:

- the broker's CPU time, user and system apart (from ``/proc/PID/stat``, read before the
  first and after the last SEND; the system part holds the write and fdatasync calls),
  which moves with the machine's other load;
- the client's round trip, p50 and p99 (the disk's write + fsync is in it with ``sync``).

``--client`` picks how the client waits for each reply: ``asyncio`` (a stream on the default
event loop, as before), ``blocking`` (a plain socket's ``recv``: the client sleeps in the
kernel, as any client that waits does) or ``spin`` (``recv`` with ``MSG_DONTWAIT`` in a loop:
the client never sleeps). ``blocking`` against ``spin`` is what waking a sleeping client
costs on this machine, apart from the server's work; ``--echo`` runs the same client against
``python -m benchmarks.echo serve`` (a reply per frame, no storage) instead of the broker.

``--cachegrind`` runs the broker under ``valgrind --tool=cachegrind --cache-sim=no`` twice,
with ``--count`` and with ``--short`` sends (``PYTHONHASHSEED=0``), stops it with SIGTERM and
prints the instructions of the long run minus the short one over the difference of counts:
the broker's whole per-frame path (read, decode, checks, append, write, fdatasync, reply
encoded and written, the event-loop iterations between) without its start and stop. The
machine's load does not move that figure.

``python -m benchmarks.lone_bench [--count N] [--flush sync|async] [--client asyncio|blocking|spin]
[--echo] [--cachegrind [--short N]]``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import time
from typing import Any

from benchmarks.systems.halfmq import READY_PREFIX
from protocol import PROTOCOL_VERSION, FrameDecoder, Op, encode_frame

__all__ = ["lone_bench_main"]

BODY = b"x" * 1024


async def _start(flush: str, workdir: str, prefix: list[str],
                 echo: bool = False) -> tuple[asyncio.subprocess.Process, str]:
    """Start the broker (under ``prefix``, e.g. valgrind), or with ``echo`` the echo server;
    return it and its TCP address."""
    data_dir = os.path.join(workdir, "data")
    server = (["-m", "benchmarks.echo", "serve"] if echo else
              ["-m", "broker", "--port", "0", "--http-port", "0", "--data-dir", data_dir, "--flush", flush])
    cmd = [*prefix, sys.executable, *server]
    env = dict(os.environ, PYTHONHASHSEED="0")
    with _log_file(os.path.join(workdir, "broker.log")) as err:
        proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE, stderr=err,
                                                    stdin=asyncio.subprocess.DEVNULL, env=env)
    assert proc.stdout is not None
    line = (await asyncio.wait_for(proc.stdout.readline(), 300)).decode(errors="replace")
    if echo:
        if not line.startswith("READY "):
            proc.kill()
            await proc.wait()
            raise RuntimeError(f"the echo server did not start: {line!r}")
        return proc, f"127.0.0.1:{int(line.split()[1])}"
    if not line.startswith(READY_PREFIX):
        proc.kill()
        await proc.wait()
        raise RuntimeError(f"broker did not start: {line!r}")
    fields = dict(part.split("=", 1) for part in line[len(READY_PREFIX):].split())
    return proc, fields["tcp"]


def _log_file(path: str) -> Any:
    return open(path, "wb")  # noqa: SIM115 - handed to the subprocess, closed by the caller


def _cpu_seconds(pid: int) -> tuple[float, float]:
    """The process's user and system CPU seconds so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tck = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tck, int(fields[12]) / tck


class _Client:
    """A bare client: one request at a time, its reply read whole."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.decoder = FrameDecoder(1 << 24)
        self.frames: list[Any] = []

    async def call(self, op: int, rid: int, payload: Any) -> Any:
        self.writer.write(encode_frame(op, rid, payload))
        while not self.frames:
            data = await self.reader.read(1 << 16)
            if not data:
                raise ConnectionError("the broker closed the connection")
            self.frames.extend(self.decoder.feed(data))
        return _reply(self.frames, rid)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


def _reply(frames: list[Any], rid: int) -> Any:
    """Take the first received frame: the reply to request ``rid`` (op 0: the echo server's)."""
    op, got, reply = frames.pop(0)
    if op not in (Op.REPLY, 0) or got != rid:
        raise RuntimeError(f"unexpected answer to request {rid}: {op} {got} {reply!r}")
    return reply


class _SocketClient:
    """A bare client on a plain socket: one request at a time, waiting for its reply in
    ``recv`` (``spin=False``: asleep in the kernel) or in a loop of non-blocking ``recv``
    calls (``spin=True``: never asleep). The echo server's replies (op 0) are taken too."""

    def __init__(self, host: str, port: int, spin: bool) -> None:
        self.sock = socket.create_connection((host, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.spin = spin
        self.decoder = FrameDecoder(1 << 24)
        self.frames: list[Any] = []

    async def call(self, op: int, rid: int, payload: Any) -> Any:
        """(Blocks the loop while it waits: nothing else runs on it meanwhile.)"""
        self.sock.sendall(encode_frame(op, rid, payload))
        recv = self.sock.recv
        while not self.frames:
            if self.spin:
                try:
                    data = recv(1 << 16, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    continue
            else:
                data = recv(1 << 16)
            if not data:
                raise ConnectionError("the server closed the connection")
            self.frames.extend(self.decoder.feed(data))
        return _reply(self.frames, rid)

    async def close(self) -> None:
        self.sock.close()


async def _run(count: int, flush: str, prefix: list[str], client_kind: str = "asyncio",
               echo: bool = False) -> tuple[tuple[float, float], list[float]]:
    """One broker (or echo server), ``count`` lone SENDs; return its user and system CPU
    seconds over them and the round trips."""
    workdir = tempfile.mkdtemp(prefix="halfmq-lone-")
    proc, address = await _start(flush, workdir, prefix, echo)
    try:
        host, port = address.rsplit(":", 1)
        client: _Client | _SocketClient
        if client_kind == "asyncio":
            client = _Client(*await asyncio.open_connection(host, int(port)))
        else:
            client = _SocketClient(host, int(port), spin=client_kind == "spin")
        call = client.call
        await call(Op.HELLO, 1, {"version": PROTOCOL_VERSION, "client_id": "lone-bench", "role": "producer"})
        rid = 2
        await call(Op.SEND, rid, {"topic": "lone", "msgs": [[BODY, None, [], {}, 0]], "half": False})
        cpu0 = _cpu_seconds(proc.pid)
        rtts = []
        for _ in range(count):
            rid += 1
            t0 = time.perf_counter()
            await call(Op.SEND, rid, {"topic": "lone", "msgs": [[BODY, None, [], {}, int(time.time() * 1000)]],
                                      "half": False})
            rtts.append(time.perf_counter() - t0)
        cpu1 = _cpu_seconds(proc.pid)
        cpu = (cpu1[0] - cpu0[0], cpu1[1] - cpu0[1])
        await client.close()
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 300)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        shutil.rmtree(os.path.join(workdir, "data"), ignore_errors=True)
    return cpu, rtts


def _instructions(out: str) -> int:
    """The instruction total of a cachegrind output file."""
    with open(out) as f:
        for line in f:
            if line.startswith("summary:"):
                return int(line.split()[1])
    raise RuntimeError(f"no summary in {out}")


async def _cachegrind(count: int, short: int, flush: str) -> None:
    totals = []
    with tempfile.TemporaryDirectory(prefix="halfmq-lone-cg-") as tmp:
        for n in (short, count):
            out = os.path.join(tmp, f"cg.{n}")
            await _run(n, flush, ["valgrind", "--tool=cachegrind", "--cache-sim=no", f"--cachegrind-out-file={out}"])
            totals.append(_instructions(out))
    per = (totals[1] - totals[0]) / (count - short)
    print(f"lone SEND, --flush {flush}: {totals[1]:,} instructions at {count}, {totals[0]:,} at {short}: "
          f"{per:,.0f} per message")


def lone_bench_main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.lone_bench", description=__doc__.split("\n")[0])
    ap.add_argument("--count", type=int, default=2500)
    ap.add_argument("--flush", choices=("sync", "async"), default="sync")
    ap.add_argument("--cachegrind", action="store_true", help="instructions per message (long minus short run)")
    ap.add_argument("--short", type=int, default=500, help="the short run's count with --cachegrind")
    ap.add_argument("--client", choices=("asyncio", "blocking", "spin"), default="asyncio",
                    help="how the client waits for a reply: an asyncio stream (default), asleep in recv, "
                         "or never asleep (non-blocking recv in a loop)")
    ap.add_argument("--echo", action="store_true",
                    help="the echo server (python -m benchmarks.echo serve) instead of the broker")
    args = ap.parse_args(argv)
    if args.cachegrind:
        if args.echo or args.client != "asyncio":
            ap.error("--cachegrind measures the broker with the default client")
        asyncio.run(_cachegrind(args.count, args.short, args.flush))
        return
    cpu, rtts = asyncio.run(_run(args.count, args.flush, [], args.client, args.echo))
    rtts.sort()
    what = "echo server" if args.echo else f"broker --flush {args.flush}"
    print(f"lone SEND, {what}, client {args.client}, {args.count} messages: server CPU {cpu[0] / args.count * 1e6:.1f} us "
          f"user + {cpu[1] / args.count * 1e6:.1f} us system per message; round trip p50 {statistics.median(rtts) * 1e3:.3f} ms, "
          f"p99 {rtts[int(len(rtts) * 0.99)] * 1e3:.3f} ms")


if __name__ == "__main__":
    lone_bench_main()
