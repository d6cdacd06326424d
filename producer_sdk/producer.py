"""``Producer``: send messages to a topic and get back where they were stored.

How this works
--------------
A producer owns one ``Connection`` (role ``producer``). ``send`` validates the message
locally and queues it; every message sent to a topic in the same event-loop iteration
goes out in one ``SEND`` frame (``{"topic", "msgs": [[body, tags, keys, properties,
born_ts], ...], "half": false}``) and the reply's rows are handed back to each caller
(micro-batching: many concurrent sends cost one frame and one reply; a lone send is a
batch of one, so latency does not change). No task and no timer per call. The frames are
built in the connection's write callback (``Connection.call_before_write``), so they are
written in the loop iteration after the sends. One exception: sending one at a time (the
last SEND frame held one message, and nothing is in flight or queued), a send is written at
once, from ``send`` itself: it saves the loop iteration (one ``epoll_wait`` per send) and
lowered one-at-a-time p50 about 4 % (12 alternating pairs); a burst that follows still goes
out in frames, all of it after its first message. The broker replies once the messages are
stored durably (per its ``--flush``). The messages of a micro-batch share one ``born_ts``
(the clock read when its first message was queued, in the same loop iteration), and each
caller's future is resolved with its ``SendResult`` straight from the reply's row, by the
connection's reader as the reply is decoded (``Connection.request_callback``).

A retriable failure (the connection was lost with the request in flight, the broker is
shutting down) is retried up to ``retries`` times, all within ``send_timeout`` seconds
from the first attempt; a request issued while disconnected waits for the reconnect.
After that the last error is raised (``BrokerUnavailableError`` or
``RequestTimeoutError``). Non-retriable errors (bad name, too large, ...) raise at once.
A retry after a lost reply may store the message twice: delivery is at least once, so
consumers de-duplicate by a business key.

A message sent with ``delay`` or ``deliver_at`` carries a map of options as a sixth row
element (``{"delay": ms}`` or ``{"at": epoch_ms}``); it shares the SEND frame with the
others. ``recall`` is one ``RECALL`` request.
"""

from __future__ import annotations

import asyncio
import functools
import math
import ssl
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from producer_sdk.arguments import check_count, check_seconds
from producer_sdk.connection import Connection
from protocol import (
    MAX_SEND_MESSAGES,
    BrokerUnavailableError,
    HalfMQError,
    LimitExceededError,
    MessageTooLargeError,
    Op,
    Ops,
    Role,
    SendResult,
    validate_name,
    validate_send_topic,
)
from protocol.message import UnfrozenSendResult

__all__ = ["Producer"]

#: At most this many messages share one SEND frame (a bigger micro-batch is sent in parts,
#: so the broker works on the first part while the rest is being built).
_MAX_MICRO_BATCH = 64

#: Pause before retrying an error the broker itself reported as retriable (e.g. shutting down).
_RETRY_PAUSE = 0.05

#: A message row's keys and properties when it has none: shared, never mutated (packed as
#: an empty array and map; two objects fewer per send for the garbage collector to track).
_NO_KEYS: tuple[str, ...] = ()
_NO_PROPERTIES: dict[str, str] = {}

#: Furthest ahead (seconds, 100 years) a ``delay`` or ``deliver_at`` may lie before the SDK
#: refuses it itself (``ValueError``, nothing sent). The broker's ``--max-delay`` (default 3
#: days, configurable, unknown to the client) is the real limit and refuses the rest with
#: ``BadRequestError``; this bound is far beyond any ``--max-delay`` in use and keeps every
#: delivery time a number a frame can carry.
MAX_SCHEDULE_AHEAD = 100 * 365 * 86400

#: What a ``send_batch`` item dict may hold.
_BATCH_ITEM_KEYS = frozenset(("body", "tags", "keys", "properties", "message_group", "delay", "deliver_at"))


def _encode_body(body: bytes | bytearray | memoryview | str) -> bytes:
    if type(body) is bytes:
        return body
    if isinstance(body, str):
        return body.encode("utf-8")
    if isinstance(body, (bytearray, memoryview)):
        return bytes(body)
    raise TypeError(f"message body must be bytes or str, not {type(body).__name__}")


