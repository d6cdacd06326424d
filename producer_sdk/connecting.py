"""Connecting: the handshake, the protocol under a connection, and reconnecting.

How this works
--------------
One part of :class:`producer_sdk.connection.Connection` (a mixin: its methods use the
connection's attributes), the part that makes and re-makes the TCP connection:

* **Handshake.** Every new TCP connection (TLS when ``tls`` is set) first sends ``HELLO``
  (version, client id, role, group) and waits for its reply before anything else is sent.
  The reply tells us the broker's ``max_message_size``. With a user and password, the
  HELLO also starts a SCRAM-SHA-256 login and an ``AUTH`` frame finishes it
  (:mod:`producer_sdk.auth`); a refused login raises ``AuthError``.
* **Bytes in, frames out.** The event loop's protocol object (``_ClientProtocol``; over TLS
  ``_TLSClientProtocol``, which decrypts into a lent buffer) feeds a ``FrameDecoder`` and
  hands each frame to the connection; a malformed frame closes the connection.
* **Reconnect.** When the connection is lost, requests in flight fail with
  ``BrokerUnavailableError`` (retriable) and a background task reconnects with exponential
  backoff (capped at 2 s), re-sends ``HELLO`` and then awaits the ``on_reconnect`` hook (the
  consumer re-subscribes there). With several addresses (``"gw1:7600,gw2:7600"``, cluster
  mode's gateways) a lost connection is re-made to the next address first, and every
  failed attempt moves on to the next one, so a dead gateway costs one attempt; the
  handshake announces the same client id and group again, so check-backs find the
  producer on its new gateway. ``generation`` counts successful connects, so callers can tell
  which connection a delivery token belongs to.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from producer_sdk.auth import ClientLogin
from protocol import (
    DEFAULT_MAX_FRAME_SIZE,
    FRAME_OVERHEAD,
    PROTOCOL_VERSION,
    AuthError,
    BrokerUnavailableError,
    FrameDecoder,
    FrameTooLargeError,
    HalfMQError,
    Op,
    ProtocolError,
    RequestTimeoutError,
)
from protocol.tlsreads import TLSReads

if TYPE_CHECKING:
    from producer_sdk.connection import Connection

__all__ = ["Connecting", "default_client_id", "parse_address", "parse_addresses"]

#: What this client tells the broker it is (shown by ``halfmq admin clients`` and the console).
CLIENT_AGENT = "halfmq-python/0.1.0"

log = logging.getLogger("halfmq.client")

#: Longest wait between two reconnect attempts, in seconds (SPEC §4).
MAX_BACKOFF = 2.0
#: A reconnect attempt whose handshake gets no answer in this time is abandoned and the
#: next one made (a listener of a dying broker can accept a connection that never answers).
RECONNECT_HANDSHAKE_TIMEOUT = 2.0
#: First wait between two reconnect attempts, in seconds.
MIN_BACKOFF = 0.05
#: Largest frame we accept from the broker: deliveries may batch several messages.
CLIENT_MAX_FRAME_SIZE = max(64 * 1024 * 1024, DEFAULT_MAX_FRAME_SIZE)


def default_client_id() -> str:
    """A client id unique per process and client object: ``host@pid@random``."""
    return f"{socket.gethostname()}@{os.getpid()}@{uuid.uuid4().hex[:8]}"


def parse_address(address: str) -> tuple[str, int]:
    """Split ``"host:port"`` (``"[::1]:7600"`` for IPv6); raise ``ValueError`` if malformed."""
    if not isinstance(address, str) or ":" not in address or "," in address:
        raise ValueError(f"broker address must be 'host:port', got {address!r}")
    host, _, port = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host or not port.isdigit():
        raise ValueError(f"broker address must be 'host:port', got {address!r}")
    return host, int(port)


def parse_addresses(address: str) -> list[tuple[str, int]]:
    """Split ``"host1:port1,host2:port2"`` (one address or several, e.g. cluster mode's
    gateways) into ``[(host, port), ...]``; raise ``ValueError`` if any is malformed."""
    if not isinstance(address, str):
        raise ValueError(f"broker address must be 'host:port[,host:port...]', got {address!r}")
    parts = [a.strip() for a in address.split(",")]
    if not parts or any(not a for a in parts):
        raise ValueError(f"broker address must be 'host:port[,host:port...]', got {address!r}")
    return [parse_address(a) for a in parts]


class _ClientProtocol(asyncio.BaseProtocol):
    """Bytes in, frames out: feeds the decoder and hands frames to its ``Connection``.

    A protocol with ``data_received`` (what ``asyncio.Protocol`` declares) that does not
    derive from it, so that :class:`_TLSClientProtocol` can be a ``BufferedProtocol``."""

    __slots__ = ("conn", "decoder", "transport", "lost")

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.decoder = FrameDecoder(CLIENT_MAX_FRAME_SIZE)
        self.transport: asyncio.Transport | None = None
        self.lost: asyncio.Future[None] = conn._loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes | memoryview) -> None:
        on_frame = self.conn._on_frame
        try:
            frames = self.decoder.feed(data)
        except (ProtocolError, FrameTooLargeError) as exc:
            for op, rid, payload in exc.frames:  # what the broker sent before the bad frame
                on_frame(self, op, rid, payload)
            log.error("malformed frame from broker %s: %s; closing", self.conn.address, exc)
            if self.transport is not None:
                self.transport.abort()
            return
        for op, rid, payload in frames:
            on_frame(self, op, rid, payload)

    def eof_received(self) -> bool | None:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)
        self.conn._on_lost(self, exc)

    def pause_writing(self) -> None:
        self.conn._paused = True

    def resume_writing(self) -> None:
        self.conn._resume()


class _TLSClientProtocol(_ClientProtocol, TLSReads):
    """The same over TLS: decrypted into a lent buffer (``protocol.tlsreads``), not into
    new bytes per TLS record."""

    __slots__ = ()


class Connecting:
    """The connecting part of :class:`producer_sdk.connection.Connection` (see the
    module's "How this works"). The attributes it shares with the rest of the connection
    are declared here (set in ``Connection.__init__``); its methods that also call the
    connection's request and write internals annotate ``self: Connection``."""

    address: str
    addresses: list[tuple[str, int]]
    _target: int
    role: str
    group: str | None
    client_id: str
    on_reconnect: Callable[[], Awaitable[None]] | None
    max_message_size: int
    generation: int
    _credentials: tuple[str, str] | None
    _ssl: ssl.SSLContext | None
    _loop: asyncio.AbstractEventLoop
    _proto: _ClientProtocol | None
    _transport: asyncio.Transport | None
    _ready: bool
    _ready_event: asyncio.Event | None
    _opened: bool
    _closed: bool
    _paused: bool
    _wbuf: list[bytes]
    _reconnect_task: asyncio.Task[None] | None
    _last_error: BaseException | None

    @property
    def host(self) -> str:
        """Host of the address connected to (or tried next)."""
        return self.addresses[self._target][0]

    @property
    def port(self) -> int:
        """Port of the address connected to (or tried next)."""
        return self.addresses[self._target][1]

    @property
    def current_address(self) -> str:
        """``host:port`` connected to (or tried next)."""
        host, port = self.addresses[self._target]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def _next_address(self) -> None:
        self._target = (self._target + 1) % len(self.addresses)

    async def open(self, *, timeout: float = 5.0) -> None:
        """Connect and handshake, retrying with backoff for up to ``timeout`` seconds.

        Raises ``BrokerUnavailableError`` if the broker cannot be reached in time, or the
        handshake's error (e.g. ``AuthError``) at once.
        """
        if self._opened:
            return
        self._loop = asyncio.get_running_loop()
        self._ready_event = asyncio.Event()
        self._opened = True
        deadline = self._loop.time() + timeout
        delay = MIN_BACKOFF
        while True:
            try:
                await self._connect_once(deadline)
                return
            except ssl.SSLError as exc:  # a certificate problem does not go away by retrying
                self._opened = False
                raise BrokerUnavailableError(f"TLS handshake with broker {self.address} failed: {exc}") from exc
            except (OSError, BrokerUnavailableError, RequestTimeoutError) as exc:
                self._next_address()
                remaining = deadline - self._loop.time()
                if remaining <= 0 or self._closed:
                    self._opened = False
                    raise BrokerUnavailableError(
                        f"cannot connect to broker {self.address}: {exc}"
                    ) from exc
                await asyncio.sleep(min(delay, remaining))
                delay = min(delay * 2, MAX_BACKOFF)
            except BaseException:
                self._opened = False
                raise

    async def _connect_once(self: Connection, deadline: float) -> None:
        loop = self._loop
        remaining = max(deadline - loop.time(), 0.01)
        transport, proto = await asyncio.wait_for(
            loop.create_connection(lambda: (_TLSClientProtocol if self._ssl else _ClientProtocol)(self),
                                   self.host, self.port, ssl=self._ssl),
            remaining,
        )
        if self._closed:
            transport.close()
            raise HalfMQError("connection closed")
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        self._proto = proto
        self._transport = transport  # type: ignore[assignment]
        self._paused = False
        hello = {
            "version": PROTOCOL_VERSION,
            "client_id": self.client_id,
            "role": self.role,
            "group": self.group,
            "agent": CLIENT_AGENT,
        }
        login = ClientLogin(*self._credentials) if self._credentials else None
        if login is not None:
            hello["auth"] = login.first()
        try:
            reply = await self._send_unchecked(Op.HELLO, hello, max(deadline, loop.time() + 1.0))
            if login is not None and isinstance(reply, dict) and "auth" in reply:
                final = login.final(reply["auth"])
                reply = await self._send_unchecked(Op.AUTH, final, max(deadline, loop.time() + 1.0))
                login.verify(reply.get("auth") if isinstance(reply, dict) else None)
            elif login is not None:
                raise AuthError(f"broker {self.address} did not run the login: not the broker meant?")
            elif isinstance(reply, dict) and "auth" in reply:
                raise AuthError("the broker asked for a login and this client has no credentials")
        except BaseException:
            if self._proto is proto:
                transport.abort()
            raise
        if not isinstance(reply, dict) or reply.get("version") != PROTOCOL_VERSION:
            transport.abort()
            raise HalfMQError(f"broker {self.address} speaks an unsupported protocol: {reply!r}")
        max_size = reply.get("max_message_size")
        if isinstance(max_size, int) and max_size > 0:
            self.max_message_size = max_size
            limit = max(CLIENT_MAX_FRAME_SIZE, 4 * (max_size + FRAME_OVERHEAD))
            proto.decoder.max_frame_size = limit
        self.generation += 1
        self._ready = True
        self._last_error = None
        assert self._ready_event is not None
        self._ready_event.set()

    def _on_lost(self: Connection, proto: _ClientProtocol, exc: Exception | None) -> None:
        if proto is not self._proto:
            return
        was_ready = self._ready
        self._proto = None
        self._transport = None
        self._ready = False
        self._wbuf = []
        self._paused = False
        self._wake_writers()
        if self._ready_event is not None:
            self._ready_event.clear()
        self._last_error = exc or ConnectionResetError("connection closed by the broker")
        self._fail_pending(
            BrokerUnavailableError(f"connection to broker {self.address} lost")
        )
        if self._closed:
            return
        if was_ready:
            lost_from = self.current_address
            self._next_address()  # with several gateways: another one first
            log.warning("connection to broker %s lost (%s); reconnecting to %s",
                        lost_from, self._last_error, self.current_address)
            if self._reconnect_task is None or self._reconnect_task.done():
                self._reconnect_task = self._loop.create_task(self._reconnect_loop())

    async def _reconnect_loop(self) -> None:
        delay = MIN_BACKOFF
        attempts = 0
        while not self._closed:
            attempts += 1
            try:
                await self._connect_once(self._loop.time() + RECONNECT_HANDSHAKE_TIMEOUT)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - keep trying while open
                self._last_error = exc
                level = logging.WARNING if attempts in (1, 10) or attempts % 100 == 0 else logging.DEBUG
                log.log(level, "reconnect to broker %s failed (attempt %d): %s",
                        self.current_address, attempts, exc)
                self._next_address()
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_BACKOFF)
                continue
            log.info("reconnected to broker %s after %d attempt(s)", self.current_address, attempts)
            if self.on_reconnect is not None:
                try:
                    await self.on_reconnect()
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("reconnect hook failed")
            if self._ready or self._closed:
                return
            # lost again while running the hook: _on_lost saw this task still running
