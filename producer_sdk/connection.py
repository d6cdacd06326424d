"""The client side of one halfmq connection, shared by both SDKs.

How this works
--------------
A ``Connection`` owns one TCP connection to the broker (a protocol of the event loop, not
streams) and keeps it alive for as long as it is open:

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
* **Connecting** (:mod:`producer_sdk.connecting`): the handshake (``HELLO``, with a
  login ``AUTH``), the event loop's protocol that turns bytes into frames, and
  reconnecting after a loss, with backoff, to the next of several addresses. Requests
  issued while disconnected wait for the reconnect until their own deadline.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

from producer_sdk.arguments import check_seconds
from producer_sdk.auth import credentials, tls_context
from producer_sdk.connecting import (
    Connecting,
    _ClientProtocol,
    default_client_id,
    parse_address,
    parse_addresses,
)
from protocol import (
    MAX_CLIENT_ID,
    AuthError,
    BrokerUnavailableError,
    HalfMQError,
    Op,
    Ops,
    RequestTimeoutError,
    Role,
    encode_frame,
    error_from_code,
)

__all__ = ["Connection", "ReplyCallback", "default_client_id", "parse_address", "parse_addresses"]

log = logging.getLogger("halfmq.client")

#: The broker's default message size limit, until its HELLO reply says otherwise.
DEFAULT_MAX_MESSAGE_SIZE = 4 * 1024 * 1024

RequestHandler = Callable[[int, Any], Awaitable[Any]]
PushHandler = Callable[[int, Any], None]
ReconnectHook = Callable[[], Awaitable[None]]


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


class Connection(Connecting):
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
        if client_id is not None:
            if not isinstance(client_id, str):
                raise TypeError(f"client_id must be a str, not {type(client_id).__name__}")
            if len(client_id) > MAX_CLIENT_ID:
                raise ValueError(f"client_id must be at most {MAX_CLIENT_ID} characters")
        self.client_id = client_id or default_client_id()
        self.request_timeout = check_seconds(request_timeout, "request_timeout", positive=True)
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
    def connected(self) -> bool:
        """True while a handshaken connection is up."""
        return self._ready

    @property
    def closed(self) -> bool:
        """True once ``close()`` was called."""
        return self._closed

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
        # encoded first: a payload msgpack cannot encode (a number out of range, a string
        # that is not valid Unicode) raises to the caller here, with nothing registered
        frame = encode_frame(op, rid, payload)
        self._next_rid = rid + 1
        self._pending[rid] = waiter
        self._write(frame)
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
        iteration are written (frames it queues go out in the same write). ``fn`` settles
        the callers of the requests it makes itself, also when one of them cannot be sent
        (``_send_request`` raises): an exception out of it is only logged."""
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
        if op == Ops.REPLY:
            fut = self._pending.pop(rid, None)
            if fut is not None and not fut.done():
                fut.set_result(payload)
        elif op == Ops.ERROR:
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