def _encode_keys(keys: str | Iterable[str] | None) -> list[str]:
    if keys is None:
        return []
    if isinstance(keys, str):
        return [keys]
    out = list(keys)
    for k in out:
        if not isinstance(k, str):
            raise TypeError(f"message keys must be str, not {type(k).__name__}")
    return out


def _encode_properties(properties: Mapping[str, str] | None) -> dict[str, str]:
    if not properties:
        return {}
    out = dict(properties)
    for k, v in out.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError("message properties must map str to str")
    return out


class _Batch:
    """The messages sent to one topic in one loop iteration: one SEND frame (or a few, at
    the size limit). ``deadline`` is set when it goes out (the first attempt's start)."""

    __slots__ = ("topic", "half", "items", "futs", "size", "deadline", "born")

    def __init__(self, topic: str, half: bool) -> None:
        self.topic = topic
        self.half = half
        self.items: list[Sequence[Any]] = []
        self.futs: list[asyncio.Future[SendResult]] = []
        self.size = 0
        self.deadline = 0.0
        #: the born timestamp of its plain messages (epoch ms): they are sent in one loop
        #: iteration, so they share one clock reading
        self.born = int(time.time() * 1000)


def _hand_out(result: Any, exc: BaseException | None, futs: list[asyncio.Future[SendResult]], topic: str,
              *, _row: type = UnfrozenSendResult, _cls: type = SendResult) -> None:
    """Give each sender of a micro-batch the ``SendResult`` of its row of the SEND reply
    ``result`` (or the batch's error ``exc``). Each result is filled as an
    ``UnfrozenSendResult`` and then made a ``SendResult`` (not through the frozen
    dataclass's ``__init__``)."""
    if exc is None:
        rows = result.get("r") if isinstance(result, dict) else None
        if isinstance(rows, list) and len(rows) == len(futs):
            prefix = result.get("p", "")
            try:
                for f, row in zip(futs, rows, strict=True):
                    msg_id = row[0]
                    r = _row()
                    # the id: the prefix and the position as 16 upper-case hex digits
                    # (bytes.hex: a third of the work of formatting with "016X")
                    r.msg_id = prefix + msg_id.to_bytes(8).hex().upper() if type(msg_id) is int else msg_id
                    r.queue_id = row[1]
                    r.queue_offset = row[2]
                    r.topic = topic
                    r.state = None
                    r.__class__ = _cls
                    try:
                        f.set_result(r)
                    except asyncio.InvalidStateError:  # cancelled by its caller
                        pass
                return
            except (TypeError, IndexError, ValueError, OverflowError):
                pass
        exc = HalfMQError(f"malformed SEND reply from broker: {result!r}")
    _fail_all(futs, exc)


def _copy_error(exc: BaseException) -> BaseException:
    return type(exc)(*exc.args) if isinstance(exc, HalfMQError) else exc


def _fail_all(futs: list[asyncio.Future[Any]], exc: BaseException) -> None:
    """Fail every caller's future still pending (each gets its own copy of the error)."""
    for f in futs:
        if not f.done():
            f.set_exception(exc if len(futs) == 1 else _copy_error(exc))


def _request_for_all(
    conn: Connection, op: int, payload: Any, deadline: float, futs: list[asyncio.Future[Any]],
    hand_out: Callable[[Any, BaseException | None], None],
) -> None:
    """Send one request on behalf of many callers: ``hand_out(reply, error)``, called by
    the connection's reader, gives each its part of the reply; if the request cannot go
    out now, or cannot be encoded, every caller fails at once (never left waiting)."""
    try:
        sent = conn.request_callback(op, payload, deadline, hand_out)
    except Exception as exc:  # the payload cannot be encoded: nothing was sent
        _fail_all(futs, exc)
        return
    if not sent:
        _fail_all(futs, BrokerUnavailableError(f"not connected to broker {conn.address}"))


def _send_chunk(conn: Connection, topic: str, half: bool, items: list[Sequence[Any]],
                futs: list[asyncio.Future[SendResult]], deadline: float) -> None:
    """One SEND frame of ``items`` (rows of ``topic``) for the callers waiting on ``futs``.
    If the frame cannot be encoded (a string that is not valid Unicode in a tag, key or
    property), each message is sent in a frame of its own instead, so that only the
    callers of those that cannot be encoded fail, at once, with the encoding error."""
    try:
        sent = conn.request_callback(Ops.SEND, {"topic": topic, "msgs": items, "half": half}, deadline,
                                     functools.partial(_hand_out, futs=futs, topic=topic))
    except Exception as exc:  # nothing was sent
        if len(items) == 1:
            _fail_all(futs, exc)
        else:
            for item, fut in zip(items, futs, strict=True):
                _send_chunk(conn, topic, half, [item], [fut], deadline)
        return
    if not sent:
        _fail_all(futs, BrokerUnavailableError(f"not connected to broker {conn.address}"))


