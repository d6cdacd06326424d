"""Pull consumers on the JetStream engine: RECEIVE with an invisible duration, SETTLE.

How this works
--------------
A pulling group is the same durable consumer ``G_<group>`` its push members use
(``groups.Groups.subscribe``): the engine hands each message to one fetch at a time,
whichever gateway or kind of consumer asks. Per (group, topic) this gateway keeps a
small pool of pullers (one inbox each); a RECEIVE takes one, so long polls of many
clients wait side by side:

1. a no-wait pull for up to ``max`` messages (``Puller.fetch_now``: the request ends
   before it returns, so nothing is leased to nobody);
2. if that brought nothing, a long poll for one message until ``wait_ms`` is over (sent
   again if the engine ends it early: a consumer without a leader yet), then a no-wait
   pull for the rest of the batch;
3. each message becomes a **lease** of this gateway, with its own deadline (now + the
   invisible duration) and a receipt handle ``<gateway>.<token>.<version>``.

A FIFO group is pulled from its per-queue consumers instead (``fifo``): the head of each
queue whose previous message is settled, polled every 100 ms while the RECEIVE waits.

The engine's own lease (``ack_wait`` = ``--ack-timeout``) runs underneath: one lease
task per gateway sends an in-progress ("working") every half ack wait for leases that
last longer, and at a lease's deadline a NAK, so the message comes back at once with its
delivery count raised (an expired lease is a failed attempt); the next fetch past
``max_attempts`` dead-letters it, as for push consumers. An in-progress is a request the
consumer's leader answers: one that is not answered (no leader during a fail-over) is
tried again every second until it is, or the lease ends. When the engine hands out again
a message this gateway still holds a lease on (its ack wait ran out anyway), that older
lease ends: its handle is stale, the newer delivery's is the one that settles.

**SETTLE** by handle: ``ack``, ``nack`` (a NAK with that delay), ``cid`` (new deadline,
new handle: the old one goes stale), ``renew`` (new deadline, same handle), ``dlq``. A
lease ends only once the engine has confirmed its ack, NAK or dead letter: each is a
request the consumer's leader answers, sent side by side (confirming only the last ack of
a batch would not do: a leader that changed between two acks may have lost the earlier). An action the engine did not confirm
— a consumer without a leader while it fails over answers nobody — gets an error a
client may retry (``BrokerUnavailableError``) and leaves the lease and its handle as they
were, so the same handle settles it once the engine answers again (a repeated ack is
harmless). A handle of another gateway is forwarded to it over the engine connection
(``hmqs.lease.<gateway>``, request/reply), so any connection of the group on any gateway
may settle it. A handle whose lease ended, changed, or whose gateway is gone (stopped,
crashed: nobody answers its subject) is refused as stale (``StaleReceiptError``); the
message itself comes back when the engine's ack wait runs out.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import os
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgpack  # type: ignore[import-untyped]
import nats.errors

from broker.engines.base import Session
from broker.engines.jetstream.groups import (
    ACK,
    CONFIRM_TIMEOUT,
    NAK_MIN_DELAY,
    TERM,
    ConsumerHandle,
    Delivery,
    GroupSpec,
    nak_action,
)
from broker.engines.jetstream.parts import EngineParts
from broker.engines.jetstream.pull import Puller
from protocol.errors import BadRequestError, BrokerUnavailableError, HalfMQError, StaleReceiptError

__all__ = ["JetStreamPulling"]

log = logging.getLogger("halfmq.engine")

_POOL_MAX = 8  # idle pullers kept per (group, topic)
_FORWARD_TIMEOUT = 3.5  # another gateway's answer to a forwarded settle (it waits for the engine)
_PROBE_TIMEOUT = 1.0  # whether a gateway that did not answer in time is still there
_RENEW_RETRY = 1.0  # seconds between tries of an in-progress the engine did not answer
_EARLY_END_PAUSE = 0.1  # before a long poll that ended early is sent again
_FIFO_POLL = 0.1  # seconds between polls of a FIFO group's queues while a RECEIVE waits


def _max_reconsume(conf: dict[str, Any]) -> int:
    """Failed attempts after which a group's message is dead-lettered (its settings, else 16)."""
    return int(conf["max_attempts"]) - 1 if conf.get("max_attempts") else 16


