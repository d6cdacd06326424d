"""The client side of one halfmq connection, shared by both SDKs.

How this works
--------------
A ``Connection`` owns one TCP connection to the broker (a protocol of the event loop, not
streams) and keeps it alive for as long as it is open:

* **Handshake.** Every new TCP connection (TLS when ``tls`` is set) first sends ``HELLO``
  (version, client id, role, group) and waits for its reply before anything else is sent.
  The reply tells us the broker's ``max_message_size``. With a user and password, the
  HELLO also starts a SCRAM-SHA-256 login and an ``AUTH`` frame finishes it
  (:mod:`producer_sdk.auth`); a refused login raises ``AuthError``.
* **Requests.** ``request(op, payload)`` picks the next request id, registers a future in
  ``_pending`` and queues the frame; the reader resolves the future when the ``REPLY`` or
  ``ERROR`` with that id arrives, so many requests are in flight at once (pipelining) and
  replies may come in any order. An ``ERROR`` becomes the exception of its code
  (``protocol.error_from_code``). Each request has a deadline; when it passes the request
  fails with ``RequestTimeoutError`` (a late reply is then ignored). ``request_callback``
  registers a ``ReplyCallback`` instead of a future: the reader calls it with the reply
  at once (the producer hands a micro-batch's rows to its callers from there, a loop
  iteration sooner than through a future's done-callback).
* **Coalesced writes.** Frames are appended to a small buffer and written together once
  per event-loop iteration (one ``transport.write`` for many frames). There is no
  per-frame ``drain()``; only when the transport asks us to pause writing do new requests
  wait until it resumes. ``call_before_write(fn)`` runs ``fn`` in that same callback just
  before the write (the producer builds its micro-batches' frames there: they go out in
  the loop iteration after the sends, not one later). ``write_through(fn, *args)`` writes
  what ``fn`` queues before returning instead, for a connection that is ``idle`` (one
  request at a time: no loop iteration spent waiting for the end-of-iteration write).
* **Server-initiated traffic.** A request from the broker (``CHECK``) runs the
  ``on_request`` handler in a task; its return value goes back as ``REPLY`` (or ``ERROR`` if
  it raises). ``PING`` is answered at once. Pushes (``rid = 0``, e.g. ``DELIVER``) are handed
  to the synchronous ``on_push`` callback straight from the reader.
* **Reconnect.** When the connection is lost, requests in flight fail with
  ``BrokerUnavailableError`` (retriable) and a background task reconnects with exponential
  backoff (capped at 2 s), re-sends ``HELLO`` and then awaits the ``on_reconnect`` hook (the
  consumer re-subscribes there). Requests issued while disconnected wait for the reconnect
  until their own deadline. With several addresses (``"gw1:7600,gw2:7600"``, cluster
  mode's gateways) a lost connection is re-made to the next address first, and every
  failed attempt moves on to the next one, so a dead gateway costs one attempt; the
  handshake announces the same client id and group again, so check-backs find the
  producer on its new gateway. ``generation`` counts successful connects, so callers can tell
  which connection a delivery token belongs to.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import logging
import os
import socket
import ssl
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from producer_sdk.auth import ClientLogin, credentials, tls_context
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
    Role,
    encode_frame,
    error_from_code,
)
from protocol.tlsreads import TLSReads

__all__ = ["Connection", "ReplyCallback", "default_client_id", "parse_address", "parse_addresses"]

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
#: The broker's default message size limit, until its HELLO reply says otherwise.
DEFAULT_MAX_MESSAGE_SIZE = 4 * 1024 * 1024
#: Largest frame we accept from the broker: deliveries may batch several messages.
CLIENT_MAX_FRAME_SIZE = max(64 * 1024 * 1024, DEFAULT_MAX_FRAME_SIZE)

RequestHandler = Callable[[int, Any], Awaitable[Any]]
PushHandler = Callable[[int, Any], None]
ReconnectHook = Callable[[], Awaitable[None]]


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


_SWEEP_EVERY = 0.05  # seconds between deadline sweeps
#: Queued frames are written at once when they reach this size, instead of at the end of
#: the loop iteration: the broker starts on the first part while we build the rest.
_WRITE_NOW_BYTES = 64 * 1024

class ReplyCallback:
    """Stands in for a reply future in ``Connection._pending``: the first ``set_result`` or
    ``set_exception`` calls ``fn(result, None)`` or ``fn(None, exc)`` at once, from the
    reader (or the deadline sweep, or the connection's loss); later ones are ignored."""

    __slots__ = ("fn", "_done")

    def __init__(self, fn: Callable[[Any, BaseException | None], None]) -> None:
        self.fn = fn
        self._done = False

    def done(self) -> bool:
        return self._done

    def set_result(self, result: Any) -> None:
        if not self._done:
            self._done = True
            self._call(result, None)

    def set_exception(self, exc: BaseException) -> None:
        if not self._done:
            self._done = True
            self._call(None, exc)

    def _call(self, result: Any, exc: BaseException | None) -> None:
        try:
            self.fn(result, exc)
        except Exception:  # never into the reader
            log.exception("reply callback failed")


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


class Connection:
    """One broker connection with handshake, pipelined requests and automatic reconnect.

    ``role`` is ``"producer"`` or ``"consumer"`` (or a ``protocol.Role``); ``group`` is
    announced in the handshake. ``on_request(op, payload)`` answers broker requests
    (``CHECK``); ``on_push(op, payload)`` receives ``rid = 0`` frames (``DELIVER``);
    ``on_reconnect()`` runs after every successful *re*-connect (not the first one).
    ``user``/``password`` log in (default: ``HALFMQ_USER``/``HALFMQ_PASSWORD``, else
    none); ``tls`` is True (the system's CAs) or an ``ssl.SSLContext`` (default: plain TCP).
    """

    def __init__(
        self,
        address: str,
        *,
        role: Role | str,
        group: str | None = None,
        client_id: str | None = None,
        request_timeout: float = 3.0,
        on_request: RequestHandler | None = None,
        on_push: PushHandler | None = None,
        on_reconnect: ReconnectHook | None = None,
        user: str | None = None,
        password: str | None = None,
        tls: bool | ssl.SSLContext | None = None,
    ) -> None:
        self.address = address
        self._credentials = credentials(user, password)
        self._ssl = tls_context(tls)
        self.addresses = parse_addresses(address)
        self._target = 0  # index in addresses of the one connected to / tried next
        self.role = Role(role).value
        self.group = group
        self.client_id = client_id or default_client_id()
        self.request_timeout = request_timeout
        self.on_request = on_request
        self.on_push = on_push
        self.on_reconnect = on_reconnect
        #: The broker's limit on a message body, from its HELLO reply.
        self.max_message_size = DEFAULT_MAX_MESSAGE_SIZE
        #: Incremented on every successful connect; identifies the current connection.
        self.generation = 0
        self._loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self._proto: _ClientProtocol | None = None
        self._transport: asyncio.Transport | None = None
        self._ready = False  # handshake done on the current transport
        self._ready_event: asyncio.Event | None = None
        self._opened = False
        self._closed = False
        self._next_rid = 1
        self._pending: dict[int, asyncio.Future[Any] | ReplyCallback] = {}
        # request deadlines without a timer per request: (deadline, rid) in deadline order
        # (a deque for the usual in-order case, a heap for the rest), swept periodically
        self._deadlines: collections.deque[tuple[float, int]] = collections.deque()
        self._late_deadlines: list[tuple[float, int]] = []
        self._sweep_handle: asyncio.TimerHandle | None = None
        self._wbuf: list[bytes] = []
        self._wbuf_bytes = 0
        self._flush_scheduled = False
        self._before_write: list[Callable[[], None]] = []
        self._paused = False
        self._resume_waiter: asyncio.Future[None] | None = None
        self._reconnect_task: asyncio.Task[None] | None = None
        self._server_tasks: set[asyncio.Task[None]] = set()
        self._last_error: BaseException | None = None

    # -- public ------------------------------------------------------------------------

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

    @property
    def connected(self) -> bool:
        """True while a handshaken connection is up."""
        return self._ready

    @property
    def closed(self) -> bool:
        """True once ``close()`` was called."""
        return self._closed

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

    async def request(
        self,
        op: int,
        payload: Any,
        *,
        timeout: float | None = None,
        deadline: float | None = None,
    ) -> Any:
        """Send a request and return the reply payload.

        ``deadline`` is an absolute ``loop.time()``; otherwise ``timeout`` (default
        ``request_timeout``) seconds from now. While disconnected the request waits for the
        reconnect. Raises the ERROR reply's exception, ``RequestTimeoutError`` when the
        deadline passes, ``BrokerUnavailableError`` when the connection is lost with the
        request in flight (or never comes back before the deadline), ``HalfMQError`` when
        the connection is closed.
        """
        loop = self._loop
        if loop is None:
            raise HalfMQError("connection is not open; call start() first")
        if deadline is None:
            deadline = loop.time() + (self.request_timeout if timeout is None else timeout)
        if not self._ready:
            await self._wait_ready(deadline)
        if self._paused:
            await self._wait_writable(deadline)
        return await self._request_now(op, payload, deadline)

    def send_nowait(self, op: int, payload: Any) -> bool:
        """Queue a fire-and-forget frame (``rid = 0``); return False if not connected."""
        if not self._ready:
            return False
        self._write(encode_frame(op, 0, payload))
        return True

    def abort(self) -> None:
        """Drop the current TCP connection (the reconnect logic takes over)."""
        if self._transport is not None:
            self._transport.abort()

    async def close(self) -> None:
        """Flush queued frames, close the connection and stop reconnecting (idempotent).

        Requests still waiting fail with ``HalfMQError``.
        """
        if self._closed:
            return
        self._closed = True
        if self._sweep_handle is not None:
            self._sweep_handle.cancel()
            self._sweep_handle = None
        if self._reconnect_task is not None:
            self._reconnect_task.cancel()
        for task in list(self._server_tasks):
            task.cancel()
        proto = self._proto
        if self._transport is not None:
            self._flush()
            self._transport.close()
        self._fail_pending(HalfMQError("connection closed"))
        if self._ready_event is not None:
            self._ready_event.set()  # wake waiters; they see _closed
        self._wake_writers()
        if proto is not None:
            try:
                await asyncio.wait_for(asyncio.shield(proto.lost), 2.0)
            except TimeoutError:
                if proto.transport is not None:
                    proto.transport.abort()
        if self._reconnect_task is not None:
            try:
                await self._reconnect_task
            except BaseException:  # noqa: BLE001 - cancelled or failed; we are closing
                pass

    # -- internals: requests -----------------------------------------------------------

    async def _send_unchecked(self, op: int, payload: Any, deadline: float) -> Any:
        """Send on the current transport even before the handshake is done (for HELLO)."""
        ready = self._ready
        self._ready = True
        try:
            fut = self.request_future(op, payload, deadline)
        finally:
            self._ready = ready
        assert fut is not None
        return await fut

    async def _request_now(self, op: int, payload: Any, deadline: float) -> Any:
        while True:
            fut = self.request_future(op, payload, deadline)
            if fut is not None:
                return await fut
            if self._closed:
                raise HalfMQError("connection closed")
            await self._wait_ready(deadline)
            if self._paused:
                await self._wait_writable(deadline)

    @property
    def ready_to_send(self) -> bool:
        """True when a request can go out at once (connected, handshake done, not paused).
        ``Producer.send`` inlines this test on its fast path: change both together."""
        return self._ready and not self._paused and not self._closed

    @property
    def idle(self) -> bool:
        """True when no request is in flight and nothing waits to be written."""
        return not self._pending and not self._flush_scheduled

    def write_through(self, fn: Callable[..., None], *args: Any) -> None:
        """Call ``fn(*args)`` and write the frames it queues right away, not at the end of
        the loop iteration (and without leaving an end-of-iteration write queued). Only
        for an ``idle`` connection: otherwise queued frames would jump ahead of it."""
        self._flush_scheduled = True  # (the frames fn queues do not schedule a write)
        try:
            fn(*args)
        finally:
            self._flush()

    def request_future(self, op: int, payload: Any, deadline: float) -> asyncio.Future[Any] | None:
        """Fast path: send the request now and return the future of its reply.

        Returns None when the request cannot go out at once (not connected, paused or
        closed); use ``request`` then. The future fails with ``RequestTimeoutError`` once
        ``deadline`` (``loop.time()``) passes — checked by a sweep every 50 ms, no timer
        per request.
        """
        if not self._ready or self._paused or self._closed:
            return None
        fut = self._loop.create_future()
        self._send_request(op, payload, deadline, fut)
        return fut

    def request_callback(self, op: int, payload: Any, deadline: float,
                         on_reply: Callable[[Any, BaseException | None], None]) -> bool:
        """Like ``request_future``, but ``on_reply(result, None)`` or ``on_reply(None,
        exc)`` is called once, straight from the reader (or the deadline sweep, or the
        connection's loss), instead of resolving a future. Returns False, without calling
        ``on_reply``, when the request cannot go out at once."""
        if not self._ready or self._paused or self._closed:
            return False
        self._send_request(op, payload, deadline, ReplyCallback(on_reply))
        return True

    def _send_request(self, op: int, payload: Any, deadline: float, waiter: Any) -> None:
        rid = self._next_rid
        self._next_rid = rid + 1
        self._pending[rid] = waiter
        self._write(encode_frame(op, rid, payload))
        dq = self._deadlines
        if not dq or dq[-1][0] <= deadline:
            dq.append((deadline, rid))
        else:
            heapq.heappush(self._late_deadlines, (deadline, rid))
        if self._sweep_handle is None:
            self._sweep_handle = self._loop.call_later(_SWEEP_EVERY, self._sweep)

    def _sweep(self) -> None:
        """Expire requests past their deadline; forget deadlines of answered ones."""
        self._sweep_handle = None
        now = self._loop.time()
        pending = self._pending
        dq = self._deadlines
        while dq and (dq[0][0] <= now or dq[0][1] not in pending):
            _, rid = dq.popleft()
            if rid in pending:
                self._expire(rid)
        late = self._late_deadlines
        while late and (late[0][0] <= now or late[0][1] not in pending):
            _, rid = heapq.heappop(late)
            if rid in pending:
                self._expire(rid)
        if (dq or late) and not self._closed:
            self._sweep_handle = self._loop.call_later(_SWEEP_EVERY, self._sweep)

    def _expire(self, rid: int) -> None:
        fut = self._pending.pop(rid, None)
        if fut is not None and not fut.done():
            fut.set_exception(
                RequestTimeoutError(f"no reply from broker {self.address} within the deadline")
            )

    async def _wait_ready(self, deadline: float) -> None:
        loop = self._loop
        assert self._ready_event is not None
        while not self._ready:
            if self._closed:
                raise HalfMQError("connection closed")
            remaining = deadline - loop.time()
            if remaining <= 0:
                if isinstance(self._last_error, AuthError):
                    raise AuthError(str(self._last_error))
                detail = f": {self._last_error}" if self._last_error else ""
                raise BrokerUnavailableError(
                    f"not connected to broker {self.address}{detail}"
                )
            try:
                await asyncio.wait_for(self._ready_event.wait(), remaining)
            except TimeoutError:
                pass
        if self._closed:
            raise HalfMQError("connection closed")

    async def _wait_writable(self, deadline: float) -> None:
        while self._paused and self._ready and not self._closed:
            if self._resume_waiter is None or self._resume_waiter.done():
                self._resume_waiter = self._loop.create_future()
            remaining = deadline - self._loop.time()
            if remaining <= 0:
                raise RequestTimeoutError(f"broker {self.address} is not reading our frames")
            try:
                await asyncio.wait_for(asyncio.shield(self._resume_waiter), remaining)
            except TimeoutError:
                pass

    def _resume(self) -> None:
        self._paused = False
        self._wake_writers()

    def _wake_writers(self) -> None:
        waiter = self._resume_waiter
        self._resume_waiter = None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail_pending(self, exc: HalfMQError) -> None:
        pending = self._pending
        self._pending = {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(type(exc)(str(exc)))

    # -- internals: writing ------------------------------------------------------------

    def _write(self, frame: bytes) -> None:
        self._wbuf.append(frame)
        self._wbuf_bytes += len(frame)
        if self._wbuf_bytes >= _WRITE_NOW_BYTES:
            self._flush()  # enough for one write: let the broker start on it now
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def call_before_write(self, fn: Callable[[], None]) -> None:
        """Call ``fn()`` once, on the loop, right before the frames queued in this loop
        iteration are written (frames it queues go out in the same write)."""
        self._before_write.append(fn)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        hooks = self._before_write
        if hooks:
            self._before_write = []
            for fn in hooks:
                try:
                    fn()
                except Exception:
                    log.exception("callback before a write failed")
        self._flush_scheduled = False
        self._wbuf_bytes = 0
        buf = self._wbuf
        if not buf:
            return
        self._wbuf = []
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        transport.write(buf[0] if len(buf) == 1 else b"".join(buf))

    # -- internals: reading ------------------------------------------------------------

    def _on_frame(self, proto: _ClientProtocol, op: int, rid: int, payload: Any) -> None:
        if proto is not self._proto:
            return  # a stale connection
        if op == Op.REPLY:
            fut = self._pending.pop(rid, None)
            if fut is not None and not fut.done():
                fut.set_result(payload)
        elif op == Op.ERROR:
            if isinstance(payload, dict):
                code, message = payload.get("code", 1), payload.get("message", "")
            else:
                code, message = 1, repr(payload)
            fut = self._pending.pop(rid, None) if rid else None
            if fut is not None:
                if not fut.done():
                    fut.set_exception(error_from_code(code, str(message)))
            else:
                log.warning("error from broker %s (rid %d): code %s: %s",
                            self.address, rid, code, message)
        elif rid == 0:
            if self.on_push is not None:
                try:
                    self.on_push(op, payload)
                except Exception:
                    log.exception("push handler failed for op %s", op)
        elif op == Op.PING:
            self._write(encode_frame(Op.REPLY, rid, {}))
        elif self.on_request is not None:
            task = self._loop.create_task(self._serve(proto, op, rid, payload))
            self._server_tasks.add(task)
            task.add_done_callback(self._server_tasks.discard)
        else:
            self._write(encode_frame(Op.ERROR, rid, {"code": 8, "message": f"unsupported op {op}"}))

    async def _serve(self, proto: _ClientProtocol, op: int, rid: int, payload: Any) -> None:
        assert self.on_request is not None
        try:
            result = await self.on_request(op, payload)
            frame = encode_frame(Op.REPLY, rid, result)
        except asyncio.CancelledError:
            raise
        except HalfMQError as exc:
            frame = encode_frame(Op.ERROR, rid, {"code": exc.code, "message": str(exc)})
        except Exception as exc:
            log.exception("handler for broker request op %s failed", op)
            frame = encode_frame(Op.ERROR, rid, {"code": 1, "message": f"{type(exc).__name__}: {exc}"})
        if proto is self._proto and self._ready:
            self._write(frame)

    # -- internals: connecting ---------------------------------------------------------

    async def _connect_once(self, deadline: float) -> None:
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

    def _on_lost(self, proto: _ClientProtocol, exc: Exception | None) -> None:
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