def _encode_options(message_group: str | None = None, delay: float | None = None,
                    deliver_at: float | None = None) -> dict[str, Any] | None:
    """The option map of a SEND message row (docs/protocol.md), or None if it has none."""
    opts: dict[str, Any] = {}
    if message_group is not None:
        if not isinstance(message_group, str) or not 0 < len(message_group) <= 256:
            raise ValueError("message_group must be a string of 1 to 256 characters")
        opts["group"] = message_group
    if delay is not None or deliver_at is not None:
        opts.update(_schedule_options(delay, deliver_at))
    return opts or None


def _schedule_options(delay: float | None, deliver_at: float | None) -> dict[str, int]:
    """The SEND options of a delay (seconds from now) or a delivery time (epoch seconds),
    in whole milliseconds rounded up (never earlier than asked).

    Raises ``TypeError`` for a value that is not a finite number and ``ValueError`` for
    both at once, a delay that is not positive, a ``deliver_at`` that is not a positive
    epoch time, or either more than ``MAX_SCHEDULE_AHEAD`` seconds ahead (by this host's
    clock); the broker checks the rest (a time in the past, beyond its ``--max-delay``).
    """
    if delay is not None and deliver_at is not None:
        raise ValueError("give delay or deliver_at, not both")
    name = "delay" if delay is not None else "deliver_at"
    value = delay if delay is not None else deliver_at
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number of seconds, not {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise TypeError(f"{name} must be a finite number of seconds, got {value!r}")
    if delay is not None:
        if value <= 0:
            raise ValueError(f"delay must be positive, got {value!r}")
        if value > MAX_SCHEDULE_AHEAD:
            raise ValueError(f"delay of {value!r} s is out of range: at most {MAX_SCHEDULE_AHEAD} s "
                             "(and the broker's --max-delay, default 3 days)")
        return {"delay": max(1, math.ceil(value * 1000))}
    if value <= 0:
        raise ValueError(f"deliver_at must be a positive epoch time in seconds, got {value!r}")
    if value > time.time() + MAX_SCHEDULE_AHEAD:  # (compared, not subtracted: any int works)
        raise ValueError(f"deliver_at {value!r} is more than {MAX_SCHEDULE_AHEAD} s ahead "
                         "(the broker's --max-delay, default 3 days, is the real limit)")
    return {"at": math.ceil(value * 1000)}


def _encode_tags(tags: str | None) -> str | None:
    if tags is not None and not isinstance(tags, str):
        raise TypeError(f"message tags must be a str, not {type(tags).__name__}")
    return tags


class Producer:
    """Sends messages to the broker at ``address`` (``"host:port"``, or several
    ``"gw1:7600,gw2:7600"``: cluster mode's gateways, tried in turn on connection loss).

    Options (keyword-only):

    * ``group`` — producer group announced to the broker (optional for plain sends).
    * ``send_timeout`` — seconds a send may take in total, retries included (default 3).
    * ``retries`` — how many times a retriable failure is retried (default 2).
    * ``client_id`` — identifies this client to the broker (default ``host@pid@random``).
    * ``user``, ``password`` — log in (default: ``HALFMQ_USER``/``HALFMQ_PASSWORD``, else
      none); a refused login raises ``AuthError`` from ``start()``.
    * ``tls`` — True (check the broker's certificate against the system's CAs) or an
      ``ssl.SSLContext`` (default: plain TCP).

    Use as ``async with Producer(...) as p:`` or call ``start()``/``close()``.
    """

    def __init__(
        self,
        address: str,
        *,
        group: str | None = None,
        send_timeout: float = 3.0,
        retries: int = 2,
        client_id: str | None = None,
        user: str | None = None,
        password: str | None = None,
        tls: bool | ssl.SSLContext | None = None,
    ) -> None:
        if group is not None:
            validate_name(group, "producer group")
        self.address = address
        self.group = group
        self.send_timeout = check_seconds(send_timeout, "send_timeout", positive=True)
        self.retries = check_count(retries, "retries", 0)
        self._conn = self._make_connection(client_id, user=user, password=password, tls=tls)
        self._started = False
        self._topics_ok: set[str] = set()
        #: this loop iteration's micro-batches: of plain messages, and of half messages, by topic
        self._queued: dict[str, _Batch] = {}
        self._queued_half: dict[str, _Batch] = {}
        self._flush_scheduled = False
        self._last_frame = 0  # messages in the last SEND frame of plain sends (1: one at a time)

    def _make_connection(self, client_id: str | None, **extra: Any) -> Connection:
        return Connection(
            self.address,
            role=Role.PRODUCER,
            group=self.group,
            client_id=client_id,
            request_timeout=self.send_timeout,
            **extra,
        )

    @property
    def client_id(self) -> str:
        """The id this producer announces in its handshake."""
        return self._conn.client_id

    async def start(self) -> None:
        """Connect to the broker. Raises ``BrokerUnavailableError`` if it cannot be reached
        within ``send_timeout``."""
        if self._started:
            return
        await self._conn.open(timeout=self.send_timeout)
        self._started = True

    async def close(self) -> None:
        """Close the connection; sends still waiting fail with ``HalfMQError``."""
        await self._conn.close()

    async def __aenter__(self) -> Producer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def send(
        self,
        topic: str,
        body: bytes | str,
        *,
        tags: str | None = None,
        keys: str | Iterable[str] | None = None,
        properties: Mapping[str, str] | None = None,
        message_group: str | None = None,
        delay: float | None = None,
        deliver_at: float | None = None,
    ) -> SendResult:
        """Store one message on ``topic``; return its ``SendResult`` (msg_id, queue, offset).

        ``body`` is ``bytes`` or a ``str`` (encoded UTF-8); ``keys`` is one key or several.
        ``message_group`` (FIFO): every message of one group goes to one queue, in send
        order, and a FIFO consumer group gets them one at a time, in that order.
        ``delay`` (seconds from now) or ``deliver_at`` (epoch seconds, the broker's clock
        decides) schedules the message: it is stored now and delivered at that time, never
        earlier (``queue_offset`` is then -1: it joins a queue when it is due); 1 ms to the
        broker's ``--max-delay`` (default 3 days) ahead. ``recall(msg_id)`` cancels it.
        Raises ``InvalidNameError`` (bad or reserved topic, checked before sending),
        ``MessageTooLargeError``, ``ValueError``/``TypeError`` (both, or a delay or
        ``deliver_at`` that is not a finite positive number or lies more than
        ``MAX_SCHEDULE_AHEAD``, 100 years, ahead: nothing is sent),
        ``BadRequestError`` (a delivery time the broker refuses: past, or beyond
        ``--max-delay``), ``BrokerUnavailableError``/``RequestTimeoutError`` once the
        retries are used up, or the broker's error.
        """
        if topic not in self._topics_ok:
            validate_send_topic(topic)
            if len(self._topics_ok) < 10_000:
                self._topics_ok.add(topic)
        data = body if type(body) is bytes else _encode_body(body)
        conn = self._conn
        size = len(data)
        if size > conn.max_message_size:
            raise MessageTooLargeError(
                f"message body of {size} bytes exceeds the broker's limit of "
                f"{conn.max_message_size} bytes"
            )
        if tags is not None and type(tags) is not str:
            _encode_tags(tags)  # raises TypeError
        key_list = _encode_keys(keys) if keys else _NO_KEYS
        props = _encode_properties(properties) if properties else _NO_PROPERTIES
        options = None
        if message_group is not None or delay is not None or deliver_at is not None:
            options = _encode_options(message_group, delay, deliver_at)
        if conn._ready and not conn._paused and not conn._closed:  # conn.ready_to_send, inlined
            # fast path: joins this loop iteration's SEND frame for the topic
            batch = self._queued.get(topic)
            lone = False
            if batch is None:
                batch = _Batch(topic, False)
                # one at a time (the last frame held one message, nothing in flight or waiting
                # to be written): written at once, below, not at the end of the iteration.
                # Decided by the last frame, not by "nothing in flight" alone: under group
                # commit every reply can come back at once, and writing the next send alone
                # then cost e2e-users and publish-users 5-14 % (4 alternating pairs)
                if self._last_frame == 1 and not self._flush_scheduled and conn.idle:
                    lone = True
                else:
                    self._queued[topic] = batch
                    if not self._flush_scheduled:
                        self._flush_scheduled = True
                        conn.call_before_write(self._flush_queued)
            item: Sequence[Any] = ((data, tags, key_list, props, batch.born) if options is None
                                   else (data, tags, key_list, props, batch.born, options))
            # (not asyncio.Future(): finding the running loop costs a getpid() system call)
            fut: asyncio.Future[SendResult] = conn._loop.create_future()
            items = batch.items
            items.append(item)
            batch.futs.append(fut)
            batch.size += size
            if lone:
                conn.write_through(self._send_queued, (batch,))
            elif len(items) >= _MAX_MICRO_BATCH:
                self._flush_topic(batch)
            try:
                return await fut
            except HalfMQError as exc:
                # the batch went out (its future is only settled after that): its deadline
                # is the first attempt's
                if not exc.retriable or self.retries <= 0 or conn.closed or conn._loop.time() >= batch.deadline:
                    raise
                return await self._retry_send(topic, item, batch.deadline, 1)
        item = [data, tags, key_list, props, int(time.time() * 1000)]
        if options is not None:
            item.append(options)
        return await self._retry_send(topic, item, None, 0)

    async def _retry_send(self, topic: str, item: Sequence[Any], deadline: float | None, attempt: int) -> SendResult:
        """``send`` without the fast path: while disconnected or paused, or to retry."""
        reply = await self._send_request({"topic": topic, "msgs": [item], "half": False},
                                         deadline=deadline, attempt=attempt)
        return self._results(topic, reply, 1)[0]

    def _enqueue(self, topic: str, item: list[Any], half: bool) -> asyncio.Future[SendResult]:
        """Queue one message for this loop iteration's SEND frame of ``(topic, half)``;
        the future gets its ``SendResult``."""
        fut: asyncio.Future[SendResult] = self._conn._loop.create_future()
        queued = self._queued_half if half else self._queued
        batch = queued.get(topic)
        if batch is None:
            batch = queued[topic] = _Batch(topic, half)
        batch.items.append(item)
        batch.futs.append(fut)
        batch.size += len(item[0])
        if len(batch.items) >= _MAX_MICRO_BATCH:
            self._flush_topic(batch)
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            self._conn.call_before_write(self._flush_queued)
        return fut

    def _flush_topic(self, batch: _Batch) -> None:
        """Send one topic's queued messages now (the micro-batch is full)."""
        queued = self._queued_half if batch.half else self._queued
        if queued.get(batch.topic) is batch:
            del queued[batch.topic]
            self._send_queued((batch,))

    def _flush_queued(self) -> None:
        """Send the queued messages: one SEND frame per topic (split at the size limit)."""
        self._flush_scheduled = False
        if self._queued:
            queued, self._queued = self._queued, {}
            self._send_queued(queued.values())
        if self._queued_half:
            queued, self._queued_half = self._queued_half, {}
            self._send_queued(queued.values())

    def _send_queued(self, batches: Iterable[_Batch]) -> None:
        conn = self._conn
        loop = conn._loop
        assert loop is not None
        deadline = loop.time() + self.send_timeout
        limit = max(1, conn.max_message_size)
        for batch in batches:
            batch.deadline = deadline
            topic, half, items, futs = batch.topic, batch.half, batch.items, batch.futs
            if not half:
                self._last_frame = len(items)
            if batch.size <= limit:
                chunks = [(items, futs)]
            else:
                chunks = []
                start = total = 0
                for i, it in enumerate(items):
                    n = len(it[0])
                    if total + n > limit and i > start:
                        chunks.append((items[start:i], futs[start:i]))
                        start, total = i, 0
                    total += n
                chunks.append((items[start:], futs[start:]))
            for c_items, c_futs in chunks:
                _send_chunk(conn, topic, half, c_items, c_futs, deadline)

    async def send_batch(
        self, topic: str, items: Iterable[bytes | str | Mapping[str, Any]]
    ) -> list[SendResult]:
        """Store many messages on ``topic`` in one round trip; return their results in order.

        Each item is a body (``bytes``/``str``) or a dict with ``body`` and optionally
        ``tags``, ``keys``, ``properties``, ``message_group``, ``delay`` or ``deliver_at``
        (as in ``send``). The bodies together must fit the broker's message size limit
        (``MessageTooLargeError`` otherwise; split the batch), and a batch holds at most
        ``protocol.MAX_SEND_MESSAGES`` (10,000) messages (``LimitExceededError`` otherwise,
        nothing sent). Raises like ``send``; nothing is stored if one item is refused.
        """
        validate_send_topic(topic)
        born = int(time.time() * 1000)
        msgs: list[list[Any]] = []
        total = 0
        for item in items:
            if isinstance(item, Mapping):
                unknown = set(item) - _BATCH_ITEM_KEYS
                if unknown or "body" not in item:
                    raise TypeError(
                        "a batch item dict needs 'body' and may have 'tags', 'keys', 'properties', "
                        "'message_group', 'delay', 'deliver_at'"
                    )
                data = _encode_body(item["body"])
                row: list[Any] = [data, _encode_tags(item.get("tags")), _encode_keys(item.get("keys")),
                                  _encode_properties(item.get("properties")), born]
                options = _encode_options(item.get("message_group"), item.get("delay"), item.get("deliver_at"))
                if options is not None:
                    row.append(options)
                msgs.append(row)
            else:
                data = _encode_body(item)
                msgs.append([data, None, [], {}, born])
            total += len(data)
        if not msgs:
            return []
        if len(msgs) > MAX_SEND_MESSAGES:
            raise LimitExceededError(f"a batch holds at most {MAX_SEND_MESSAGES} messages, this one has "
                                     f"{len(msgs)}; split the batch")
        limit = self._conn.max_message_size
        if total > limit:
            raise MessageTooLargeError(
                f"batch bodies total {total} bytes, over the broker's limit of {limit} bytes; "
                "split the batch"
            )
        reply = await self._send_request({"topic": topic, "msgs": msgs, "half": False})
        return self._results(topic, reply, len(msgs))

    async def recall(self, msg_id: str) -> None:
        """Cancel the scheduled message ``msg_id`` (sent with ``delay`` or ``deliver_at``)
        before its time; returns once the broker has recorded it durably (recalling it
        again is no error). Raises ``MessageStateError`` if there is no such message, it
        was not scheduled, or its time has come (it is delivered), and like ``send``.
        """
        if not isinstance(msg_id, str):
            raise TypeError(f"msg_id must be a str, not {type(msg_id).__name__}")
        await self._send_request({"msg_id": msg_id}, op=Op.RECALL)

    # -- internals ---------------------------------------------------------------------

    async def _send_request(
        self, payload: dict[str, Any], op: int = Op.SEND, *, deadline: float | None = None, attempt: int = 0
    ) -> Any:
        """One request with the retry policy: retriable errors retried within send_timeout."""
        conn = self._conn
        loop = conn._loop
        if loop is None:
            raise HalfMQError("producer is not started; call start() or use 'async with'")
        if deadline is None:
            deadline = loop.time() + self.send_timeout
        if not attempt:
            fut = conn.request_future(op, payload, deadline)  # fast path: connected and writable
            if fut is not None:
                try:
                    return await fut
                except HalfMQError as exc:
                    if not exc.retriable or self.retries <= 0 or conn.closed or loop.time() >= deadline:
                        raise
                    attempt = 1
        if attempt and conn.connected:  # the broker said "retry", not a lost connection
            await asyncio.sleep(min(_RETRY_PAUSE * attempt, max(0.0, deadline - loop.time())))
        while True:
            try:
                return await conn.request(op, payload, deadline=deadline)
            except HalfMQError as exc:
                if not exc.retriable or attempt >= self.retries or conn.closed:
                    raise
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise
                attempt += 1
                if conn.connected:  # the broker said "retry", not a lost connection
                    await asyncio.sleep(min(_RETRY_PAUSE * attempt, remaining))

    @staticmethod
    def _results(topic: str, reply: Any, n: int) -> list[SendResult]:
        try:
            rows = reply["r"]
            if len(rows) != n:
                raise ValueError(f"{len(rows)} results for {n} messages")
            prefix = reply.get("p", "")
            return [SendResult(f"{prefix}{r[0]:016X}" if type(r[0]) is int else str(r[0]), int(r[1]), int(r[2]), topic)
                    for r in rows]
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise HalfMQError(f"malformed SEND reply from broker: {reply!r} ({exc})") from None
