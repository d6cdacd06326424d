"""One webhook inside the broker: an engine session of its own that POSTs each delivery.

How this works
--------------
A ``WebhookEndpoint`` is a :class:`broker.engines.base.Session` with no socket behind it.
It subscribes the webhook's consumer group (``webhook:<name>``) to the topic with a
prefetch of twice the webhook's concurrency (``PREFETCH_FACTOR``: a worker that finishes
finds its next delivery waiting), with the leases, retry ladder (``--retry-delays``), DLQ
and admin views of any group. ``deliver`` queues the deliveries; ``concurrency`` worker
tasks (made once, not per message) take them and POST each with an aiohttp client
session of the endpoint's own (its own connection pool, so a slow endpoint ties up only
its own connections). A 2xx acks; any other status, a timeout or a connection error fails
the delivery, which the engine retries after the next delay or, on the last allowed
attempt, moves to ``%DLQ%webhook:<name>``. Redirects are not followed (a 3xx is a
failure). Results are acked together — once ``concurrency`` are waiting or ``ACK_DELAY``
(5 ms) after the first — because every ``engine.ack`` is one durable append, an fsync
with ``--flush sync`` (measured at concurrency 8, ``--flush sync``: a drain reached 30 % of
the same run's raw HTTP rate with each result acked on its own, 66 % batched).

The circuit breaker (:mod:`.breaker`) gates the endpoint: while it is open the session has
no output room (``output_room`` is 0), so the engine leases nothing to it — messages wait
in the log and no attempt is spent on them — and workers holding a delivery wait too.
When the cool-down ends the endpoint tells the engine it may deliver again
(``session_writable``) and lets exactly one request through, the probe.

Logs say what changes: an endpoint starts failing (at most one line a minute), delivers
again, its breaker opens or closes. Dead letters are summed up by the owner every few
seconds (``take_dead_letters``). Nothing is logged per successful delivery.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from broker.engines.base import Engine
from broker.frontends.native.connection import SubscribeRequest
from broker.webhooks.breaker import Admission, BreakerState, CircuitBreaker
from broker.webhooks.deliveries import ERROR_CHARS, DeliveryLog
from broker.webhooks.spec import WebhookSpec
from protocol.errors import BrokerUnavailableError, HalfMQError
from protocol.webhooks import (
    HEADER_ATTEMPT,
    HEADER_ID,
    HEADER_KEYS,
    HEADER_SIGNATURE,
    HEADER_TAGS,
    HEADER_TIMESTAMP,
    HEADER_TOPIC,
    HEADER_WEBHOOK,
    encode_list,
    signature_header,
)

__all__ = ["ACK_DELAY", "PREFETCH_FACTOR", "STOP_GRACE", "WebhookEndpoint"]

log = logging.getLogger("halfmq.webhooks")

#: Response bytes read (then discarded) to keep the connection; a longer one closes it.
RESPONSE_READ_LIMIT = 64 * 1024
#: A "failing" line at most this often per webhook (seconds).
FAILING_LOG_INTERVAL = 60.0
#: A "probe failed, still open" line at most this often per webhook (seconds).
PROBE_LOG_INTERVAL = 300.0
USER_AGENT = "halfmq-webhook/1"
#: Deliveries leased per request slot: one under way, one waiting, so a worker that
#: finishes finds its next delivery without waiting for the engine's next dispatch.
PREFETCH_FACTOR = 2
#: Results of deliveries wait at most this long (seconds) to be acked with others: every
#: ``engine.ack`` is one durable append (one fsync with ``--flush sync``), and requests end
#: one by one. A crash may forget these acks: their messages are delivered again.
ACK_DELAY = 0.005
#: At a stop, requests under way get at most this long (seconds) to finish; a request cut
#: short is not acked, so its message is delivered again (at least once).
STOP_GRACE = 3.0
_UNLIMITED_ROOM = 1 << 30


def _content_type(props: dict[str, str]) -> str:
    value = props.get("content-type") or props.get("Content-Type")
    if value and len(value) <= 200 and all(" " <= c <= "~" for c in value):
        return value
    return "application/octet-stream"


async def _read_response(resp: aiohttp.ClientResponse) -> str:
    """Read the response body (at most ``RESPONSE_READ_LIMIT`` bytes, then the connection
    is closed); return its first characters."""
    head = b""
    n = 0
    while True:
        chunk = await resp.content.read(RESPONSE_READ_LIMIT)
        if not chunk:
            break
        if len(head) < ERROR_CHARS:
            head += chunk[: ERROR_CHARS - len(head)]
        n += len(chunk)
        if n > RESPONSE_READ_LIMIT:
            resp.close()
            break
    return head.decode("utf-8", "replace").strip()


class WebhookEndpoint:
    """One webhook's session, workers, breaker and delivery record (see the module docstring).

    ``lease_timeout``: the engine's lease of a delivery (``--ack-timeout``); a delivery
    that waited longer than that in the queue (breaker open) is dropped without a request,
    the engine has given it out again. ``deliveries``: the webhook's delivery record (a new
    one by default). ``clock``: seconds since the epoch.
    """

    def __init__(self, engine: Engine, spec: WebhookSpec, *, lease_timeout: float,
                 deliveries: DeliveryLog | None = None, clock: Callable[[], float] = time.time) -> None:
        self.engine = engine
        self.spec = spec
        self.lease_timeout = lease_timeout
        self._stale_after = max(lease_timeout - spec.timeout, lease_timeout / 2)
        self.clock = clock
        self.conn_id = spec.group
        self.client_id: str | None = spec.group
        self.role: str | None = "consumer"
        self.group: str | None = None  # (the producer group of a handshake: none)
        self.peer = urlsplit(spec.url).netloc
        self.closed = False
        self.stopping = False
        self.subscribed = False
        self.breaker = CircuitBreaker(failures_to_open=spec.breaker_failures, cooldown=spec.breaker_cooldown)
        self.deliveries = deliveries if deliveries is not None else DeliveryLog()
        self.stats = {"attempts": 0, "delivered": 0, "failed": 0, "dead_lettered": 0}
        self.last_error: str | None = None
        self.last_error_at: int | None = None
        self._failures_in_row = 0
        self._failing_logged = False
        self._failing_logged_at = -FAILING_LOG_INTERVAL
        self._probe_logged_at = -PROBE_LOG_INTERVAL
        self._dead_since_report = 0
        self._last_dead: tuple[str, str | None] | None = None
        self._queue: deque[tuple[int, list[Any], float]] = deque()
        self._idle: deque[asyncio.Future[None]] = deque()  # workers waiting for work
        self._busy = 0
        self._acks: list[tuple[int, bool]] = []
        self._ack_timer: asyncio.TimerHandle | None = None
        self._workers: list[asyncio.Task[None]] = []
        self._http: aiohttp.ClientSession | None = None
        self._rid = 0
        self._replies: dict[int, asyncio.Future[Any]] = {}
        self._cooldown: asyncio.TimerHandle | None = None

    # -- the Session side (called by the engine) -----------------------------------------

    @property
    def writable(self) -> bool:
        """False while nothing more should be delivered (breaker open, stopping)."""
        return self.output_room() > 0

    def output_room(self) -> int:
        """Room for deliveries: none while stopping or while the breaker is open; room for
        one (the probe) when it is half-open; otherwise the prefetch is the only limit."""
        if self.stopping or self.closed:
            return 0
        state = self.breaker.state
        if state is BreakerState.CLOSED:
            return _UNLIMITED_ROOM
        if state is BreakerState.HALF_OPEN and not self.breaker.probe_out and not self._queue:
            return 1
        return 0

    def reply(self, rid: int, payload: Any) -> None:
        """The engine's answer to one of the endpoint's requests (subscribe, ack barrier)."""
        fut = self._replies.pop(rid, None)
        if fut is not None and not fut.done():
            fut.set_result(payload)

    def error(self, rid: int, exc: HalfMQError) -> None:
        """The engine refused one of the endpoint's requests."""
        fut = self._replies.pop(rid, None)
        if fut is not None and not fut.done():
            fut.set_exception(exc)
        elif rid == 0:
            log.warning("webhook %s: the engine reported: %s", self.spec.name, exc)

    def deliver(self, items: list[list[Any]]) -> None:
        """Deliveries ``[[token, wire message], ...]``: queued for the workers."""
        if self.closed:
            return
        now = time.monotonic()
        self._queue.extend((token, wire, now) for token, wire in items)
        self._wake(len(items))

    def request(self, op: int, payload: Any) -> asyncio.Future[Any]:
        """Broker-initiated requests (check-backs) go to producers, never to a webhook."""
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        fut.set_exception(BrokerUnavailableError("a webhook takes no broker requests"))
        return fut

    def flush(self) -> None:
        """Nothing to write: deliveries are taken from the queue by the workers."""

    # -- lifecycle -------------------------------------------------------------------------

    def _ask(self) -> tuple[int, asyncio.Future[Any]]:
        self._rid += 1
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._replies[self._rid] = fut
        return self._rid, fut

    async def start(self) -> None:
        """Subscribe the webhook's group and start the workers. Raises what the engine
        refuses the subscription with (``LimitExceededError``, ``TopicNotFoundError``...)."""
        spec = self.spec
        self._http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=spec.concurrency),
            timeout=aiohttp.ClientTimeout(total=spec.timeout),
            headers={"User-Agent": USER_AGENT},
        )
        self.engine.session_opened(self)
        rid, fut = self._ask()
        try:
            self.engine.subscribe(self, rid, SubscribeRequest(
                group=spec.group, topic=spec.topic, tags=spec.tags, start=spec.start,
                prefetch=spec.concurrency * PREFETCH_FACTOR, max_reconsume_times=spec.max_attempts - 1,
                fifo=spec.fifo))
            await asyncio.wait_for(fut, 10.0)
        except BaseException:
            self._replies.pop(rid, None)
            self.closed = True
            self.engine.session_closed(self)
            await self._http.close()
            raise
        self.subscribed = True
        loop = asyncio.get_running_loop()
        self._workers = [loop.create_task(self._work(), name=f"halfmq-webhook-{spec.name}-{i}")
                         for i in range(spec.concurrency)]

    async def stop(self) -> None:
        """Stop: nothing new is delivered; requests under way finish (within the timeout,
        at most ``STOP_GRACE``); every result is acked durably; then the session closes.
        Deliveries not started are given out again by the engine (after a restart: from the
        group's progress; otherwise when their lease expires)."""
        if self.closed or self.stopping:
            return
        self.stopping = True
        if self._cooldown is not None:
            self._cooldown.cancel()
        self._wake()
        try:
            self.engine.unsubscribe(self, 0)
        except HalfMQError:
            pass
        if self._workers:
            _done, pending = await asyncio.wait(self._workers, timeout=min(self.spec.timeout, STOP_GRACE))
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        rid, fut = self._ask()
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None
        acks, self._acks = self._acks, []
        try:
            self.engine.ack(self, rid, acks)  # the reply says they are durable
            await asyncio.wait_for(fut, 10.0)
        except (HalfMQError, TimeoutError) as exc:
            log.warning("webhook %s: the last results could not be stored: %s", self.spec.name, exc)
        self._replies.pop(rid, None)
        self.closed = True
        self.engine.session_closed(self)
        if self._http is not None:
            await self._http.close()

    # -- workers ---------------------------------------------------------------------------

    def _wake(self, n: int | None = None) -> None:
        """Wake ``n`` waiting workers (new deliveries), or all of them (the breaker
        changed, stopping)."""
        idle = self._idle
        while idle and (n is None or n > 0):
            fut = idle.popleft()
            if not fut.done():
                fut.set_result(None)
                if n is not None:
                    n -= 1

    async def _next(self) -> tuple[int, list[Any], Admission] | None:
        """The next delivery the breaker lets go, or None when stopping."""
        while True:
            if self.stopping:
                return None
            while self._queue:
                if time.monotonic() - self._queue[0][2] < self._stale_after:
                    break
                self._queue.popleft()  # its lease is over: the engine gave it out again
            if self._queue:
                admission = self.breaker.admit(self.clock())
                if admission is not Admission.REFUSED:
                    token, wire, _at = self._queue.popleft()
                    return token, wire, admission
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._idle.append(fut)
            await fut

    async def _work(self) -> None:
        while True:
            got = await self._next()
            if got is None:
                return
            self._busy += 1
            try:
                await self._attempt(*got)
            except Exception:  # a bug must not cost the webhook a worker (the lease expires)
                log.exception("webhook %s: delivery of %s failed", self.spec.name, got[1][0])
            finally:
                self._busy -= 1

    async def _attempt(self, token: int, wire: list[Any], admission: Admission) -> None:
        """POST one delivery and act on the result (ack, record, breaker, logs)."""
        spec = self.spec
        msg_id, topic, body, tags, keys, props = wire[0], wire[1], wire[2], wire[3], wire[4], wire[5]
        reconsume = wire[10]
        now_ms = int(self.clock() * 1000)
        rec = self.deliveries.attempt_started(msg_id, reconsume, now_ms)
        headers = {
            HEADER_ID: msg_id,
            HEADER_TIMESTAMP: str(now_ms),
            HEADER_SIGNATURE: signature_header(spec.signing_secrets(now_ms), msg_id, now_ms, body),
            HEADER_TOPIC: topic,
            HEADER_WEBHOOK: spec.name,
            HEADER_ATTEMPT: str(rec.attempts),
            "Content-Type": _content_type(props),
        }
        if tags:
            headers[HEADER_TAGS] = encode_list([tags])
        if keys:
            headers[HEADER_KEYS] = encode_list(keys)
        status: int | None = None
        error: str | None = None
        assert self._http is not None
        self.stats["attempts"] += 1
        try:
            async with self._http.post(spec.url, data=body, headers=headers, allow_redirects=False) as resp:
                status = resp.status
                text = await _read_response(resp)
            if not 200 <= status < 300:
                error = f"HTTP {status}: {text}" if text else f"HTTP {status}"
        except TimeoutError:
            error = f"no response within {spec.timeout:g}s"
        except aiohttp.ClientConnectorError as exc:
            error = f"cannot connect: {exc.os_error or exc}"
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        ok = error is None
        now = self.clock()
        last_allowed = reconsume >= spec.max_attempts - 1
        self.deliveries.attempt_finished(rec, ok=ok, status=status, error=error, last_allowed=last_allowed,
                                         now_ms=int(now * 1000))
        self._ack(token, ok)
        self._note_result(msg_id, error, last_allowed, now)
        changed = self.breaker.record(ok, admission, now)
        if changed is BreakerState.OPEN:
            self._breaker_opened(now)
        elif changed is BreakerState.CLOSED:
            log.info("webhook %s: circuit breaker closed, delivering to %s again", spec.name, spec.url)
            self._wake()
            self.engine.session_writable(self)

    def _ack(self, token: int, ok: bool) -> None:
        """Queue one result. Results go to the engine together: once ``concurrency`` are
        waiting, or ``ACK_DELAY`` after the first (each call is one durable append)."""
        self._acks.append((token, ok))
        if len(self._acks) >= self.spec.concurrency:
            self._send_acks()
        elif self._ack_timer is None:
            self._ack_timer = asyncio.get_running_loop().call_later(ACK_DELAY, self._send_acks)

    def _send_acks(self) -> None:
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None
        acks, self._acks = self._acks, []
        if not acks or self.closed:
            return
        try:
            self.engine.ack(self, 0, acks)
        except HalfMQError as exc:  # the subscription is gone: the leases expire by themselves
            log.warning("webhook %s: %d results not stored: %s", self.spec.name, len(acks), exc)

    # -- what the logs and the API say -------------------------------------------------------

    def _note_result(self, msg_id: str, error: str | None, last_allowed: bool, now: float) -> None:
        spec = self.spec
        if error is None:
            self.stats["delivered"] += 1
            if self._failing_logged:
                log.info("webhook %s delivers to %s again after %d failed attempts",
                         spec.name, spec.url, self._failures_in_row)
                self._failing_logged = False
            self._failures_in_row = 0
            return
        self.stats["failed"] += 1
        self.last_error, self.last_error_at = error, int(now * 1000)
        self._failures_in_row += 1
        if not self._failing_logged and now - self._failing_logged_at >= FAILING_LOG_INTERVAL:
            log.warning("webhook %s failing: POST %s: %s (retried after --retry-delays; "
                        "dead-lettered after %d attempts)", spec.name, spec.url, error, spec.max_attempts)
            self._failing_logged, self._failing_logged_at = True, now
        if last_allowed:
            self.stats["dead_lettered"] += 1
            self._dead_since_report += 1
            self._last_dead = (msg_id, error)

    def _breaker_opened(self, now: float) -> None:
        spec, b = self.spec, self.breaker
        if b.consecutive_failures == spec.breaker_failures:  # it was closed until now
            log.warning("webhook %s: circuit breaker open after %d consecutive failures (last: %s): "
                        "no requests to %s for %gs", spec.name, b.consecutive_failures, self.last_error,
                        spec.url, spec.breaker_cooldown)
            self._probe_logged_at = now
        elif now - self._probe_logged_at >= PROBE_LOG_INTERVAL:
            log.warning("webhook %s: still failing (%d failures in a row, last: %s); probing %s every %gs",
                        spec.name, b.consecutive_failures, self.last_error, spec.url, spec.breaker_cooldown)
            self._probe_logged_at = now
        self._schedule_cooldown()

    def _schedule_cooldown(self) -> None:
        retry_at = self.breaker.retry_at
        if retry_at is None or self.stopping:
            return
        delay = max(0.0, retry_at - self.clock())
        self._cooldown = asyncio.get_running_loop().call_later(delay, self._cooled)

    def _cooled(self) -> None:
        """The cool-down is over: half-open; the engine may deliver the probe."""
        self._cooldown = None
        if self.stopping:
            return
        if self.breaker.cool(self.clock()):
            self._wake()
            self.engine.session_writable(self)
        elif self.breaker.state is BreakerState.OPEN:
            self._schedule_cooldown()  # the clock was a hair early

    def take_dead_letters(self) -> tuple[int, tuple[str, str | None] | None]:
        """Messages dead-lettered since the last call, and the last of them (id, error)."""
        n, last = self._dead_since_report, self._last_dead
        self._dead_since_report, self._last_dead = 0, None
        return n, last

    def status(self) -> dict[str, Any]:
        """The endpoint's state for the admin API."""
        b = self.breaker
        return {
            "subscribed": self.subscribed and not self.closed,
            "breaker": {"state": b.state.value, "consecutive_failures": b.consecutive_failures,
                        "opened_at": int(b.opened_at * 1000) if b.opened_at is not None else None,
                        "retry_at": int(b.retry_at * 1000) if b.retry_at is not None else None,
                        "times_opened": b.times_opened},
            "in_flight": self._busy, "queued": len(self._queue), **self.stats,
            "last_error": self.last_error, "last_error_at": self.last_error_at,
            "records": len(self.deliveries.records),
        }
