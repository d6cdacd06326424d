"""``TransactionProducer`` and ``TransactionListener``: RocketMQ-style half messages.

How this works
--------------
``send_in_transaction`` runs the transaction in four steps (SPEC §6):

1. ``SEND`` with ``half: true`` stores a *half message*, invisible to consumers. If that
   fails the error is raised and the listener is never called (T8).
2. ``listener.execute_local_transaction(message, arg)`` runs the local transaction
   (``async def`` awaited; plain ``def`` in one of ``execute_workers`` threads of this
   producer: ``ListenerThreads``, whose results come back to the loop in batches; the
   caller's ``contextvars`` are visible to it). ``execute_workers=0`` calls a plain ``def``
   on the event loop instead, for a local transaction that takes microseconds (an SQLite
   write): a thread costs GIL hand-overs and wake-ups per call that can outweigh such a
   transaction several times over, while a slow one would stall the loop. At most
   ``_INLINE_PER_ITERATION`` of them run in one loop iteration; the others are queued and
   called, in order and each in its caller's context, at the start of the next iterations
   (a waiting caller resumes once, with the result): the outcomes of each group go out (one
   END_TX) while the next group runs, so the broker records them meanwhile instead of
   waiting for the whole window. If it raises, the
   outcome is UNKNOWN: nothing is reported, the exception is re-raised and the broker's
   check-back decides (T5). Whether a listener method is ``async`` is looked up once per
   method, not per call.
3. COMMIT or ROLLBACK is reported with ``END_TX`` (idempotent on the broker, so it is
   retried like a send). If it cannot reach the broker that is not an error (T10): the
   method returns with the state it tried to report and check-back resolves it later. A
   ``TransactionStateError`` reply (conflicting outcome) propagates.
4. UNKNOWN reports nothing; check-back decides.

A ``BatchTransactionListener`` (``execute_local_transaction_batch``) takes step 2 for many
transactions in one call, one batch at a time, so that they can share one database commit
(``producer_sdk.tx_batches``); steps 1, 3 and 4 are the same.

Check-back: the broker sends ``CHECK {"m": message}`` on this producer's own connection;
``listener.check_local_transaction(message)`` answers (same async/thread rule, at most
``check_workers`` at once, in ``check_workers`` threads of their own) and the reply is ``{"state": "COMMIT"|"ROLLBACK"|"UNKNOWN"}``
(UNKNOWN if the listener raises). The group is part of the handshake, which the connection
repeats on every reconnect, so check-backs find a restarted or reconnected producer.
"""

from __future__ import annotations

import abc
import asyncio
import contextvars
import functools
import inspect
import logging
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from producer_sdk.arguments import MAX_CONCURRENCY, check_count
from producer_sdk.connection import Connection
from producer_sdk.listener_threads import DEFAULT_LISTENER_THREADS, ListenerThreads
from producer_sdk.producer import (
    Producer,
    _encode_body,
    _encode_keys,
    _encode_properties,
    _encode_tags,
    _fail_all,
    _request_for_all,
    _schedule_options,
)
from producer_sdk.tx_batches import BatchTransactionListener, TransactionBatches
from protocol import (
    BadRequestError,
    BrokerUnavailableError,
    HalfMQError,
    LocalTransactionState,
    Message,
    MessageTooLargeError,
    Op,
    Ops,
    RequestTimeoutError,
    SendResult,
    error_from_code,
    validate_name,
    validate_send_topic,
)
from protocol.message import UnfrozenMessage

__all__ = ["TransactionListener", "BatchTransactionListener", "TransactionProducer", "LocalTransactionState"]

log = logging.getLogger("halfmq.producer")


class TransactionListener(abc.ABC):
    """Runs and checks local transactions for a ``TransactionProducer``.

    Both methods may be ``async def`` or plain ``def`` (plain ones run in a worker thread).
    """

    @abc.abstractmethod
    def execute_local_transaction(
        self, message: Message, arg: Any
    ) -> LocalTransactionState | Awaitable[LocalTransactionState]:
        """Run the local transaction for the stored half ``message``; return its outcome.

        ``arg`` is what the caller passed to ``send_in_transaction``. Raising means UNKNOWN.
        """

    @abc.abstractmethod
    def check_local_transaction(
        self, message: Message
    ) -> LocalTransactionState | Awaitable[LocalTransactionState]:
        """Tell the broker the outcome of the transaction of half ``message`` (check-back)."""


