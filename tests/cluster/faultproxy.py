"""A TCP proxy that misbehaves on demand: between a gateway and one nats-server.

``FaultProxy(host, port)`` listens on a free 127.0.0.1 port (``await start()``) and relays
every connection to the target. Faults, each on every connection through it:

- ``reset()``: close both sides with an RST (``SO_LINGER`` 0), as a crashed peer or a
  middlebox that forgot the connection would;
- ``stall()`` / ``resume()``: stop relaying bytes in both directions (the connections stay
  open, nothing arrives: a frozen network path) and start again;
- ``drop()`` / ``allow()``: cut every connection and refuse new ones (closed at once) until
  allowed again.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct

__all__ = ["FaultProxy"]


class _Pipe:
    def __init__(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter,
                 sr: asyncio.StreamReader, sw: asyncio.StreamWriter) -> None:
        self.writers = (cw, sw)
        self.tasks = [asyncio.ensure_future(self._copy(cr, sw)), asyncio.ensure_future(self._copy(sr, cw))]
        self.flowing = asyncio.Event()
        self.flowing.set()

    async def _copy(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while True:
                data = await r.read(65536)
                if not data:
                    break
                await self.flowing.wait()
                w.write(data)
                await w.drain()
        except (ConnectionError, OSError, asyncio.CancelledError):
            pass
        finally:
            self.close(rst=False)

    def close(self, *, rst: bool) -> None:
        for w in self.writers:
            if rst:
                sock = w.get_extra_info("socket")
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            with contextlib.suppress(Exception):
                w.transport.abort() if rst else w.close()
        for t in self.tasks:
            if t is not asyncio.current_task():
                t.cancel()


class FaultProxy:
    """See the module docstring."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.pipes: set[_Pipe] = set()
        self.refusing = False
        self.stalled = False
        self.connections = 0
        self._server: asyncio.base_events.Server | None = None
        self.port = 0

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    async def _accept(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        if self.refusing:
            cw.transport.abort()
            return
        try:
            sr, sw = await asyncio.open_connection(*self.target)
        except OSError:
            cw.transport.abort()
            return
        self.connections += 1
        pipe = _Pipe(cr, cw, sr, sw)
        if self.stalled:
            pipe.flowing.clear()
        self.pipes.add(pipe)
        await asyncio.gather(*pipe.tasks, return_exceptions=True)
        self.pipes.discard(pipe)

    def reset(self) -> None:
        for p in list(self.pipes):
            p.close(rst=True)

    def stall(self) -> None:
        self.stalled = True
        for p in self.pipes:
            p.flowing.clear()

    def resume(self) -> None:
        self.stalled = False
        for p in self.pipes:
            p.flowing.set()

    def drop(self) -> None:
        self.refusing = True
        self.reset()

    def allow(self) -> None:
        self.refusing = False

    async def close(self) -> None:
        self.resume()
        if self._server is not None:
            self._server.close()
        for p in list(self.pipes):
            p.close(rst=False)
