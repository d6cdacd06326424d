"""The boundary between front ends and engines.

How this works
--------------
A front end (the native TCP protocol, the admin HTTP API) turns what a client asks into
calls on an :class:`Engine`; the engine keeps what must survive and answers through the
client's :class:`Session`. Calls are plain method calls on the event loop — no task per
request — and an engine answers a request later, when what it asked for is durable, with
``session.reply(rid, payload)`` or ``session.error(rid, exc)``. Payloads have the shapes of
the native protocol (docs/protocol.md), so the native front end forwards them unchanged.

The front end validates what it receives before calling the engine (names, types, sizes,
the limits of ``BrokerConfig``): an engine may assume well-formed arguments, and a request
refused by the front end never reaches it, so nothing is stored for it.

Admin queries are coroutines returning JSON-able values; they are not on the data path.
Settings (``settings_get`` / ``settings_put`` / ...) are a small key-value space of the
engine for configuration that must be shared and survive: users and rights, tokens,
webhooks, per-group settings. Keys are plain strings; features use their own prefix
(``users/``, ``webhooks/``, ...).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Protocol

from protocol.errors import BadRequestError, HalfMQError
from protocol.names import shown

__all__ = ["Engine", "Session", "Subscription", "end_tx_item"]


def end_tx_item(i: int, item: Any) -> tuple[str, str]:
    """Item ``i`` of an END_TX list as ``(msg_id, outcome)``; raises ``BadRequestError``
    naming the item and what it must be (every engine answers a bad item so, on its own)."""
    if (type(item) is not list and type(item) is not tuple) or len(item) != 2:
        raise BadRequestError(f"END_TX item {i}: expected [msg_id, outcome], got {shown(item)}")
    msg_id, outcome = item
    if not isinstance(msg_id, str):
        raise BadRequestError(f"END_TX item {i}: msg_id must be a string, got {shown(msg_id)}")
    if outcome != "COMMIT" and outcome != "ROLLBACK":
        raise BadRequestError(f"END_TX item {i}: outcome must be 'COMMIT' or 'ROLLBACK', got {shown(outcome)}")
    return msg_id, outcome


class Session(Protocol):
    """One client connection, as an engine sees it (implemented by each front end)."""

    conn_id: str  # unique within the broker process
    client_id: str | None  # from the handshake
    role: str | None  # "producer" | "consumer"
    group: str | None  # the producer group of the handshake
    peer: str  # "ip:port" of the client
    closed: bool

    @property
    def writable(self) -> bool:
        """False while the client does not read fast enough: deliver nothing more to it."""
        ...

    def output_room(self) -> int:
        """Bytes of deliveries that may still be queued for the client before it must
        read (0 or less: deliver nothing more now; ``Engine.session_writable`` follows)."""
        ...

    def reply(self, rid: int, payload: Any) -> None:
        """Answer request ``rid`` (nothing when rid is 0)."""
        ...

    def error(self, rid: int, exc: HalfMQError) -> None:
        """Answer request ``rid`` with an error."""
        ...

    def deliver(self, items: list[list[Any]]) -> None:
        """Send deliveries ``[[token, wire message], ...]`` to a consumer."""
        ...

    def request(self, op: int, payload: Any) -> asyncio.Future[Any]:
        """A broker-initiated request (a check-back); resolves with the client's answer."""
        ...

    def flush(self) -> None:
        """Write what is queued for the client now rather than at the end of the iteration."""
        ...


class Subscription(Protocol):
    """What a consumer asked for (see ``SUBSCRIBE`` in docs/protocol.md)."""

    group: str
    topic: str
    tags: str | None
    start: str
    prefetch: int
    max_reconsume_times: int
    fifo: bool  # the group is (or, if new, becomes) FIFO


class Engine(Protocol):
    """What a broker does, whatever keeps its data."""

    async def start(self) -> None:
        """Open or connect to the storage and recover; raise if that is impossible."""
        ...

    async def stop(self) -> None:
        """Finish and persist what is in flight (SPEC §2's graceful stop)."""
        ...

    def session_opened(self, s: Session) -> None: ...

    def session_closed(self, s: Session) -> None:
        """The connection is gone: no more deliveries to it; its leases expire later (C5)."""
        ...

    def producer_hello(self, s: Session) -> None:
        """``s`` is a producer (of ``s.group``, if set): check-backs may be sent to it."""
        ...

    def send(self, s: Session, rid: int, topic: str, msgs: list[list[Any]], half: bool) -> None:
        """Store ``msgs`` (validated wire rows ``[body, tags, keys, properties, born]``, some
        with a sixth element, the normalized options map: ``at`` the due epoch ms of a plain
        message, ``delay`` ms after the commit of a half message, ``group``) in ``topic``;
        reply ``{"p": prefix, "r": [[pos, queue_id, queue_offset], ...]}`` once durable
        (``queue_offset`` -1 for a half or scheduled message)."""
        ...

    def end_tx(self, s: Session, rid: int, items: list[tuple[str, str]], single: bool) -> None:
        """Record transaction outcomes (T6); reply when every changed outcome is durable."""
        ...

    def recall(self, s: Session, rid: int, msg_id: str,
               allowed: Callable[[str], None] | None = None) -> None:
        """Cancel a scheduled message not yet due; reply ``{"state": "RECALLED"}`` once that
        is durable. Raises ``MessageStateError`` (unknown, not scheduled, already due), or
        what ``allowed(topic)`` raises for the message's topic (a front end's rights check)."""
        ...

    def subscribe(self, s: Session, rid: int, sub: Subscription) -> None: ...

    def unsubscribe(self, s: Session, rid: int) -> None: ...

    def ack(self, s: Session, rid: int, acks: list[tuple[int, bool]]) -> None:
        """Results of deliveries (``ok``: SUCCESS); reply (when rid) once they are durable."""
        ...

    def session_writable(self, s: Session) -> None:
        """The client reads again: deliveries may resume."""
        ...

    def receive(self, s: Session, rid: int, *, group: str, topic: str, tags: str | None,
                max_messages: int, invisible_ms: int, wait_ms: int) -> None:
        """A long poll: lease up to ``max_messages`` messages, each for ``invisible_ms``;
        reply ``{"m": [[receipt handle, message], ...]}`` as soon as there are some, or
        ``{"m": []}`` after ``wait_ms``."""
        ...

    def settle(self, s: Session, rid: int, group: str, items: list[Any]) -> None:
        """Ack / nack / change visibility / renew / dead-letter by receipt handle
        (docs/protocol.md, SETTLE), from any connection of the group; reply once the acks
        are durable."""
        ...

    def cancel_receive(self, s: Session, rid: int) -> None:
        """Drop the pending pull request ``rid`` of ``s`` unanswered (its client gave up)."""
        ...

    def route(self, topic: str) -> int:
        """The number of queues of ``topic`` (created if auto-create is on); raises
        ``TopicNotFoundError`` or ``LimitExceededError``."""
        ...

    # -- settings: small, slow-changing configuration kept by the engine (users, rights,
    #    tokens, webhooks, per-group settings), shared by every broker on the same storage

    async def settings_get(self, key: str, default: Any = None) -> Any:
        """The value stored under ``key`` (msgpack-able), or ``default``."""
        ...

    async def settings_put(self, key: str, value: Any) -> None:
        """Store ``value`` under ``key``, durably, before returning."""
        ...

    async def settings_delete(self, key: str) -> None:
        """Remove ``key`` (no error if absent)."""
        ...

    async def settings_items(self, prefix: str) -> dict[str, Any]:
        """Every key starting with ``prefix``, with its value, in key order."""
        ...
