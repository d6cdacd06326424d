"""One client connection on the broker side: frames in, requests dispatched, frames out.

How this works
--------------
``ClientConnection`` is an ``asyncio.Protocol``. Bytes go through a ``FrameDecoder``; each
frame is handled synchronously by the ``Broker`` (``broker.handle_frame``), which answers
with ``reply`` / ``error`` now or later (when the log has the records). Outgoing frames are
collected in a list and written with one ``transport.write`` per loop iteration, so many
replies and deliveries share a syscall.

A malformed frame (undecodable, too large, not ``[op, rid, payload]``) is answered with an
ERROR frame and the connection is closed; nothing it carried is stored and other
connections are not affected. The broker may also send requests (check-backs) on the
connection: ``request`` returns a future resolved by the client's REPLY or ERROR.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from protocol import (
    FrameDecoder,
    HalfMQError,
    Op,
    ProtocolError,
    encode_frame,
    error_from_code,
)
from protocol.errors import BrokerUnavailableError

if TYPE_CHECKING:
    from broker.server import Broker

__all__ = ["ClientConnection"]

log = logging.getLogger("halfmq.broker")


class ClientConnection(asyncio.Protocol):
    """A client's TCP connection (producer or consumer)."""

    def __init__(self, broker: Broker, max_frame_size: int) -> None:
        self.broker = broker
        self.decoder = FrameDecoder(max_frame_size)
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.client_id: str | None = None
        self.role: str | None = None
        self.group: str | None = None
        self.conn_id = ""
        self.closed = False
        self.paused = False
        self._out: list[bytes] = []
        self._out_bytes = 0
        self._flush_scheduled = False
        self._rid = 0
        self._pending: dict[int, asyncio.Future] = {}
        self.subscription: tuple[str, str] | None = None  # (group, topic)

    # -- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        self.broker.connection_opened(self)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            frames = self.decoder.feed(data)
        except HalfMQError as exc:
            log.warning("closing %s: %s", self.peer, exc)
            self.error(0, exc)
            self.close()
            return
        handle = self.broker.handle_frame
        for op, rid, payload in frames:
            if self.closed:
                return
            if op == Op.REPLY or op == Op.ERROR:
                self._resolve(op, rid, payload)
                continue
            try:
                handle(self, op, rid, payload)
            except HalfMQError as exc:
                self.error(rid, exc)
            except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
                self.error(rid, ProtocolError(f"malformed {_op_name(op)} request: {exc!r}"))
            except Exception as exc:  # a bug must not take the broker down
                log.exception("error handling %s from %s", _op_name(op), self.peer)
                self.error(rid, HalfMQError(f"internal error: {exc!r}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(BrokerUnavailableError("connection closed"))
        self._pending.clear()
        self.broker.connection_closed(self)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self.broker.schedule_dispatch()

    # -- output -------------------------------------------------------------------------

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
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        """Write every queued frame now (otherwise they go at the end of the loop iteration)."""
        self._flush_scheduled = False
        self._out_bytes = 0
        if self._out and not self.closed and self.transport is not None:
            out = self._out
            self._out = []
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    def reply(self, rid: int, payload: Any) -> None:
        """Answer the client's request ``rid`` (nothing when rid is 0)."""
        if rid:
            self.send_frame(Op.REPLY, rid, payload)

    def error(self, rid: int, exc: HalfMQError) -> None:
        """Answer the client's request ``rid`` with an ERROR frame (also sent for rid 0)."""
        self.send_frame(Op.ERROR, rid, {"code": exc.code, "message": str(exc)})

    def request(self, op: int, payload: Any) -> asyncio.Future:
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
        if op == Op.REPLY:
            fut.set_result(payload)
        else:
            code = payload.get("code", 1) if isinstance(payload, dict) else 1
            msg = payload.get("message", "") if isinstance(payload, dict) else ""
            fut.set_exception(error_from_code(code, msg))

    def close(self) -> None:
        """Flush queued frames and close the transport."""
        if self.transport is not None and not self.transport.is_closing():
            self.flush()
            self.transport.close()
        self.closed = True


def _op_name(op: int) -> str:
    try:
        return Op(op).name
    except ValueError:
        return f"op {op}"
