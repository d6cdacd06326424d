"""``PushConsumer``: the broker pushes a topic's messages; a listener consumes them.

How this works
--------------
A consumer owns one ``Connection`` (role ``consumer``) and one subscription:
``SUBSCRIBE {group, topic, tags, start, prefetch, max_reconsume_times}``. The broker then
pushes ``DELIVER {"d": [[token, message], ...]}`` frames, never more than ``prefetch``
unacked deliveries at a time (C10). Each delivery goes into a local queue that a fixed pool
of ``concurrency`` worker tasks drains, so at most ``concurrency`` listener calls run at
once and no task is created per message. ``async def`` listeners are awaited; plain
``def`` listeners run in a thread pool of ``concurrency`` threads.

Hand-off: an idle worker waits on a future of its own; a DELIVER frame wakes *one* of them,
and a worker that takes a delivery wakes the next idle one if more are queued. A listener
that does not suspend therefore drains a whole frame in one worker with two wake-ups,
instead of waking every idle worker for each frame (as ``asyncio.Queue`` would: 64
workers woken to find the queue empty); a listener that suspends brings one more worker
in per loop iteration, up to ``concurrency``.

A listener returning ``ConsumeResult.SUCCESS`` acks the delivery (``ok = true``);
``RECONSUME_LATER``, anything else, or an exception (logged at WARNING with the msg_id)
is a failure (``ok = false``) and the broker redelivers later (C3/C4). Acks are buffered
and sent together, one ``ACK`` frame (``rid = 0``) per event-loop iteration.

Tokens belong to one TCP connection. After a reconnect the consumer re-handshakes and
re-subscribes; deliveries from the old connection that did not start are dropped, and acks
for them are not sent (the broker redelivers those after ``--ack-timeout``).

``close()`` (C9): ``UNSUBSCRIBE`` (no new deliveries), wait up to ``close_grace`` (10 s)
for the listener calls already running, send their acks as a barrier (an ``ACK`` request,
whose reply means the broker processed every ack and stored it durably), then close the
connection. A final ACK refused as retriable (``BrokerUnavailableError``: the cluster
engine could not confirm an ack during a fail-over and kept those deliveries) is sent
again, the same tokens, for up to 5 s more.
Deliveries received but not started are not acked.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import functools
import inspect
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

from producer_sdk.arguments import MAX_CONCURRENCY, MAX_PREFETCH, check_count, check_seconds
from producer_sdk.connection import Connection
from protocol import (
    ConsumeResult,
    HalfMQError,
    Message,
    Op,
    Ops,
    Role,
    validate_name,
    validate_subscribe_topic,
)

__all__ = ["PushConsumer", "Listener"]

log = logging.getLogger("halfmq.consumer")

Listener = Callable[[Message], "ConsumeResult | Awaitable[ConsumeResult]"]

#: Seconds ``close()`` waits for running listener calls (SPEC C9).
CLOSE_GRACE = 10.0
#: Seconds the first connect may take before ``start()`` gives up.
CONNECT_TIMEOUT = 5.0
#: Seconds a control request (subscribe, unsubscribe, barrier) may take.
CONTROL_TIMEOUT = 5.0
ACK_RETRY = 0.5  # seconds between tries of final acks refused as retriable
#: Largest ``max_reconsume_times``: the broker's group settings allow at most 1000 delivery
#: attempts (``max_attempts``, the first delivery and its redeliveries).
MAX_RECONSUME_TIMES = 999


def _is_async(fn: Callable[..., Any]) -> bool:
    while isinstance(fn, functools.partial):
        fn = fn.func
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - callable objects with async __call__
    )


class PushConsumer:
    """Consumes ``topic`` as a member of consumer ``group`` from the broker at ``address``
    (``"host:port"``, or several ``"gw1:7600,gw2:7600"``: cluster mode's gateways, tried in
    turn on connection loss; the consumer subscribes again on the one it reaches).

    Options (keyword-only, defaults in brackets):

    * ``listener`` — ``(message) -> ConsumeResult``, ``async def`` or plain ``def``.
    * ``tags`` — ``"*"`` for all, or ``"A || B"`` for only those tags [``"*"``].
    * ``start`` — where a *new* group starts: ``"earliest"`` or ``"latest"`` [``"earliest"``].
    * ``max_reconsume_times`` — redeliveries before the dead-letter queue, 0 to 999 [16].
    * ``concurrency`` — listener calls in flight at most, 1 to ``MAX_CONCURRENCY`` (1024): one
      worker task each (and one thread each for a plain ``def`` listener) [16].
    * ``prefetch`` — unacked deliveries the broker may push to this consumer, at least 1 and
      at most the broker's ``--max-prefetch`` (default 4096; ``LimitExceededError`` from
      ``start()`` above it) [64].
    * ``client_id`` — identifies this client to the broker [``host@pid@random``].
    * ``close_grace`` — seconds ``close()`` waits for running listener calls, finite, >= 0 [10].
    * ``fifo`` — a *new* group is created FIFO: the messages of one message group come
      one at a time, in send order (an existing group is made FIFO with the admin API) [False].
    * ``user``, ``password`` — log in [``HALFMQ_USER``/``HALFMQ_PASSWORD``, else none]; a
      refused login raises ``AuthError`` from ``start()``.
    * ``tls`` — True (the system's CAs) or an ``ssl.SSLContext`` [plain TCP].

    A count of the wrong type (not an ``int``, or a ``bool``) raises ``TypeError``, one out of
    range ``ValueError``, from the constructor.

    Use as ``async with PushConsumer(...) as c:`` or call ``start()``/``close()``.
    """

    def __init__(
        self,
        address: str,
        *,
        group: str,
        topic: str,
        listener: Listener,
        tags: str = "*",
        start: str = "earliest",
        max_reconsume_times: int = 16,
        concurrency: int = 16,
        prefetch: int = 64,
        client_id: str | None = None,
        close_grace: float = CLOSE_GRACE,
        fifo: bool = False,
        user: str | None = None,
        password: str | None = None,
        tls: bool | ssl.SSLContext | None = None,
    ) -> None:
        validate_name(group, "consumer group")
        validate_subscribe_topic(topic)
        if not callable(listener):
            raise TypeError("listener must be callable")
        if not isinstance(tags, str) or not tags.strip():
            raise ValueError("tags must be '*' or 'A || B'")
        if start not in ("earliest", "latest"):
            raise ValueError("start must be 'earliest' or 'latest'")
        max_reconsume_times = check_count(max_reconsume_times, "max_reconsume_times", 0, MAX_RECONSUME_TIMES)
        concurrency = check_count(concurrency, "concurrency", 1, MAX_CONCURRENCY)
        prefetch = check_count(prefetch, "prefetch", 1, MAX_PREFETCH)
        close_grace = check_seconds(close_grace, "close_grace")
        self.address = address
        self.group = group
        self.topic = topic
        self.listener = listener
        self.tags = tags
        self.start_position = start
        self.max_reconsume_times = max_reconsume_times
        self.concurrency = concurrency
        self.prefetch = prefetch
        self.close_grace = close_grace
        self._subscription = {
            "group": group,
            "topic": topic,
            "tags": tags,
            "start": start,
            "prefetch": prefetch,
            "max_reconsume_times": max_reconsume_times,
        }
        if fifo:
            self._subscription["fifo"] = True
        self._conn = Connection(
            address,
            role=Role.CONSUMER,
            group=group,
            client_id=client_id,
            request_timeout=CONTROL_TIMEOUT,
            on_push=self._on_push,
            on_reconnect=self._on_reconnect,
            user=user,
            password=password,
            tls=tls,
        )
        self._is_async = _is_async(listener)
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        # deliveries not started yet: (connection generation, token, message)
        self._ready: collections.deque[tuple[int, Any, Message]] = collections.deque()
        self._idle: list[asyncio.Future[bool]] = []  # one per idle worker: True wakes it to work
        self._waking = 0  # workers woken to work that have not looked at _ready yet
        self._workers: list[asyncio.Task[None]] = []
        self._acks: list[tuple[Any, bool]] = []
        self._acks_gen = 0
        self._ack_scheduled = False
        self._started = False
        self._stopping = False  # no new listener calls
        self._closed = False

    @property
    def client_id(self) -> str:
        """The id this consumer announces in its handshake."""
        return self._conn.client_id

    async def start(self) -> None:
        """Connect, subscribe and start consuming.

        Raises ``BrokerUnavailableError`` if the broker cannot be reached within 5 s, or the
        broker's error for the subscription.
        """
        if self._started:
            return
        if self._closed:
            raise HalfMQError("consumer is closed")
        if not self._is_async:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                self.concurrency, thread_name_prefix="halfmq-consume"
            )
        try:
            await self._conn.open(timeout=CONNECT_TIMEOUT)
            self._workers = [
                asyncio.create_task(self._work(), name=f"halfmq-consumer-{i}")
                for i in range(self.concurrency)
            ]
            await self._conn.request(Op.SUBSCRIBE, self._subscription)
        except BaseException:
            await self._shutdown(grace=0)
            raise
        self._started = True

    async def close(self) -> None:
        """Stop fetching, let running listener calls finish (up to ``close_grace``), ack
        them, then close the connection. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._stopping = True
        if self._conn.connected:
            try:
                await self._conn.request(Op.UNSUBSCRIBE, {}, timeout=CONTROL_TIMEOUT)
            except HalfMQError as exc:
                log.warning("unsubscribe failed while closing: %s", exc)
        await self._shutdown(grace=self.close_grace)

    async def __aenter__(self) -> PushConsumer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- internals -----------------------------------------------------------------------

    async def _shutdown(self, grace: float) -> None:
        self._stopping = True
        self._closed = True
        try:
            await self._stop_workers(grace)
            # report the results of the calls that finished; the reply to this request is a
            # barrier: the broker has processed every earlier ack
            acks = self._take_acks()
            if self._conn.connected:
                try:
                    if self._started:  # an ACK request's reply: every ack so far is durable
                        await self._final_acks(acks)
                    else:
                        await self._conn.request(Op.PING, {}, timeout=CONTROL_TIMEOUT)
                except HalfMQError as exc:
                    log.warning("could not confirm the final acks: %s", exc)
        finally:
            await self._conn.close()
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)

    async def _final_acks(self, acks: list[tuple[Any, bool]]) -> None:
        """Send ``acks`` as a barrier; one refused as retriable (the cluster engine could
        not confirm an ack during a fail-over: the broker kept those deliveries) is sent
        again, the same ACK, for up to ``CONTROL_TIMEOUT`` more seconds."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + CONTROL_TIMEOUT
        while True:
            try:
                await self._conn.request(Op.ACK, {"a": acks}, timeout=CONTROL_TIMEOUT)
                return
            except HalfMQError as exc:
                if not exc.retriable or not self._conn.connected or loop.time() + ACK_RETRY > give_up:
                    raise
                log.info("final acks not confirmed yet (%s); sending them again", exc)
            await asyncio.sleep(ACK_RETRY)

    async def _stop_workers(self, grace: float) -> None:
        if not self._workers:
            return
        idle = list(self._idle)
        self._idle.clear()
        for fut in idle:  # (_stopping is set: they exit)
            if not fut.done():
                fut.set_result(False)
        if grace > 0:
            _, still_running = await asyncio.wait(self._workers, timeout=grace)
            if still_running:
                log.warning("%d listener call(s) still running after the %.1fs grace; "
                            "their messages will be redelivered", len(still_running), grace)
        else:
            still_running = {t for t in self._workers if not t.done()}
        for task in still_running:
            task.cancel()
        if still_running:
            await asyncio.wait(still_running, timeout=1.0)

    def _on_push(self, op: int, payload: Any) -> None:
        if op != Ops.DELIVER:
            log.debug("ignoring push op %s", op)
            return
        if self._stopping or not self._workers:
            return  # not started: redelivered after the ack timeout
        gen = self._conn.generation
        put = self._ready.append
        try:
            deliveries = payload["d"]
        except (KeyError, TypeError):
            log.error("malformed DELIVER payload: %r", payload)
            return
        for entry in deliveries:
            try:
                token, wire = entry
                message = Message.from_wire(wire)
            except (TypeError, ValueError) as exc:
                log.error("malformed delivery %r: %s", entry, exc)
                if isinstance(entry, (list, tuple)) and entry:
                    self._ack(gen, entry[0], False)
                continue
            put((gen, token, message))
        self._wake_worker()

    def _wake_worker(self) -> None:
        """Wake one idle worker if deliveries wait and no other worker is on its way."""
        idle = self._idle
        while idle and not self._waking and self._ready:
            fut = idle.pop()
            if not fut.done():
                fut.set_result(True)
                self._waking += 1

    async def _work(self) -> None:
        ready = self._ready
        idle = self._idle
        conn = self._conn
        listener = self.listener
        is_async = self._is_async
        loop = asyncio.get_running_loop()
        success = ConsumeResult.SUCCESS
        while True:
            if self._stopping:
                return
            if not ready:
                fut: asyncio.Future[bool] = loop.create_future()
                idle.append(fut)
                try:
                    await fut
                finally:
                    if fut.done() and not fut.cancelled() and fut.result():
                        self._waking -= 1
                continue
            gen, token, message = ready.popleft()
            if ready:
                self._wake_worker()  # more to do: the next idle worker comes for it
            if gen != conn.generation:
                continue  # from a previous connection: its token is void
            try:
                if is_async:
                    result = await listener(message)  # type: ignore[misc]
                else:
                    result = await loop.run_in_executor(self._pool, listener, message)
                    if inspect.isawaitable(result):
                        result = await result
                ok = result is success or result == success.value
                if not ok and result is not ConsumeResult.RECONSUME_LATER:
                    log.warning("listener returned %r for msg_id %s; treating it as "
                                "RECONSUME_LATER", result, message.msg_id)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("listener raised for msg_id %s (reconsume_times %d); will be "
                            "redelivered", message.msg_id, message.reconsume_times,
                            exc_info=True)
                ok = False
            self._ack(gen, token, ok)

    def _ack(self, gen: int, token: Any, ok: bool) -> None:
        if gen != self._acks_gen:
            self._acks = []
            self._acks_gen = gen
        self._acks.append((token, ok))
        if not self._ack_scheduled and not self._stopping:
            self._ack_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_acks)

    def _take_acks(self) -> list[tuple[Any, bool]]:
        acks, self._acks = self._acks, []
        if acks and self._acks_gen != self._conn.generation:
            return []  # tokens of a previous connection mean nothing on this one
        return acks

    def _flush_acks(self) -> None:
        self._ack_scheduled = False
        if self._stopping:
            return  # close() sends the remaining acks with a barrier
        acks = self._take_acks()
        if acks:
            self._conn.send_nowait(Ops.ACK, {"a": acks})

    async def _on_reconnect(self) -> None:
        self._acks = []
        if self._stopping:
            return
        try:
            await self._conn.request(Op.SUBSCRIBE, self._subscription)
            log.info("re-subscribed %s/%s after reconnect", self.group, self.topic)
        except HalfMQError as exc:
            if exc.retriable and not self._stopping:
                log.warning("re-subscribe failed (%s); reconnecting again", exc)
                self._conn.abort()
            else:
                log.error("re-subscribe of %s/%s failed: %s", self.group, self.topic, exc)
