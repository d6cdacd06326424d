"""The pure-Python ceiling: a pipelined echo of length-prefixed msgpack frames between two
uvloop processes.

How this works
--------------
``python -m benchmarks.echo serve`` listens on a free port and answers every frame
``[op, rid, {"b": body}]`` (4-byte big-endian length, then msgpack) with ``[0, rid, {}]``,
coalescing its replies into one write per read — the least a broker can do per message
with this framing and no storage at all. The client side is an ordinary benchmark
``Client`` driven by the same publish loop as every system (``benchmarks/e2e.py``), so
"publish ≥ 30 % of the echo ceiling" compares like with like.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import struct
import sys
from typing import Any

import msgpack

from benchmarks.systems.base import Client as BaseClient
from benchmarks.systems.base import Server as BaseServer
from benchmarks.systems.base import stop_process

__all__ = ["Server", "Client", "serve"]

_LEN = struct.Struct(">I")


class _EchoServerProtocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.buf = bytearray()
        self.transport: Any = None
        self.packb = msgpack.Packer().pack

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        out = []
        pos = 0
        n = len(buf)
        unpackb = msgpack.unpackb
        packb = self.packb
        while n - pos >= 4:
            (size,) = _LEN.unpack_from(buf, pos)
            if n - pos - 4 < size:
                break
            op, rid, payload = unpackb(buf[pos + 4:pos + 4 + size])
            pos += 4 + size
            reply = packb([0, rid, {}])
            out.append(_LEN.pack(len(reply)))
            out.append(reply)
        del buf[:pos]
        if out:
            self.transport.write(b"".join(out))


async def serve(host: str = "127.0.0.1", port: int = 0) -> None:
    """Run the echo server until SIGTERM/SIGINT; print ``READY <port>`` once listening."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_EchoServerProtocol, host, port)
    port = server.sockets[0].getsockname()[1]
    sys.stdout.write(f"READY {port}\n")
    sys.stdout.flush()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


class Server(BaseServer):
    name = "echo"
    durability = "none (no storage): the Python + uvloop + msgpack ceiling"
    scenarios = frozenset({"publish"})
    client_module = "benchmarks.echo"

    def __init__(self) -> None:
        self.proc: asyncio.subprocess.Process | None = None

    async def start_cell(self, cell: str, workdir: str) -> dict[str, Any]:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "benchmarks.echo", "serve",
            stdout=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL)
        assert self.proc.stdout is not None
        line = (await asyncio.wait_for(self.proc.stdout.readline(), 20)).decode().split()
        if not line or line[0] != "READY":
            raise RuntimeError("echo server did not start")
        return {"host": "127.0.0.1", "port": int(line[1])}

    async def stop_cell(self) -> None:
        proc, self.proc = self.proc, None
        await stop_process(proc, 5)

    def server_pids(self) -> list[int]:
        return [self.proc.pid] if self.proc is not None else []


class _EchoClientProtocol(asyncio.Protocol):
    def __init__(self, client: Client) -> None:
        self.client = client
        self.buf = bytearray()

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        pos = 0
        n = len(buf)
        pending = self.client.pending
        unpackb = msgpack.unpackb
        while n - pos >= 4:
            (size,) = _LEN.unpack_from(buf, pos)
            if n - pos - 4 < size:
                break
            _op, rid, _payload = unpackb(buf[pos + 4:pos + 4 + size])
            pos += 4 + size
            fut = pending.pop(rid, None)
            if fut is not None and not fut.done():
                fut.set_result(None)
        del buf[:pos]

    def connection_lost(self, exc: Exception | None) -> None:
        for fut in self.client.pending.values():
            if not fut.done():
                fut.set_exception(ConnectionError("echo server went away"))
        self.client.pending.clear()


class Client(BaseClient):
    """Sends ``[2, rid, {"b": body}]`` frames, coalesced per loop turn, and awaits replies."""

    def __init__(self, conn: dict[str, Any]) -> None:
        super().__init__(conn)
        self.pending: dict[int, asyncio.Future[None]] = {}
        self.rid = 0
        self.wbuf: list[bytes] = []
        self.scheduled = False
        self.transport: Any = None
        self.packb = msgpack.Packer().pack

    async def open_producer(self) -> None:
        loop = asyncio.get_running_loop()
        self.loop = loop
        self.transport, _ = await loop.create_connection(
            lambda: _EchoClientProtocol(self), self.conn["host"], self.conn["port"])
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _flush(self) -> None:
        self.scheduled = False
        buf, self.wbuf = self.wbuf, []
        if buf:
            self.transport.write(b"".join(buf))

    async def publish(self, body: bytes) -> None:
        self.rid += 1
        rid = self.rid
        frame = self.packb([2, rid, {"b": body}])
        self.wbuf.append(_LEN.pack(len(frame)))
        self.wbuf.append(frame)
        if not self.scheduled:
            self.scheduled = True
            self.loop.call_soon(self._flush)
        fut = self.loop.create_future()
        self.pending[rid] = fut
        await fut

    async def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def _main(argv: list[str]) -> int:
    if argv[:1] != ["serve"]:
        print("usage: python -m benchmarks.echo serve", file=sys.stderr)
        return 2
    try:
        import uvloop

        uvloop.run(serve())
    except ImportError:  # pragma: no cover
        asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