def _hand_out_outcomes(reply: Any, exc: BaseException | None, futs: list[asyncio.Future[Any]]) -> None:
    """Give each reporter of a batched END_TX its row of the reply (or the request's error)."""
    if exc is None:
        rows = reply.get("r") if isinstance(reply, dict) else None
        if isinstance(rows, list) and len(rows) == len(futs):
            for f, row in zip(futs, rows, strict=True):
                if not f.done():
                    f.set_result(row)
            return
        exc = HalfMQError(f"malformed END_TX reply from broker: {reply!r}")
    _fail_all(futs, exc)


def _is_async(fn: Callable[..., Any]) -> bool:
    while isinstance(fn, functools.partial):
        fn = fn.func
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - callable objects with async __call__
    )


#: ``_is_async`` of listener methods, by the function behind the bound method (so one
#: entry per listener class, not per call); cleared if it ever grows past 256 entries.
_ASYNC_CACHE: dict[Any, bool] = {}


def _is_async_cached(fn: Callable[..., Any]) -> bool:
    key = getattr(fn, "__func__", fn)
    try:
        return _ASYNC_CACHE[key]
    except (KeyError, TypeError):  # TypeError: an unhashable callable
        pass
    result = _is_async(fn)
    try:
        if len(_ASYNC_CACHE) >= 256:
            _ASYNC_CACHE.clear()
        _ASYNC_CACHE[key] = result
    except TypeError:
        pass
    return result


def _half_message(topic: str, data: bytes, tags: str | None, keys: list[str],
                  props: dict[str, str], born: int, half: SendResult) -> Message:
    """The ``Message`` handed to ``execute_local_transaction``: filled through plain slot
    stores, then given the class ``Message`` (see ``protocol.message.UnfrozenMessage``)."""
    m = UnfrozenMessage()
    m.msg_id = half.msg_id
    m.topic = topic
    m.body = data
    m.tags = tags
    m.keys = tuple(keys) if keys else ()
    m.properties = props
    m.born_timestamp = born
    m.store_timestamp = 0
    m.queue_id = half.queue_id
    m.queue_offset = half.queue_offset
    m.reconsume_times = 0
    m.message_group = None
    m.deliver_at = None
    m.__class__ = Message  # type: ignore[assignment]
    return m  # type: ignore[return-value]


#: Sets the ``state`` of the half message's own ``SendResult`` (made by the reply's
#: hand-out for this one caller, seen by nobody else yet) through its slot, in place of a
#: second ``SendResult`` (a fifth of the time).
_set_state = SendResult.__dict__["state"].__set__


def _as_state(value: Any, where: str) -> LocalTransactionState:
    if isinstance(value, LocalTransactionState):
        return value
    if isinstance(value, str):
        try:
            return LocalTransactionState(value.upper())
        except ValueError:
            pass
    log.warning("%s returned %r, not a LocalTransactionState; treating it as UNKNOWN", where, value)
    return LocalTransactionState.UNKNOWN


#: Looked up once: an attribute of an Enum class or member is a slow lookup in Python 3.11
#: (see ``protocol.Ops``), and this is per transaction.
_UNKNOWN, _COMMIT = LocalTransactionState.UNKNOWN, LocalTransactionState.COMMIT

#: execute_workers=0: at most this many plain ``def`` local transactions run on the loop in
#: one loop iteration; the rest wait for the next. Each iteration's outcomes are written at
#: its end, so the broker records them while the producer runs the next group. With a
#: window of 256 half replies arriving at once, all 256 (31 us each with an SQLite write)
#: used to run in one iteration before any outcome went out. sdk_bench tx --sqlite
#: --workers 0, 60,000 transactions against a --flush async broker with a PushConsumer:
#: 4.57-4.98 s, with 32: 3.17-4.07 s (4 alternating pairs). The harness's tx-users-inline,
#: 3 alternating pairs: --flush sync 13,230-15,074 -> 14,303-18,112 tx/s, --flush async
#: 13,430-14,925 -> 20,630-22,171. 16 was worse, 64 no better than 32 (5 runs each).
_INLINE_PER_ITERATION = 32


