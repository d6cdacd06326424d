"""``SimpleConsumer``: pull messages in batches, each held for its own invisible duration.

How this works
--------------
A simple consumer owns one ``Connection`` (role ``consumer``) and no subscription.
``receive`` sends a ``RECEIVE`` request (a long poll): the broker answers as soon as it has
messages for the group, with up to ``max_messages`` of them, each *leased* — invisible to
every other consumer of the group — for ``invisible_duration`` seconds, or with none after
``wait`` seconds. Each message comes with a *receipt handle* naming its lease:

- ``ack(message)`` ends the lease: the message is done for the group;
- ``nack(message, delay)`` gives it back: it is delivered again after ``delay`` seconds
  (the group's retry delay when None), with ``reconsume_times`` + 1;
- ``change_invisible_duration(message, seconds)`` restarts its lease with a new length
  (and a new handle, which this consumer remembers for later calls on the message).

A lease that runs out is a failed attempt: the message is delivered again (C5), and after
the group's maximum attempts it goes to ``%DLQ%<group>`` (C4). A receipt handle is valid
from any connection of the group — a worker may hand a message to another process that
acks it — until its lease ends, runs out or changes; after that, or after a broker
restart, it is refused with ``StaleReceiptError`` (the message is, or will be, delivered
again). Acks are answered once durable, so an ack that returned survives a crash.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from producer_sdk.arguments import MAX_PREFETCH, check_count, check_seconds
from producer_sdk.connection import Connection
from protocol import (
    HalfMQError,
    Message,
    Op,
    Role,
    error_from_code,
    validate_name,
    validate_subscribe_topic,
)

__all__ = ["SimpleConsumer", "ReceivedMessage"]

log = logging.getLogger("halfmq.consumer")

#: Seconds the first connect may take before ``start()`` gives up.
CONNECT_TIMEOUT = 5.0
#: Seconds a settle request may take.
SETTLE_TIMEOUT = 5.0
#: The broker's bounds of an invisible duration (a lease; also the longest nack delay) and
#: of a receive's wait, in seconds.
MIN_INVISIBLE = 0.1
MAX_INVISIBLE = 12 * 3600.0
MAX_WAIT = 60.0
#: Most acks ``ack_many`` puts in one request (the broker takes at most
#: ``protocol.MAX_FRAME_ITEMS`` entries in one list).
ACK_MANY_BATCH = 10_000


@dataclass(frozen=True, slots=True)
class ReceivedMessage(Message):
    """A ``Message`` received by a ``SimpleConsumer``, with the receipt handle of its lease."""

    receipt_handle: str = ""


class SimpleConsumer:
    """Pulls ``topic`` as a member of consumer ``group`` from the broker at ``address``
    (``"host:port"``, or several ``"gw1:7600,gw2:7600"``, tried in turn on connection loss).

    Options (keyword-only, defaults in brackets):

    * ``tags`` — ``"*"`` for all, or ``"A || B"`` [``"*"``].
    * ``invisible_duration`` — seconds each received message stays leased, 0.1 to 43200
      (12 h) [30].
    * ``wait`` — seconds ``receive`` waits for messages when there are none, 0 to 60 [20].
    * ``client_id`` — identifies this client to the broker [``host@pid@random``].
    * ``user``, ``password`` — log in [``HALFMQ_USER``/``HALFMQ_PASSWORD``, else none]; a
      refused login raises ``AuthError`` from ``start()``.
    * ``tls`` — True (the system's CAs) or an ``ssl.SSLContext`` [plain TCP].

    Use as ``async with SimpleConsumer(...) as c:`` or call ``start()``/``close()``.
    """

    def __init__(
        self,
        address: str,
        *,
        group: str,
        topic: str,
        tags: str = "*",
        invisible_duration: float = 30.0,
        wait: float = 20.0,
        client_id: str | None = None,
        user: str | None = None,
        password: str | None = None,
        tls: bool | ssl.SSLContext | None = None,
    ) -> None:
        validate_name(group, "consumer group")
        validate_subscribe_topic(topic)
        if not isinstance(tags, str) or not tags.strip():
            raise ValueError("tags must be '*' or 'A || B'")
        self.address = address
        self.group = group
        self.topic = topic
        self.tags = tags
        self.invisible_duration = _check_invisible(invisible_duration, "invisible_duration")
        self.wait = _check_wait(wait)
        self._conn = Connection(address, role=Role.CONSUMER, group=group, client_id=client_id,
                                request_timeout=SETTLE_TIMEOUT, user=user, password=password, tls=tls)
        self._handles: dict[str, str] = {}  # msg_id -> the newest handle of a changed lease

    @property
    def client_id(self) -> str:
        """The id this consumer announces in its handshake."""
        return self._conn.client_id

    async def start(self) -> None:
        """Connect. Raises ``BrokerUnavailableError`` if the broker cannot be reached in 5 s."""
        await self._conn.open(timeout=CONNECT_TIMEOUT)

    async def close(self) -> None:
        """Close the connection. Leases held stay until they run out (then redelivered)."""
        await self._conn.close()

    async def __aenter__(self) -> SimpleConsumer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def receive(self, max_messages: int = 32, invisible_duration: float | None = None,
                      wait: float | None = None) -> list[ReceivedMessage]:
        """Up to ``max_messages`` messages, each leased for ``invisible_duration`` seconds;
        waits up to ``wait`` seconds for the first (an empty list when none came).

        Raises ``LimitExceededError`` past the broker's ``--max-prefetch``, the broker's
        error for a bad request, or ``BrokerUnavailableError`` / ``RequestTimeoutError``.
        """
        max_messages = check_count(max_messages, "max_messages", 1, MAX_PREFETCH)
        invisible = (self.invisible_duration if invisible_duration is None
                     else _check_invisible(invisible_duration, "invisible_duration"))
        waiting = self.wait if wait is None else _check_wait(wait)
        payload = {"group": self.group, "topic": self.topic, "tags": self.tags, "max": max_messages,
                   "invisible_ms": int(invisible * 1000), "wait_ms": int(waiting * 1000)}
        reply = await self._call(Op.RECEIVE, payload, waiting + SETTLE_TIMEOUT)
        out = []
        try:
            for handle, wire in reply["m"]:
                m = Message.from_wire(wire)
                fields = {f.name: getattr(m, f.name) for f in dataclasses.fields(Message)}
                out.append(ReceivedMessage(**fields, receipt_handle=handle))
        except (KeyError, TypeError, ValueError) as exc:
            raise HalfMQError(f"malformed RECEIVE reply from broker: {exc}") from None
        return out

    async def ack(self, message: ReceivedMessage) -> None:
        """The message is done for the group. Raises ``StaleReceiptError`` if its lease
        already ended, ran out or changed (it is, or will be, delivered again)."""
        await self._settle(message, "ack", 0)

    async def nack(self, message: ReceivedMessage, delay: float | None = None) -> None:
        """Give the message back: delivered again after ``delay`` seconds, at most 12 h, the
        longest invisible duration (None: the group's retry delay for its attempt), counted
        as a failed attempt."""
        if delay is None:
            ms = -1
        else:  # (a negative delay: at once)
            ms = int(max(0.0, check_seconds(delay, "delay", low=-math.inf, high=MAX_INVISIBLE)) * 1000)
        await self._settle(message, "nack", ms)

    async def change_invisible_duration(self, message: ReceivedMessage, seconds: float) -> ReceivedMessage:
        """Restart the message's lease for ``seconds``; returns the message with its new
        receipt handle (this consumer also remembers it for ``ack``/``nack``)."""
        seconds = _check_invisible(seconds, "seconds")
        new = await self._settle(message, "cid", int(seconds * 1000))
        return dataclasses.replace(message, receipt_handle=new)

    async def ack_many(self, messages: Iterable[ReceivedMessage]) -> list[HalfMQError | None]:
        """Ack several messages, in one request per ``ACK_MANY_BATCH`` of them; per message
        None or its error."""
        batch = list(messages)
        items = [[self._handle(m), "ack", 0] for m in batch]
        results: list[Any] = []
        for start in range(0, len(items), ACK_MANY_BATCH):
            results += await self._request(items[start : start + ACK_MANY_BATCH])
        out: list[HalfMQError | None] = []
        for m, r in zip(batch, results, strict=True):
            if isinstance(r, list):
                out.append(error_from_code(int(r[0]), str(r[1])))
            else:
                self._handles.pop(m.msg_id, None)
                out.append(None)
        return out

    # -- internals -----------------------------------------------------------------------

    def _handle(self, message: ReceivedMessage) -> str:
        if not isinstance(message, ReceivedMessage):
            raise TypeError("expected a message returned by SimpleConsumer.receive")
        return self._handles.get(message.msg_id, message.receipt_handle)

    async def _request(self, items: list[list[Any]]) -> list[Any]:
        reply = await self._call(Op.SETTLE, {"group": self.group, "s": items}, SETTLE_TIMEOUT)
        results = reply.get("r") if isinstance(reply, dict) else None
        if not isinstance(results, list) or len(results) != len(items):
            raise HalfMQError(f"malformed SETTLE reply from broker: {reply!r}")
        return results

    async def _call(self, op: int, payload: Any, timeout: float) -> Any:
        """A request, tried again (within ``timeout``) when the connection was lost with
        it in flight: the connection comes back by itself."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                return await self._conn.request(op, payload, deadline=deadline)
            except HalfMQError as exc:
                if not exc.retriable or self._conn.closed or loop.time() >= deadline:
                    raise
                if self._conn.connected:  # the broker said "retry", not a lost connection
                    await asyncio.sleep(0.05)

    async def _settle(self, message: ReceivedMessage, action: str, ms: int) -> Any:
        (result,) = await self._request([[self._handle(message), action, ms]])
        if isinstance(result, list):
            raise error_from_code(int(result[0]), str(result[1]))
        if action == "cid":
            self._handles[message.msg_id] = result
        else:
            self._handles.pop(message.msg_id, None)
        return result


def _check_invisible(value: float, name: str) -> float:
    """A lease's length: the broker's range, 0.1 s to 12 h."""
    return check_seconds(value, name, low=MIN_INVISIBLE, high=MAX_INVISIBLE)


def _check_wait(value: float) -> float:
    """A long poll's wait: the broker's range, 0 to 60 s."""
    return check_seconds(value, "wait", low=0.0, high=MAX_WAIT)