@dataclass(slots=True)
class _Lease:
    token: int
    version: int
    group: str
    delivery: Delivery
    wire: list[Any]
    deadline: float  # time.time()
    renew_at: float


class _Pool:
    __slots__ = ("spec", "idle", "first")

    def __init__(self, spec: GroupSpec) -> None:
        self.spec = spec
        self.idle: list[ConsumerHandle] = []
        self.first: ConsumerHandle | None = None


class JetStreamPulling(EngineParts):
    """The RECEIVE / SETTLE part of :class:`JetStreamEngine` (see the module docstring)."""

    if TYPE_CHECKING:  # provided by ``fifo`` and the engine
        async def _group_conf(self, group: str) -> dict[str, Any]: ...

        def route(self, topic: str) -> int: ...

    def _init_pulling(self) -> None:
        self._gateway_id = os.urandom(4).hex()
        self._pools: dict[tuple[str, str], _Pool] = {}
        self._receives: dict[tuple[str, int], asyncio.Task[Any]] = {}
        self._leases: dict[int, _Lease] = {}
        self._leased: dict[tuple[str, str, int], int] = {}  # (stream, consumer, seq) -> token
        self._lease_heap: list[tuple[float, int, int]] = []
        self._lease_wake = asyncio.Event()
        self._lease_task: asyncio.Task[Any] | None = None
        self._next_token = 1
        self._forward_sub: Any = None
        self._fifo_lanes: dict[tuple[str, str], tuple[asyncio.Lock, list[ConsumerHandle]]] = {}
        self._fifo_turn: dict[tuple[str, str], int] = {}

    # -- RECEIVE ------------------------------------------------------------------------

    def receive(self, s: Session, rid: int, *, group: str, topic: str, tags: str | None,
                max_messages: int, invisible_ms: int, wait_ms: int) -> None:
        """Lease up to ``max_messages`` messages of ``topic`` to ``group``, each for
        ``invisible_ms``; reply ``{"m": [[handle, message], ...]}`` as soon as there are
        some, or ``{"m": []}`` after ``wait_ms``."""
        key = (s.conn_id, rid)
        task = self._track(self._receive(s, rid, group, topic, tags or "*", max_messages,
                                         invisible_ms / 1000.0, wait_ms / 1000.0), "receive")
        self._receives[key] = task
        task.add_done_callback(lambda _t: self._receives.pop(key, None))

    def cancel_receive(self, s: Session, rid: int) -> None:
        """Drop the pending RECEIVE ``rid`` of ``s`` unanswered (its client gave up)."""
        task = self._receives.pop((s.conn_id, rid), None)
        if task is not None:
            task.cancel()

    def _drop_receives(self, s: Session) -> None:
        """``s`` closed: its pending RECEIVEs go (its leases stay until they expire)."""
        for key in [k for k in self._receives if k[0] == s.conn_id]:
            self._receives.pop(key).cancel()

    async def _receive(self, s: Session, rid: int, group: str, topic: str, tags: str,
                       max_messages: int, invisible: float, wait: float) -> None:
        from broker.engines.jetstream.engine import as_client_error

        try:
            conf = await self._group_conf(group)
            await self._serve_forwarded()
            max_re = _max_reconsume(conf)
            if conf.get("fifo"):
                got = await self._pull_fifo(group, topic, tags, max_messages, wait)
            else:
                got = await self._pull(group, topic, tags, max_messages, wait)
            now = time.time()
            out = []
            latest = {d.stream_seq: d for d in got}  # redelivered within this pull: the newer lease
            for d in got:
                if latest[d.stream_seq] is not d:
                    continue
                wire = await d.resolve()
                if wire is None:  # a pointer whose half is gone (retention)
                    await d.terminate()
                elif d.attempt > max_re:  # its last lease expired: dead
                    await d.dead_letter(wire)
                else:
                    out.append([self._lease(group, d, wire, now + invisible), wire])
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not s.closed:
                s.error(rid, as_client_error(exc))
                s.flush()
            return
        if s.closed:
            return  # its leases expire on their own
        s.reply(rid, {"m": out})
        s.flush()

    async def _pull(self, group: str, topic: str, tags: str, n: int, wait: float) -> list[Delivery]:
        pool = self._pools.get((group, topic))
        if pool is None or pool.spec.tags != tags:  # (new tags: the consumer's filter follows)
            if pool is not None:
                for old in pool.idle:
                    await old.close()
            spec = GroupSpec(group, topic, tags=tags, ack_wait=self.config.ack_timeout)
            pool = self._pools[(group, topic)] = _Pool(spec)
        if pool.idle:
            h = pool.idle.pop()
        elif pool.first is None:
            h = pool.first = await self.groups_api.subscribe(pool.spec)
        else:
            f = pool.first
            h = ConsumerHandle(f.groups, f.spec, f.stream, f.name, f.prefix,
                               await Puller(self.client.nc, f.stream, f.name).open())
        reuse = False
        try:
            end = time.monotonic() + wait
            got = await h.fetch_now(n)
            while not got and (left := end - time.monotonic()) > 0:
                got = await h.fetch(1, timeout=left)
                if got and n > 1:
                    got += await h.fetch_now(n - 1)
                elif not got:  # ended early (the consumer has no leader yet, or is changing it)
                    await asyncio.sleep(min(_EARLY_END_PAUSE, max(0.0, end - time.monotonic())))
            reuse = not h.request_open
            return got
        finally:
            if reuse and len(pool.idle) < _POOL_MAX and not self._stopping:
                pool.idle.append(h)
            elif h is not pool.first:
                await h.close()  # (a cancelled long poll: what it still brings comes back later)

    async def _pull_fifo(self, group: str, topic: str, tags: str, n: int, wait: float) -> list[Delivery]:
        """A FIFO group: the head of each queue whose previous message is settled (``fifo``:
        one consumer per queue, one message out at a time), polled until ``wait`` is over."""
        lanes = self._fifo_lanes.get((group, topic))
        if lanes is None:
            lanes = self._fifo_lanes[(group, topic)] = (asyncio.Lock(), [])
        lock, handles = lanes
        async with lock:
            if not handles:
                spec = GroupSpec(group, topic, tags=tags, ack_wait=self.config.ack_timeout)
                handles += [await self.groups_api.subscribe(spec, fifo_queue=q) for q in range(self.route(topic))]
            end = time.monotonic() + wait
            while True:
                # up to n queues at once, taking turns; a held queue answers nothing until the
                # poll expires
                first = self._fifo_turn.get((group, topic), 0) % len(handles)
                turn = (handles[first:] + handles[:first])[:n]
                self._fifo_turn[(group, topic)] = first + len(turn)
                heads = await asyncio.gather(*(h.fetch_now(1, timeout=_FIFO_POLL) for h in turn))
                got = [d for head in heads for d in head]
                left = end - time.monotonic()
                if got or left <= 0 or self._stopping:
                    return got
                await asyncio.sleep(min(_FIFO_POLL, left))

    # -- leases -------------------------------------------------------------------------

    def _lease(self, group: str, d: Delivery, wire: list[Any], deadline: float) -> str:
        token = self._next_token
        self._next_token += 1
        lease = _Lease(token, 0, group, d, wire, deadline, self._renew_time(deadline))
        key = _seq_key(d)
        older = self._leases.get(self._leased.get(key, 0))
        if older is not None:  # the engine handed it out again: the older lease is over
            self._end(older)
        self._leases[token] = lease
        self._leased[key] = token
        self._arm(lease)
        return self._handle(lease)

    def _end(self, lease: _Lease) -> None:
        """``lease`` is over (settled, expired or superseded): its handle is stale from now."""
        if self._leases.get(lease.token) is lease:
            del self._leases[lease.token]
            key = _seq_key(lease.delivery)
            if self._leased.get(key) == lease.token:
                del self._leased[key]

    def _handle(self, lease: _Lease) -> str:
        return f"{self._gateway_id}.{lease.token}.{lease.version}"

    def _renew_time(self, deadline: float) -> float:
        """When the engine's lease must be extended next (never, if ours ends first)."""
        half = max(0.5, self.config.ack_timeout / 2)
        at = time.time() + half
        return at if at < deadline else float("inf")

    def _arm(self, lease: _Lease) -> None:
        heapq.heappush(self._lease_heap, (min(lease.deadline, lease.renew_at), lease.token, lease.version))
        if self._lease_task is None:
            self._lease_task = asyncio.get_running_loop().create_task(self._lease_loop())
            self._loops.append(self._lease_task)
        self._lease_wake.set()

    async def _lease_loop(self) -> None:
        """Deadlines and renewals of this gateway's leases, for as long as the engine runs: an
        unexpected error in one round is logged and the loop goes on (a dead loop would let
        every lease lapse silently into the engine's ack wait)."""
        while not self._stopping:
            try:
                await self._lease_round()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("lease loop: unexpected error; going on")
                await asyncio.sleep(_RENEW_RETRY)  # (not a hot loop if it recurs)

    async def _lease_round(self) -> None:
        """Handle the leases that are due, then wait until the next one is (or a wake-up)."""
        heap = self._lease_heap
        now = time.time()
        expired: list[_Lease] = []
        renew: list[_Lease] = []
        while heap and heap[0][0] <= now:
            _when, token, version = heapq.heappop(heap)
            lease = self._leases.get(token)
            if lease is None or lease.version != version:
                continue
            if lease.deadline <= now:
                self._end(lease)
                expired.append(lease)
            elif lease.renew_at <= now:
                lease.renew_at = self._renew_time(lease.deadline)
                heapq.heappush(heap, (min(lease.deadline, lease.renew_at), token, version))
                renew.append(lease)
            else:  # an entry of an earlier deadline: the current one is queued too
                continue
        if renew:  # (not awaited here: an unanswered one must not hold up the deadlines)
            self._track(self._renew_all(renew), "lease renewal")
        for lease in expired:
            try:
                await lease.delivery.retry(NAK_MIN_DELAY)  # back at once, a failed attempt
            except Exception as exc:  # the engine's own ack wait takes over
                log.warning("lease %d of group %s: %r", lease.token, lease.group, exc)
        self._lease_wake.clear()
        wait = (heap[0][0] - time.time()) if heap else 3600.0
        if wait > 0:
            try:
                await asyncio.wait_for(self._lease_wake.wait(), timeout=wait)
            except TimeoutError:
                pass

    async def _renew_all(self, leases: list[_Lease]) -> None:
        await asyncio.gather(*(self._renew(lease) for lease in leases))

    async def _renew(self, lease: _Lease) -> None:
        """Restart the engine's ack wait of ``lease`` (an in-progress its consumer's leader
        answers); not answered, tried again in a second while the lease lasts."""
        try:
            await self.client.nc.request(lease.delivery.msg.reply, b"+WPI", timeout=CONFIRM_TIMEOUT)
        except Exception as exc:
            if self._leases.get(lease.token) is not lease or self._stopping:
                return
            at = time.time() + _RENEW_RETRY
            if at < min(lease.deadline, lease.renew_at):
                lease.renew_at = at
                self._arm(lease)
            log.info("lease %d of group %s: the engine did not confirm its renewal (%r), trying again",
                     lease.token, lease.group, exc)

    # -- SETTLE -------------------------------------------------------------------------

    def settle(self, s: Session, rid: int, group: str, items: list[Any]) -> None:
        """Ack / nack / change the invisible duration / renew / dead-letter leases by
        receipt handle; reply ``{"r": [...]}`` (per item ``True``, the new handle, or
        ``[code, message]``) once the acks are confirmed by the engine."""
        self._track(self._settle_request(s, rid, group, items), "settle")

    async def _settle_request(self, s: Session, rid: int, group: str, items: list[Any]) -> None:
        results = await self._settle_items(group, items)
        if rid and not s.closed:
            s.reply(rid, {"r": results})
            s.flush()

    async def _settle_items(self, group: str, items: list[Any]) -> list[Any]:
        results: list[Any] = [None] * len(items)
        local: list[tuple[int, _Lease, str, int]] = []
        remote: dict[str, list[int]] = {}
        for i, item in enumerate(items):
            try:
                if not isinstance(item, list | tuple) or len(item) != 3:
                    raise BadRequestError("a settle item is [handle, action, ms]")
                handle, action, ms = item
                if type(ms) is not int or ms < (-1 if action == "nack" else 0):
                    raise BadRequestError("the milliseconds of a settle item must be an integer >= 0 "
                                          "(-1 for a nack: the group's retry delay)")
                if action not in ("ack", "nack", "cid", "renew", "dlq"):
                    raise BadRequestError(f"unknown settle action {action!r}")
                gw, token, version = _parse_handle(handle)
                if gw != self._gateway_id:
                    remote.setdefault(gw, []).append(i)
                    continue
                lease = self._leases.get(token)
                if lease is None or lease.group != group:
                    raise StaleReceiptError("stale receipt handle: its lease was acked, failed or expired")
                if lease.version != version:
                    raise StaleReceiptError("stale receipt handle: its lease was changed (use the newer handle)")
                local.append((i, lease, action, ms))
            except HalfMQError as exc:
                results[i] = [exc.code, str(exc)]
        now = time.time()
        steps: list[Awaitable[None]] = []
        for i, lease, action, ms in local:
            if action in ("cid", "renew"):
                if action == "cid":
                    lease.version += 1
                lease.deadline = now + ms / 1000.0
                lease.renew_at = now  # the engine's ack wait counts from now (the lease task, at once)
                self._arm(lease)
                results[i] = self._handle(lease) if action == "cid" else True
            elif action == "ack":
                steps.append(self._ack(i, lease, results))
            else:
                steps.append(self._give_back(group, i, lease, action, ms, results))
        for gw, idx in remote.items():
            steps.append(self._forward_items(gw, group, items, idx, results))
        await asyncio.gather(*steps)
        return results

    async def _ack(self, i: int, lease: _Lease, results: list[Any]) -> None:
        """Ack ``lease``; it ends once the consumer's leader confirmed this very ack (a
        confirmed later ack would not do: a leader that changed between the two may have
        lost the earlier one). Not confirmed: the lease stays, the item gets the error."""
        try:
            await lease.delivery.confirm(ACK)
        except Exception as exc:
            results[i] = _unconfirmed_row("ack", exc)
            return
        self._end(lease)
        results[i] = True

    async def _give_back(self, group: str, i: int, lease: _Lease, action: str, ms: int,
                         results: list[Any]) -> None:
        """``nack`` (retry after ``ms``, -1: the group's delay for its attempt; dead-lettered
        after the last attempt, C4) or ``dlq``; the lease ends once the engine confirmed it."""
        d = lease.delivery
        try:
            conf = await self._group_conf(group) if action == "nack" else {}
            attempt = d.attempt
            if action == "nack" and attempt < _max_reconsume(conf):
                if ms < 0:  # the group's retry delay for this attempt
                    ladder = conf.get("retry_delays") or self.config.retry_delays
                    delay = float(ladder[min(attempt, len(ladder) - 1)]) if ladder else 0.0
                else:
                    delay = ms / 1000.0
                await d.confirm(nak_action(delay))
            else:  # a copy in the DLQ (idempotent), then never again to this group
                await self.groups_api.publish_dead(group, lease.wire, deadline=CONFIRM_TIMEOUT)
                await d.confirm(TERM)
        except Exception as exc:
            results[i] = _unconfirmed_row(action, exc)
            return
        self._end(lease)
        results[i] = True

    async def _forward_items(self, gw: str, group: str, items: list[Any], idx: list[int],
                             results: list[Any]) -> None:
        answers = await self._forward(gw, group, [items[i] for i in idx])
        for i, r in zip(idx, answers, strict=True):
            results[i] = r

    async def _forward(self, gw: str, group: str, items: list[Any]) -> list[Any]:
        """Settle ``items`` on gateway ``gw`` (it holds their leases)."""
        try:
            msg = await self.client.nc.request(f"hmqs.lease.{gw}", msgpack.packb([group, items]),
                                               timeout=_FORWARD_TIMEOUT)
            answers = msgpack.unpackb(msg.data)
            if isinstance(answers, list) and len(answers) == len(items):
                return answers
            raise ValueError("malformed answer")
        except nats.errors.NoRespondersError:
            gone = True
        except (nats.errors.TimeoutError, TimeoutError):
            # slow, or gone an instant ago (the engine node this gateway is connected to may
            # not yet know its subscription went with it): ask once more with nothing to do
            gone = await self._gateway_gone(gw)
        except Exception as exc:
            return [_error_row(exc)] * len(items)
        if gone:
            err: HalfMQError = StaleReceiptError("stale receipt handle: the gateway that leased it is gone "
                                                 "(the message is delivered again when its lease runs out)")
        else:
            err = BrokerUnavailableError("the gateway that leased it did not answer in time; "
                                         "the lease is unchanged: settle it again with the same handle")
        return [[err.code, str(err)]] * len(items)

    async def _gateway_gone(self, gw: str) -> bool:
        """True if nobody answers gateway ``gw``'s settle subject (an empty settle)."""
        try:
            await self.client.nc.request(f"hmqs.lease.{gw}", msgpack.packb(["", []]), timeout=_PROBE_TIMEOUT)
        except nats.errors.NoRespondersError:
            return True
        except Exception:
            pass
        return False

    async def _serve_forwarded(self) -> None:
        """Answer settles forwarded by other gateways for this gateway's leases."""
        if self._forward_sub is not None:
            return

        async def on_request(msg: Any) -> None:
            try:
                group, items = msgpack.unpackb(msg.data)
                answers = await self._settle_items(str(group), list(items))
            except Exception as exc:
                answers = [_error_row(exc)]
            await msg.respond(msgpack.packb(answers))

        self._forward_sub = await self.client.nc.subscribe(f"hmqs.lease.{self._gateway_id}", cb=on_request)

    def _end_receives(self) -> None:
        """Stopping: pending RECEIVEs end unanswered (their clients ask another gateway)."""
        for task in list(self._receives.values()):
            task.cancel()

    async def _close_pulling(self) -> None:
        """Stop: forwarded settles stop, pullers close (leases expire in the engine)."""
        self._end_receives()
        if self._forward_sub is not None:
            try:
                await self._forward_sub.unsubscribe()
            except Exception:
                pass
        handles = [h for _lock, hs in self._fifo_lanes.values() for h in hs]
        for pool in self._pools.values():
            handles += pool.idle + ([pool.first] if pool.first is not None else [])
        for h in handles:
            try:
                await h.close()
            except Exception:
                pass
        self._pools.clear()
        self._fifo_lanes.clear()


def _seq_key(d: Delivery) -> tuple[str, str, int]:
    """The message a delivery is of, per consumer (a redelivery has the same key)."""
    return d.handle.stream, d.handle.name, d.stream_seq


def _parse_handle(handle: Any) -> tuple[str, int, int]:
    if not isinstance(handle, str):
        raise StaleReceiptError("a receipt handle must be a string")
    parts = handle.split(".")
    if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
        raise StaleReceiptError(f"malformed receipt handle {handle!r}")
    return parts[0], int(parts[1]), int(parts[2])


def _unconfirmed_row(action: str, exc: BaseException) -> list[Any]:
    """The answer to a settle the engine did not confirm (its lease and handle stay)."""
    if isinstance(exc, HalfMQError):
        return [exc.code, str(exc)]
    err = BrokerUnavailableError(f"the engine did not confirm the {action} ({type(exc).__name__}: {exc}); "
                                 "the lease is unchanged: settle it again with the same handle")
    return [err.code, str(err)]


def _error_row(exc: BaseException) -> list[Any]:
    from broker.engines.jetstream.engine import as_client_error

    err = as_client_error(exc)
    return [err.code, str(err)]
