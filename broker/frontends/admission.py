"""Every accepted socket counted from its first moment: the listening sockets' admission.

How this works
--------------
A listening socket whose connections would otherwise be invisible to its limit for a
while (TLS: asyncio hands a connection to its protocol only once the TLS handshake is done;
the admin HTTP port: aiohttp has no connection limit at all) is served by an
:class:`Admission`: a task accepts its connections one by one (``sock_accept``) and counts
the connections already served (``served()``) plus the TLS handshakes still under way:

- at ``limit()`` the socket is closed at once (a plain-HTTP 503 first, where there is
  one; a WARNING at most once a second), so no client holds a descriptor that the limit
  does not count;
- otherwise ``connect_accepted_socket`` gives it to the real protocol (``make()``), with
  TLS after a handshake that must end within the handshake timeout. A handshake holds a
  slot until it ends; one that fails or times out closes the socket (INFO).

The descriptors this can hold are the limit's, and the limit is what the broker keeps
room for at start (``broker.frontends.native.listener.connection_limit``). Accepting
stops at once on ``close()``; a failure to accept (out of descriptors after all) is
logged and retried after a short pause instead of spinning.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import time
from collections.abc import Callable
from typing import Any

__all__ = ["Admission"]

log = logging.getLogger("halfmq.broker")

#: Pause after a failed accept (out of descriptors, say) before the next one.
ACCEPT_RETRY = 0.1


class Admission:
    """Accepting connections for one listening socket under a limit that counts TLS
    handshakes in progress too (see the module's "How this works")."""

    def __init__(self, name: str, *, make: Callable[[], Any], served: Callable[[], int],
                 limit: Callable[[], int], option: str, tls: Any = None,
                 handshake_timeout: float = 10.0, refusal: bytes = b"") -> None:
        """``make()`` builds the real protocol; ``served()`` counts the connections it
        serves; ``limit()`` is the most connections plus handshakes at once (``option``
        names it in the WARNING); ``tls``: an ``ssl.SSLContext`` or None; ``refusal``:
        bytes written to a refused plain connection before it is closed."""
        self.name = name
        self.make = make
        self.served = served
        self.limit = limit
        self.option = option
        self.tls = tls
        self.handshake_timeout = handshake_timeout
        self.refusal = refusal
        self.pending = 0  # accepted, not yet handed on (TLS handshakes under way)
        self.refused = 0
        self.port = 0
        self._warned_at = 0.0
        self._sock: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._protocols: set[Any] = set()  # the protocols of connections not yet handed on

    async def start(self, host: str, port: int) -> int:
        """Listen on ``host``:``port`` and accept; return the bound port."""
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, addr = infos[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
            sock.listen(128)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self.port = sock.getsockname()[1]
        self._accepting = loop.create_task(self._accept_loop(sock))
        return self.port

    async def _accept_loop(self, lsock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, addr = await loop.sock_accept(lsock)
            except asyncio.CancelledError:
                raise
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.error("%s: cannot accept a connection: %s", self.name, exc)
                await asyncio.sleep(ACCEPT_RETRY)
                continue
            self._admit(conn, addr)

    def count(self) -> int:
        """Connections served plus those accepted and not yet handed on (a protocol that
        already has its transport is served: counted once)."""
        made = sum(1 for p in self._protocols if getattr(p, "transport", None) is not None)
        return self.served() + self.pending - made

    def _admit(self, conn: socket.socket, addr: Any) -> None:
        if self.count() >= self.limit():
            self._refuse(conn, addr)
            return
        conn.setblocking(False)
        with contextlib.suppress(OSError):
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.pending += 1
        task = asyncio.get_running_loop().create_task(self._connect(conn, addr))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect(self, conn: socket.socket, addr: Any) -> None:
        loop = asyncio.get_running_loop()
        made: list[Any] = []

        def make() -> Any:
            protocol = self.make()
            made.append(protocol)
            self._protocols.add(protocol)
            return protocol

        try:
            if self.tls is None:
                await loop.connect_accepted_socket(make, conn)
            else:
                await loop.connect_accepted_socket(make, conn, ssl=self.tls,
                                                   ssl_handshake_timeout=self.handshake_timeout)
        except BaseException as exc:  # a failed handshake (or a socket gone): closed
            conn.close()
            if not isinstance(exc, Exception):
                raise  # (cancelled: the broker is stopping)
            log.info("%s: %s from %s failed: %s", self.name, "TLS handshake" if self.tls else "connection",
                     _peer(addr), f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
        finally:
            self.pending -= 1
            for protocol in made:
                self._protocols.discard(protocol)

    def _refuse(self, conn: socket.socket, addr: Any) -> None:
        self.refused += 1
        now = time.monotonic()
        if now - self._warned_at >= 1.0:
            self._warned_at = now
            log.warning("%s: refusing connection from %s: %d connections and TLS handshakes, the limit "
                        "(%s) (%d refused so far)", self.name, _peer(addr), self.limit(), self.option,
                        self.refused)
        if self.refusal and self.tls is None:
            with contextlib.suppress(OSError):
                conn.setblocking(False)
                conn.send(self.refusal)  # (small: the socket's buffer takes it whole)
        conn.close()

    def stop(self) -> None:
        """Accept no new connections."""
        if self._accepting is not None:
            self._accepting.cancel()
            self._accepting = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def close(self) -> None:
        """Stop accepting and drop the TLS handshakes under way (their sockets are closed)."""
        self.stop()
        for task in list(self._tasks):
            task.cancel()


def _peer(addr: Any) -> str:
    return f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) and len(addr) >= 2 else "?"