class TransactionProducer(Producer):
    """A ``Producer`` that also sends transactional (half) messages for ``group``.

    Options (keyword-only): ``group`` (required, the producer group check-backs are
    addressed to), ``listener`` (a ``TransactionListener``), ``send_timeout`` (default 3 s,
    also bounds the outcome report and how long ``close()`` waits for listener threads),
    ``client_id``, ``check_workers`` (default 4: check-backs answered at once; also the
    threads that run plain ``def`` check methods), ``execute_workers`` (default: the CPUs +
    4, at most 32, as asyncio's default executor: the threads that run a plain ``def``
    ``execute_local_transaction``, started as needed; 0: called on the event loop, for a
    local transaction of microseconds, such as an SQLite write, that must never block for
    long), ``user``, ``password`` and ``tls`` (as for ``Producer``). ``check_workers``
    and ``execute_workers`` are at most ``MAX_CONCURRENCY`` (1024).

    A ``listener`` with an ``execute_local_transaction_batch`` method (a
    ``BatchTransactionListener``) gets the local transactions in batches, one batch at a
    time: a plain ``def`` one in one of the ``execute_workers`` threads (on the loop with
    0), an ``async def`` one awaited (see ``producer_sdk.tx_batches``).
    """

    def __init__(
        self,
        address: str,
        *,
        group: str,
        listener: TransactionListener | BatchTransactionListener,
        send_timeout: float = 3.0,
        retries: int = 2,
        client_id: str | None = None,
        check_workers: int = 4,
        execute_workers: int | None = None,
        user: str | None = None,
        password: str | None = None,
        tls: bool | ssl.SSLContext | None = None,
    ) -> None:
        validate_name(group, "producer group")
        if listener is None:
            raise TypeError("a TransactionProducer needs a listener")
        check_workers = check_count(check_workers, "check_workers", 1, MAX_CONCURRENCY)
        if execute_workers is None:
            execute_workers = DEFAULT_LISTENER_THREADS
        else:  # (0: on the event loop)
            execute_workers = check_count(execute_workers, "execute_workers", 0, MAX_CONCURRENCY)
        self.listener = listener
        batch_fn = getattr(listener, "execute_local_transaction_batch", None)
        self._batch_fn: Callable[..., Any] | None = batch_fn if callable(batch_fn) else None
        self._batches: TransactionBatches | None = None
        self.check_workers = check_workers
        self.execute_workers = execute_workers
        self._check_slots: asyncio.Semaphore | None = None
        self._check_pool: ListenerThreads | None = None
        self._execute_pool: ListenerThreads | None = None
        self._outcomes: list[tuple[str, str, asyncio.Future[Any]]] = []  # END_TX micro-batch
        self._outcomes_scheduled = False
        self._inline_ran = 0  # listeners run on the loop in this loop iteration (execute_workers=0)
        # (context, listener, message, arg, future) of those that wait for a later iteration
        self._inline_queue: deque[tuple[contextvars.Context, Callable[..., Any], Message, Any,
                                        asyncio.Future[Any]]] = deque()
        super().__init__(address, group=group, send_timeout=send_timeout, retries=retries,
                         client_id=client_id, user=user, password=password, tls=tls)

    def _make_connection(self, client_id: str | None, **extra: Any) -> Connection:
        # check-backs arrive as requests on the producer's own connection
        return super()._make_connection(client_id, on_request=self._on_broker_request, **extra)

    async def start(self) -> None:
        """Connect and announce the producer group (check-backs may arrive from now on)."""
        if self._check_slots is None:
            self._check_slots = asyncio.Semaphore(self.check_workers)
        await super().start()

    async def close(self) -> None:
        """Close the connection and the listener threads: local transactions already
        handed to a thread still run (their outcome is left to check-back if it can no
        longer be reported), check-backs not started yet are dropped, local transactions
        waiting for a batch are not run (``BrokerUnavailableError``); waits up to
        ``send_timeout`` for the threads to end."""
        if self._batches is not None:
            self._batches.close()
        await super().close()
        pools = [p for p in (self._execute_pool, self._check_pool) if p is not None]
        self._execute_pool = self._check_pool = None
        for pool in pools:
            pool.close()
        for pool in pools:
            if not await pool.wait_closed(self.send_timeout):
                log.warning("a listener call still runs %.1f s after close(); its thread is left to "
                            "end on its own", self.send_timeout)

    async def __aenter__(self) -> TransactionProducer:
        await self.start()
        return self

    async def send_in_transaction(
        self,
        topic: str,
        body: bytes | str,
        *,
        arg: Any = None,
        tags: str | None = None,
        keys: str | Iterable[str] | None = None,
        properties: Mapping[str, str] | None = None,
        delay: float | None = None,
    ) -> SendResult:
        """Send a half message, run the local transaction, report its outcome.

        ``delay`` (seconds): once committed, the message is delivered that long after the
        commit (not after the send), never earlier; 1 ms to the broker's ``--max-delay``.

        Returns a ``SendResult`` whose ``state`` is the ``LocalTransactionState`` reported
        (or, for UNKNOWN, left to check-back); ``queue_offset`` is -1 (a half message).
        Raises whatever storing the half message raises (the listener is then not called),
        whatever ``execute_local_transaction`` raises (outcome left to check-back), and
        ``TransactionStateError`` if the broker already recorded a conflicting outcome.
        """
        if topic not in self._topics_ok:  # (as in send: a topic is checked once)
            validate_send_topic(topic)
            if len(self._topics_ok) < 10_000:
                self._topics_ok.add(topic)
        data = body if type(body) is bytes else _encode_body(body)
        if len(data) > self._conn.max_message_size:
            raise MessageTooLargeError(
                f"message body of {len(data)} bytes exceeds the broker's limit of "
                f"{self._conn.max_message_size} bytes"
            )
        if tags is not None and type(tags) is not str:
            _encode_tags(tags)  # raises TypeError
        key_list = _encode_keys(keys) if keys is not None else []
        props = _encode_properties(properties) if properties is not None else {}
        born = int(time.time() * 1000)
        item: list[Any] = [data, tags, key_list, props, born]
        if delay is not None:
            item.append(_schedule_options(delay, None))
        half = None
        if self._conn.ready_to_send:
            try:  # joins this loop iteration's half-message SEND frame for the topic
                half = await self._enqueue(topic, item, True)
            except HalfMQError as exc:
                if not exc.retriable or self.retries <= 0 or self._conn.closed:
                    raise
        if half is None:
            reply = await self._send_request({"topic": topic, "msgs": [item], "half": True})
            half = self._results(topic, reply, 1)[0]
        message = _half_message(topic, data, tags, key_list, props, born, half)
        if self._batch_fn is not None:  # joins the next batch (a failure is logged there)
            batches = self._batches or self._make_batches(self._batch_fn)
            state = await batches.submit(message, arg)
            return await self._report(half, state)
        fn = self.listener.execute_local_transaction  # type: ignore[union-attr]
        try:
            if _is_async_cached(fn):
                value = await fn(message, arg)  # type: ignore[misc]
            else:
                if not self.execute_workers:  # on the loop (execute_workers=0)
                    if self._inline_ran < _INLINE_PER_ITERATION:
                        if not self._inline_ran:  # the first of this iteration: reset at the next
                            self._conn._loop.call_soon(self._inline_reset)
                        self._inline_ran += 1
                        value = fn(message, arg)
                    else:  # this iteration's share has run: called in a later one, in order
                        later: asyncio.Future[Any] = self._conn._loop.create_future()
                        self._inline_queue.append((contextvars.copy_context(), fn, message, arg, later))
                        value = await later
                else:
                    pool = self._execute_pool
                    if pool is None:
                        pool = self._execute_pool = ListenerThreads(
                            asyncio.get_running_loop(), self.execute_workers, "halfmq-tx")
                    value = await pool.run(fn, message, arg)
                if type(value) is not LocalTransactionState and inspect.isawaitable(value):
                    value = await value
        except Exception:
            log.warning("execute_local_transaction raised for msg_id %s; outcome UNKNOWN, "
                        "check-back will decide", half.msg_id)
            raise
        state = value if type(value) is LocalTransactionState else _as_state(value, "execute_local_transaction")
        return await self._report(half, state)

    async def _report(self, half: SendResult, state: LocalTransactionState) -> SendResult:
        """Steps 3 and 4: report COMMIT or ROLLBACK (END_TX), nothing for UNKNOWN; return
        ``half`` with its ``state`` set."""
        if state is not _UNKNOWN:
            outcome = "COMMIT" if state is _COMMIT else "ROLLBACK"  # (state.value: a descriptor call)
            try:
                # joins this iteration's END_TX (awaited here, not in a coroutine of its own:
                # one fewer per transaction); its own request if it cannot, or failed retriably
                fut = self._queue_outcome(half.msg_id, outcome)
                if fut is not None:
                    try:
                        row = await fut
                    except HalfMQError as exc:
                        if not exc.retriable or self.retries <= 0 or self._conn.closed:
                            raise
                    else:
                        if type(row) is list:  # [code, message]: this transaction's error
                            raise error_from_code(int(row[0]), str(row[1]))
                        _set_state(half, state)
                        return half
                await self._send_request({"msg_id": half.msg_id, "outcome": outcome}, op=Op.END_TX)
            except (BrokerUnavailableError, RequestTimeoutError) as exc:
                log.warning("could not report %s for msg_id %s (%s); check-back will resolve it",
                            outcome, half.msg_id, exc)
            except HalfMQError as exc:  # the producer was closed while the local transaction ran
                if type(exc) is not HalfMQError or not self._conn.closed:
                    raise
                log.warning("could not report %s for msg_id %s (the producer is closed); check-back "
                            "will resolve it", outcome, half.msg_id)
        _set_state(half, state)
        return half

    def _make_batches(self, fn: Callable[..., Any]) -> TransactionBatches:
        """The batch runner of a ``BatchTransactionListener`` (made at the first transaction):
        an ``async def`` batch is awaited, a plain ``def`` one runs in a listener thread, or
        on the loop with ``execute_workers=0``."""
        in_thread = not _is_async(fn) and self.execute_workers > 0

        def run(pairs: list[tuple[Message, Any]]) -> Any:
            if not in_thread:
                return fn(pairs)
            pool = self._execute_pool
            if pool is None:
                pool = self._execute_pool = ListenerThreads(self._conn._loop, self.execute_workers, "halfmq-tx")
            return pool.run(fn, pairs)

        self._batches = TransactionBatches(self._conn._loop, run, _as_state)
        return self._batches

    def _inline_reset(self) -> None:
        """A new loop iteration: its share of on-the-loop local transactions may run, the
        queued ones first (each in its caller's context; its result or exception goes to
        the waiting caller, which resumes once, in the next iteration)."""
        queue = self._inline_queue
        ran = 0
        while queue and ran < _INLINE_PER_ITERATION:
            ctx, fn, message, arg, later = queue.popleft()
            if later.done():  # (its caller was cancelled)
                continue
            ran += 1
            try:
                later.set_result(ctx.run(fn, message, arg))
            except Exception as exc:
                later.set_exception(exc)
        self._inline_ran = ran
        if ran:  # this iteration's count: reset at the next
            self._conn._loop.call_soon(self._inline_reset)

    def _queue_outcome(self, msg_id: str, outcome: str) -> asyncio.Future[Any] | None:
        """Queue END_TX for one transaction; the future gets its row of the reply (None, or
        ``[code, message]`` for its error). Outcomes reported in the same loop iteration
        share one request (``{"items": [...]}``). None if the connection cannot send now
        (the caller then sends its own request, retried as any other)."""
        conn = self._conn
        if not conn.ready_to_send:
            return None
        fut: asyncio.Future[Any] = conn._loop.create_future()
        self._outcomes.append((msg_id, outcome, fut))
        if len(self._outcomes) >= 64:
            self._flush_outcomes()
        elif not self._outcomes_scheduled:
            self._outcomes_scheduled = True
            conn.call_before_write(self._flush_outcomes)
        return fut

    def _flush_outcomes(self) -> None:
        self._outcomes_scheduled = False
        batch, self._outcomes = self._outcomes, []
        if not batch:
            return
        conn = self._conn
        loop = conn._loop
        assert loop is not None
        futs = [f for _, _, f in batch]
        _request_for_all(conn, Ops.END_TX, {"items": [[m, o] for m, o, _ in batch]},
                         loop.time() + self.send_timeout, futs, functools.partial(_hand_out_outcomes, futs=futs))

    # -- check-back ----------------------------------------------------------------------

    async def _on_broker_request(self, op: int, payload: Any) -> Any:
        if op != Ops.CHECK:
            raise BadRequestError(f"a producer does not serve op {op}")
        try:
            message = Message.from_wire(payload["m"])
        except (KeyError, TypeError, ValueError) as exc:
            raise BadRequestError(f"malformed CHECK payload: {exc}") from None
        assert self._check_slots is not None
        async with self._check_slots:
            fn = self.listener.check_local_transaction
            try:
                if _is_async_cached(fn):
                    value = await fn(message)  # type: ignore[misc]
                else:
                    pool = self._check_pool
                    if pool is None:
                        pool = self._check_pool = ListenerThreads(
                            asyncio.get_running_loop(), self.check_workers, "halfmq-check")
                    value = await pool.run(fn, message)
                    if inspect.isawaitable(value):
                        value = await value
                state = _as_state(value, "check_local_transaction")
            except Exception:
                log.warning("check_local_transaction raised for msg_id %s; answering UNKNOWN",
                            message.msg_id, exc_info=True)
                state = LocalTransactionState.UNKNOWN
        return {"state": state.value}
