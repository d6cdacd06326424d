"""One client connection on the broker side: frames in, requests checked and passed to the
engine, frames out.

How this works
--------------
``ClientConnection`` is a protocol of the event loop (``data_received``) and the engine's
:class:`Session` for that client. Bytes go through a ``FrameDecoder``; each request frame is checked here — the
handshake first, then names, types, sizes and limits — and handed to the engine, which
answers with ``reply`` / ``error`` now or later (when the log has the records). A request
refused here never reaches the engine, so nothing is stored for it. The payload checks
are in :mod:`broker.frontends.native.checks` (given the limits they need); the handshake,
the login's rights and the in-flight limits are here. Outgoing frames are
collected in a list and written with one ``transport.write`` per loop iteration, so many
replies and deliveries share a syscall. Over TLS the connection is a
``TLSClientConnection``: the same, reading through ``protocol.tlsreads``.

Limits, so that no client can hurt the broker (each in the README's table):

- **Back-pressure on input.** Requests awaiting their reply (``--max-inflight-requests``)
  and message bytes of SENDs not yet stored (``--max-inflight-bytes``: each message's body
  plus ``SEND_MESSAGE_OVERHEAD``, so that empty messages weigh something too) are
  counted; past either, the broker stops reading the socket until replies have gone out —
  the client waits, nothing is refused, and memory stays bounded. Each SEND is counted
  under an id of the broker's own (below ``SEND_IDS``), answered with the client's rid, so
  that a SEND with rid 0 (no reply wanted) or a reused rid counts too. The listener sums
  the bytes of all connections against ``--max-inflight-total`` and holds the connections
  that send past it. A SEND of more than ``MAX_SEND_MESSAGES`` messages is refused whole
  (``LimitExceededError``).
- **Nothing raw in the log.** A client id or tag expression with control characters is
  refused, and the strings a client chose are logged with ``%r``.
- **Bounded output.** The transport's write buffer is capped at ``DELIVERY_WINDOW`` for
  deliveries: past it the engine leases nothing more to the connection
  (``output_room`` is 0) until the client reads. Replies to a client that does not read
  them stop its input: past an eighth of ``--max-client-buffer`` unsent (at least
  ``READ_STOP_MIN``) the broker reads nothing more from it until the transport has
  written most of it (``resume_writing``), so its requests wait in the kernel's buffers,
  not as replies in the broker's memory. What still piles up (the replies to the
  requests of the reads before the stop) past ``--max-client-buffer`` gets the client
  disconnected, with a WARNING saying why.

Security (``broker.security``): once users exist, HELLO starts a SCRAM-SHA-256 login that
an AUTH frame finishes (docs/protocol.md); a failed login is answered with ``AuthError``
and the connection closed. Each request is then checked against the client's rights
before the engine sees it (SEND, SUBSCRIBE, END_TX; ACK only follows a checked
subscription), and a change of users or grants re-checks what a connection holds.

A malformed frame (undecodable, too large, not ``[op, rid, payload]``) is answered with an
ERROR frame and the connection is closed; other connections are not affected. A malformed
*request* inside a good frame gets an ERROR and the connection stays open. The broker may
also send requests (check-backs) on the connection: ``request`` returns a future resolved
by the client's REPLY or ERROR.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from broker.frontends.native.checks import (
    SEND_OPTIONS,
    SubscribeRequest,
    check_acks,
    check_client_id,
    check_empty,
    check_end_tx,
    check_recall,
    check_receive,
    check_send,
    check_send_options,
    check_subscribe,
    op_name,
    payload_error,
)
from protocol import (
    MAX_FRAME_ITEMS,
    PROTOCOL_VERSION,
    AuthError,
    BadRequestError,
    FrameDecoder,
    HalfMQError,
    Ops,
    encode_frame,
    error_from_code,
    validate_name,
)
from protocol.errors import BrokerUnavailableError
from protocol.names import shown
from protocol.tlsreads import TLSReads

if TYPE_CHECKING:
    from broker.config import BrokerConfig
    from broker.engines.base import Engine
    from broker.frontends.native.listener import NativeListener
    from broker.security import SessionAccess
    from broker.security.scram import ScramLogin

__all__ = ["ClientConnection", "TLSClientConnection", "SubscribeRequest", "DELIVERY_WINDOW", "SEND_OPTIONS", "check_send_options"]

log = logging.getLogger("halfmq.broker")

#: Unsent output (bytes) past which a connection gets no more deliveries until it reads.
DELIVERY_WINDOW = 1 << 20
#: The ids the broker gives SENDs (see ``_frames``) lie below this: below any rid a client
#: can send (msgpack integers are at least -2**63).
SEND_IDS = -(1 << 64)
#: Least unsent output (bytes) at which the broker stops reading a client (see "Bounded
#: output"): above the delivery window, so that a consumer's full window never stops it.
READ_STOP_MIN = 2 * DELIVERY_WINDOW
#: Seconds a new connection has to finish its handshake (HELLO, and AUTH with users).
HANDSHAKE_TIMEOUT = 10.0
#: ``str.translate`` table removing control characters (C0, DEL, C1).
_NO_CONTROLS = dict.fromkeys([*range(32), *range(127, 160)])


class ClientConnection(asyncio.BaseProtocol):
    """A client's TCP connection (producer or consumer) and its engine session.

    A protocol with ``data_received`` (what ``asyncio.Protocol`` declares) that does not
    derive from it, so that :class:`TLSClientConnection` can be a ``BufferedProtocol``."""

    def __init__(self, listener: NativeListener) -> None:
        self.listener = listener
        self.engine: Engine = listener.engine
        self.config: BrokerConfig = listener.config
        self.decoder = FrameDecoder(listener.max_frame_size, MAX_FRAME_ITEMS)
        self.transport: asyncio.Transport | None = None
        # (made on the loop; looked up once: asyncio.get_running_loop() costs a getpid()
        # system call each time)
        self._loop = asyncio.get_running_loop()
        self.peer = "?"
        self.client_id: str | None = None
        self.role: str | None = None
        self.group: str | None = None
        self.protocol_version: int | None = None
        self.agent: str | None = None  # the client library as its HELLO says (optional, for people)
        self.since = time.time()  # when it connected
        self.conn_id = ""
        self.closed = False
        self.paused = False
        self._out: list[bytes] = []
        self._out_bytes = 0
        self._flush_scheduled = False
        self._rid = 0
        self._send_seq = SEND_IDS  # the last id of the broker's own given to a SEND (see _frames)
        self._send_rids: dict[int, int] = {}  # that id -> the client's rid, until answered
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self.subscribed = False
        self.access: SessionAccess | None = None  # the client's rights, once it is in
        self._login: ScramLogin | None = None  # a login between HELLO and AUTH
        self._hello_args: tuple[str, str, str | None] = ("", "", None)
        self._subscription: tuple[str, str] | None = None  # (topic, group)
        self._inflight = 0  # requests awaiting their reply
        self._inflight_bytes = 0  # message bytes of SENDs awaiting their reply
        self._send_sizes: dict[int, int] = {}  # SEND id -> message bytes of that SEND
        self._reading = True
        # unsent output at which reading stops until the client has read most of it
        self._read_stop = max(READ_STOP_MIN, self.config.max_client_buffer // 8)
        self._output_held = False  # reading stopped for unread output (see flush)
        self._close_after: HalfMQError | None = None  # a malformed frame, answered once the rest are

    # -- the event loop's protocol calls ------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(  # type: ignore[attr-defined]
            high=DELIVERY_WINDOW, low=DELIVERY_WINDOW // 4)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        self.listener.opened(self)
        if not self.closed:  # the handshake (HELLO, and AUTH when users exist) must end in time
            self._handshake_timer: asyncio.TimerHandle | None = asyncio.get_running_loop().call_later(
                HANDSHAKE_TIMEOUT, self._handshake_expired)

    def _handshake_expired(self) -> None:
        self._handshake_timer = None
        if self.client_id is None and not self.closed:
            log.warning("closing %s: no handshake within %.0f s", self.peer, HANDSHAKE_TIMEOUT)
            self.error(0, BadRequestError(f"no handshake (HELLO, and AUTH when users exist) within "
                                          f"{HANDSHAKE_TIMEOUT:.0f} s"))
            self.close()

    def eof_received(self) -> bool | None:
        """The client closed its side: the transport closes ours (what ``asyncio.Protocol``
        does, which this class does not derive from)."""
        return None

    def data_received(self, data: bytes | memoryview) -> None:
        if self.closed:
            return
        try:
            frames = self.decoder.feed(data)
        except HalfMQError as exc:
            # the frames before the bad one in this read are answered first, as if they had
            # come in a read of their own
            self._frames(getattr(exc, "frames", ()))
            if not self.closed:
                log.warning("closing %s: %s", self.peer, exc)
                if self._inflight > 0:  # answer those first: read nothing more, close after
                    self._close_after = exc
                    self._pause_reading()
                else:
                    self.error(0, exc)
                    self.close()
            return
        self._frames(frames)

    def _frames(self, frames: Any) -> None:
        for op, rid, payload in frames:
            if self.closed:
                return
            if op == Ops.REPLY or op == Ops.ERROR:
                self._resolve(op, rid, payload)
                continue
            if op == Ops.SEND:
                # counted in the in-flight limits under an id of the broker's own (below
                # SEND_IDS: never a client's), answered with the client's rid: a rid the client
                # reuses (or 0, fire and forget, which gets no REPLY) cannot hide a SEND's weight
                self._send_seq -= 1
                self._send_rids[self._send_seq] = rid
                rid = self._send_seq
            try:
                self._handle(op, rid, payload)
            except HalfMQError as exc:
                self.error(rid, exc)
            except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
                # a shape the checks did not foresee: say what the payload must be (the
                # Python exception means nothing to the client; kept for the debug log)
                log.debug("malformed %s request from %s: %r", op_name(op), self.peer, exc)
                self.error(rid, payload_error(op))
            except Exception as exc:  # a bug must not take the broker down
                log.exception("error handling %s from %s", op_name(op), self.peer)
                self.error(rid, HalfMQError(f"internal error: {exc!r}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        timer = getattr(self, "_handshake_timer", None)
        if timer is not None:
            timer.cancel()
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(BrokerUnavailableError("connection closed"))
        self._pending.clear()
        # its SENDs still being stored weigh nothing more in the broker's budget
        self.listener.inflight_bytes -= self._inflight_bytes
        self._inflight_bytes = 0
        self._send_sizes.clear()
        self.listener.closed(self)
        log.info("connection %s (%r) closed", self.peer, self.client_id)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self._output_held:  # the client read most of its output: read it again
            self._output_held = False
            self._maybe_read()
        self.engine.session_writable(self)

    # -- requests -----------------------------------------------------------------------

    def _handle(self, op: int, rid: int, p: Any) -> None:
        """Check one request frame and pass it to the engine (raises HalfMQError for the client)."""
        engine = self.engine
        if rid:
            self._inflight += 1  # until its reply or error (see _answered)
            if self._inflight >= self.config.max_inflight_requests and self._reading:
                self._pause_reading()
        if op == Ops.SEND:
            if self.access is None:
                raise self._not_in()
            topic, msgs, half, size = check_send(p, self.listener.valid_topics, self.group, self.config)
            self.listener.security.check_send(self.access, topic, self.group, half)
            self._send_sizes[rid] = size
            self._inflight_bytes += size
            listener = self.listener
            listener.inflight_bytes += size
            if self._inflight_bytes >= self.config.max_inflight_bytes and self._reading:
                self._pause_reading()
            if listener.inflight_bytes >= listener.max_inflight_total:
                listener.hold(self)  # every connection's sends together: past the broker's budget
            engine.send(self, rid, topic, msgs, half)
        elif op == Ops.ACK:
            if not self.subscribed:
                raise self._not_in() if self.access is None else BadRequestError("ACK without a subscription")
            engine.ack(self, rid, check_acks(p))
        elif op == Ops.HELLO:
            self._hello(rid, p)
        elif op == Ops.AUTH:
            self._auth(rid, p)
        elif self.access is None:
            raise self._not_in()
        elif op == Ops.END_TX:
            items, single = check_end_tx(p)
            self.listener.security.check_active(self.access)
            engine.end_tx(self, rid, items, single)
        elif op == Ops.SUBSCRIBE:
            if self.subscribed:
                raise BadRequestError("this connection already has a subscription")
            sub = check_subscribe(p, self.config.max_prefetch)
            self.listener.security.check_subscribe(self.access, sub.topic, sub.group)
            engine.subscribe(self, rid, sub)
            self.subscribed = True
            self._subscription = (sub.topic, sub.group)
        elif op == Ops.RECEIVE:
            receive = check_receive(p, self.config.max_prefetch)
            self.listener.security.check_subscribe(self.access, receive["topic"], receive["group"])
            engine.receive(self, rid, **receive)  # type: ignore[attr-defined]
        elif op == Ops.SETTLE:
            if not isinstance(p, dict) or "group" not in p:
                raise payload_error(op, "group is missing" if isinstance(p, dict) else "")
            group = validate_name(p["group"], "group")
            settles = p.get("s")
            if type(settles) is not list or not settles:
                raise BadRequestError("SETTLE: s must be a non-empty list of [handle, action, ms]")
            self.listener.security.check_settle(self.access, group)
            engine.settle(self, rid, group, settles)  # type: ignore[attr-defined]
        elif op == Ops.UNSUBSCRIBE:
            check_empty(p, "UNSUBSCRIBE")
            engine.unsubscribe(self, rid)
        elif op == Ops.PING:
            check_empty(p, "PING")
            self.reply(rid, {})
        elif op == Ops.RECALL:
            msg_id = check_recall(p)
            security, access = self.listener.security, self.access
            security.check_recall(access)
            # the message's topic is the engine's to know: it asks before recalling
            engine.recall(self, rid, msg_id,
                          lambda topic: security.check_send(access, topic, None, False))
        else:
            raise BadRequestError(f"unknown operation {op}")

    def _not_in(self) -> HalfMQError:
        if self._login is not None:
            return BadRequestError("the login is not finished: AUTH comes next")
        return BadRequestError("the first frame must be HELLO")

    def _hello(self, rid: int, p: Any) -> None:
        if self.client_id is not None or self._login is not None:
            raise BadRequestError("HELLO was already received on this connection")
        if not isinstance(p, dict):
            raise BadRequestError("HELLO payload must be a map")
        version = p.get("version")
        if type(version) is not int or version != PROTOCOL_VERSION:
            raise BadRequestError(f"unsupported protocol version {shown(version)}; this broker speaks {PROTOCOL_VERSION}")
        client_id = check_client_id(p.get("client_id"))
        role = p.get("role")
        if role not in ("producer", "consumer"):
            raise BadRequestError("role must be 'producer' or 'consumer'")
        group = p.get("group")
        if group is not None:
            validate_name(group, "group")
        self.protocol_version = version
        agent = p.get("agent")
        if isinstance(agent, str):
            # shown to people (admin API, console): without control characters
            self.agent = agent[:64].translate(_NO_CONTROLS)
        security = self.listener.security
        auth = p.get("auth")
        if auth is None and not security.login_required:
            self._welcome(rid, client_id, role, group, None, {})
            return
        try:
            self._login, reply_auth = security.login_begin(self.peer, auth)
        except AuthError as exc:
            self._refuse(rid, exc)
            return
        self._hello_args = (client_id, role, group)
        self.reply(rid, {"version": PROTOCOL_VERSION, "auth": reply_auth})

    def _auth(self, rid: int, p: Any) -> None:
        """The client-final message of a login begun by HELLO."""
        login = self._login
        if login is None:
            raise BadRequestError("AUTH without a login in progress (HELLO with 'auth' comes first)")
        self._login = None
        message = p.get("message") if isinstance(p, dict) else None
        try:
            reply_auth = self.listener.security.login_end(self.peer, login, message)
        except AuthError as exc:
            self._refuse(rid, exc)
            return
        self._welcome(rid, *self._hello_args, login.user, {"auth": reply_auth, "user": login.user})

    def _welcome(self, rid: int, client_id: str, role: str, group: str | None, user: str | None,
                 extra: dict[str, Any]) -> None:
        """The client is in (as ``user``, None: anonymous): register it and answer the handshake."""
        security = self.listener.security
        access = security.session(user)
        if role == "producer" and group is not None:
            try:
                security.check_producer_group(access, group)
            except AuthError as exc:
                log.warning("refusing %r from %s: %s", client_id, self.peer, exc)
                self._refuse(rid, exc)
                return
        self.access = access
        self.client_id, self.role, self.group = client_id, role, group
        timer = getattr(self, "_handshake_timer", None)
        if timer is not None:
            timer.cancel()
            self._handshake_timer = None
        log.info("%s %r connected from %s%s%s", role, client_id, self.peer, f" (group {group})" if group else "",
                 f" as user {user!r}" if user else "")
        if role == "producer":
            self.engine.producer_hello(self)
        self.reply(rid, {"version": PROTOCOL_VERSION, "max_message_size": self.config.max_message_size, **extra})

    def _refuse(self, rid: int, exc: HalfMQError) -> None:
        """Answer ``exc`` and close the connection (a refused handshake)."""
        self.error(rid, exc)
        self.close()

    def recheck_rights(self) -> None:
        """Users or grants changed: close this connection if it lost what it holds."""
        access = self.access
        if access is None or self.closed:
            return
        rights = access.rights()
        problem = None
        if rights is None:
            problem = "its user is gone" if access.user else "users now exist and it has no login"
        elif self.role == "producer" and self.group and not rights.may_announce_producer_group(self.group):
            problem = f"it may no longer act as producer group {self.group!r}"
        elif self._subscription is not None and not rights.may_subscribe(*self._subscription):
            problem = f"it may no longer subscribe to {self._subscription[0]!r} as {self._subscription[1]!r}"
        if problem is not None:
            log.warning("closing %s (%r, user %r): %s", self.peer, self.client_id, access.user, problem)
            self.error(0, AuthError(f"rights changed: {problem}"))
            self.close()

    # -- output (the Session side) ------------------------------------------------------

    @property
    def writable(self) -> bool:
        """False while the transport is paused (the client does not read fast enough)."""
        return not self.paused and not self.closed

    def output_room(self) -> int:
        """Bytes of deliveries that may still be queued before the client must read."""
        if self.paused or self.closed or self.transport is None:
            return 0
        return DELIVERY_WINDOW - self.transport.get_write_buffer_size() - self._out_bytes

    def _pause_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self._reading = False
            self.transport.pause_reading()

    def _answered(self, rid: int) -> None:
        """Request ``rid`` got its reply or error: maybe read again."""
        self._inflight -= 1
        size = self._send_sizes.pop(rid, 0) if self._send_sizes else 0
        if size:
            self._inflight_bytes -= size
            listener = self.listener
            listener.inflight_bytes -= size
            if listener.held and listener.inflight_bytes <= listener.max_inflight_total // 2:
                listener.release_held()
        if self._close_after is not None and self._inflight <= 0:
            exc, self._close_after = self._close_after, None
            self.error(0, exc)
            self.close()
            return
        if not self._reading:
            self._maybe_read()

    def _maybe_read(self) -> None:
        """Read the socket again, unless a limit still holds it (in-flight requests or
        bytes over half their limit, unread output, a malformed frame to close after)."""
        if (not self._reading and not self.closed and self.transport is not None and not self._output_held
                and self._close_after is None and self not in self.listener.held
                and self._inflight <= self.config.max_inflight_requests // 2
                and self._inflight_bytes <= self.config.max_inflight_bytes // 2):
            self._reading = True
            self.transport.resume_reading()

    def send_frame(self, op: int, rid: int, payload: Any) -> None:
        """Queue one frame; frames queued in the same loop iteration go out in one write."""
        if self.closed:
            return
        frame = encode_frame(op, rid, payload)
        self._out.append(frame)
        self._out_bytes += len(frame)
        if self._out_bytes >= 64 * 1024:
            self.flush()  # one write's worth: send it now rather than at the end of the iteration
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write every queued frame now (otherwise they go at the end of the loop iteration)."""
        self._flush_scheduled = False
        self._out_bytes = 0
        transport = self.transport
        if self._out and not self.closed and transport is not None:
            out = self._out
            self._out = []
            transport.write(out[0] if len(out) == 1 else b"".join(out))
            unsent = transport.get_write_buffer_size()
            if unsent > self.config.max_client_buffer:
                log.warning("disconnecting %s (%r): %d bytes of output unsent, over --max-client-buffer "
                            "%d: the client does not read its socket", self.peer, self.client_id,
                            unsent, self.config.max_client_buffer)
                self.closed = True
                transport.abort()
            elif unsent > self._read_stop and self.paused and not self._output_held:
                # until resume_writing (which follows the pause_writing that made ``paused``
                # true): the client has read most of it
                self._output_held = True
                if self._reading:
                    self._pause_reading()

    def reply(self, rid: int, payload: Any) -> None:
        """Answer the client's request ``rid`` (nothing when rid is 0). A SEND's id of the
        broker's own (below ``SEND_IDS``, see ``_frames``) is answered with the client's rid."""
        if rid:
            if rid > SEND_IDS:
                self.send_frame(Ops.REPLY, rid, payload)
            else:
                client_rid = self._send_rids.pop(rid, 0)
                if client_rid:
                    self.send_frame(Ops.REPLY, client_rid, payload)
            self._answered(rid)

    def error(self, rid: int, exc: HalfMQError) -> None:
        """Answer the client's request ``rid`` with an ERROR frame (also sent for rid 0; a
        SEND's id of the broker's own is answered with the client's rid)."""
        client_rid = rid if rid > SEND_IDS else self._send_rids.pop(rid, 0)
        self.send_frame(Ops.ERROR, client_rid, {"code": exc.code, "message": str(exc)})
        errors = self.listener.errors
        errors[exc.code] = errors.get(exc.code, 0) + 1
        if rid:
            self._answered(rid)

    def deliver(self, items: list[list[Any]]) -> None:
        """Send deliveries ``[[token, wire message], ...]`` in one DELIVER frame."""
        self.send_frame(Ops.DELIVER, 0, {"d": items})

    def request(self, op: int, payload: Any) -> asyncio.Future[Any]:
        """Send a broker-initiated request; the future resolves with the client's reply payload."""
        self._rid += 1
        fut = asyncio.get_running_loop().create_future()
        if self.closed:
            fut.set_exception(BrokerUnavailableError("connection closed"))
            return fut
        self._pending[self._rid] = fut
        self.send_frame(op, self._rid, payload)
        return fut

    def _resolve(self, op: int, rid: int, payload: Any) -> None:
        fut = self._pending.pop(rid, None)
        if fut is None or fut.done():
            return
        if op == Ops.REPLY:
            fut.set_result(payload)
        else:
            code = payload.get("code", 1) if isinstance(payload, dict) else 1
            msg = payload.get("message", "") if isinstance(payload, dict) else ""
            fut.set_exception(error_from_code(code if type(code) is int else 1, str(msg)))

    def close(self) -> None:
        """Flush queued frames and close the transport."""
        if self.transport is not None and not self.transport.is_closing():
            self.flush()
            self.transport.close()
        self.closed = True


class TLSClientConnection(ClientConnection, TLSReads):
    """A client connection over TLS: the TLS layer decrypts into a lent buffer
    (``protocol.tlsreads``), not into new bytes per record."""
