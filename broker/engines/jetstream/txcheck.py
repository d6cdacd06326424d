"""Check-backs of the JetStream engine: every gateway checks, each half once at a time.

How this works
--------------
For every topic that ever held a half message (``StreamSet.transactional_topics``,
read again every ``min(tx_timeout, 10 s)``; at once for a topic this gateway sends halves
to — the mark is stored before the first half is) the gateway runs a loop on the topic's ``TXCHECK``
consumer, which hands each half message to one gateway at a time (its ack wait, 10 s,
extended while a producer takes longer to answer). For each half it gets:

1. younger than ``--tx-timeout`` (engine clock) → NAK with the rest of that time (the
   decision is not read: most transactions are decided by then, and it saves a read each);
2. a decision is recorded → for COMMIT make sure of the pointer (idempotent), ack: done;
3. ``--tx-check-max`` checks counted → decision ABANDONED (WARNING logged), ack;
4. otherwise ask a producer (``checkback``: its instance, then its group):
   COMMIT/ROLLBACK → recorded as END_TX would; reached without an outcome → count the
   check (compare-and-set), abandon at the limit; not reached → not counted. Then NAK
   with ``--tx-check-interval``.

A gateway that dies mid-check leaves the half leased: the engine hands it to another
gateway after the ack wait (10 s). Checks run concurrently (at most 32 per gateway), each as its
own task: check-backs are rare and slow (a producer's answer), not the hot path.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from broker.engines.jetstream import naming
from broker.engines.jetstream.groups import ConsumerHandle, Delivery
from broker.engines.jetstream.ledger import HalfRecord
from broker.engines.jetstream.parts import EngineParts
from protocol.errors import TransactionStateError

__all__ = ["JetStreamTxCheck"]

log = logging.getLogger("halfmq.engine")

_CHECKS_AT_ONCE = 32
#: how long a gateway holds a half it checks before the engine hands it to another one
#: (the check-back extends it while a producer takes longer): also the longest a check is
#: delayed by a gateway that died holding it
TXCHECK_ACK_WAIT = 10.0


class JetStreamTxCheck(EngineParts):
    """The check-back part of :class:`JetStreamEngine` (see the module docstring)."""

    def _init_txcheck(self) -> None:
        self._txcheck_topics: dict[str, asyncio.Task[Any]] = {}
        self._check_slots = asyncio.Semaphore(_CHECKS_AT_ONCE)

    def _watch_topic(self, topic: str) -> None:
        if topic not in self._txcheck_topics and not self._stopping:
            self._txcheck_topics[topic] = asyncio.get_running_loop().create_task(
                self._txcheck_loop(topic), name=f"halfmq-txcheck-{topic}")
            self._loops.append(self._txcheck_topics[topic])

    async def _txcheck_discovery(self) -> None:
        period = min(self.config.tx_timeout, 10.0)
        while not self._stopping:  # (a cancellation swallowed by a wait_for must not keep it alive)
            try:
                for topic in await self.streams.transactional_topics():
                    self._watch_topic(topic)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("listing topics for check-backs failed: %r", exc)
            await asyncio.sleep(period)

    async def _txcheck_loop(self, topic: str) -> None:
        handle: ConsumerHandle | None = None
        try:
            while not self._stopping:
                try:
                    if handle is None:
                        handle = await self.groups_api.txcheck(topic, ack_wait=TXCHECK_ACK_WAIT)
                    for d in await handle.fetch(_CHECKS_AT_ONCE, timeout=2.0):
                        await self._check_slots.acquire()
                        self._track(self._check_one(handle, d), f"check-back in {topic}")
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.warning("check-backs of %s paused: %r", topic, exc)
                    await asyncio.sleep(0.5)
        finally:
            if handle is not None:
                try:
                    await handle.close()
                except Exception:
                    pass

    async def _check_one(self, handle: ConsumerHandle, d: Delivery) -> None:
        try:
            await self._check(handle, d)
        finally:
            self._check_slots.release()

    async def _check(self, handle: ConsumerHandle, d: Delivery) -> None:
        cfg = self.config
        rec = d.record
        msg_id = naming.encode_msg_id(handle.prefix, d.stream_seq)
        age = time.time() - d.time_ms / 1000.0
        if age < cfg.tx_timeout:  # not due: back later (decided meanwhile or not: one read saved)
            await d.retry(cfg.tx_timeout - age)
            return
        code = await self.ledger.decision(msg_id)
        if code is not None:
            if code == "C":
                await self.ledger.publish_pointer(await self._half_record(handle, d, msg_id))
            await d.msg.ack()
            return
        count, _seq = await self.ledger.checks(msg_id)
        if count < cfg.tx_check_max:
            try:
                _k, _g, queue, _t = naming.parse_topic_subject(d.subject)
            except ValueError:
                queue = 0
            wire = [msg_id, handle.spec.topic, rec.body, rec.tags, rec.keys, rec.properties,
                    rec.born_ms, d.time_ms, queue, -1, 0]
            asking = asyncio.ensure_future(self.router.check(wire, group=rec.producer_group,
                                                             instance=rec.producer_instance))
            while not asking.done():  # keep the half ours while the producer thinks
                await asyncio.wait([asking], timeout=TXCHECK_ACK_WAIT / 2)
                if not asking.done():
                    await d.extend()
            result = asking.result()
            if result.state in ("COMMIT", "ROLLBACK"):
                try:
                    await self.ledger.end(msg_id, result.state)
                except TransactionStateError:
                    pass  # decided meanwhile (END_TX or another gateway): that decision holds
                await d.msg.ack()
                return
            if result.reached:
                count = await self.ledger.count_check(msg_id)
        if count >= cfg.tx_check_max:
            try:
                await self.ledger.decide(msg_id, "A")
                log.warning("transaction %s (topic %s, group %s) abandoned after %d check-backs",
                            msg_id, handle.spec.topic, rec.producer_group, count)
            except TransactionStateError:
                pass
            await d.msg.ack()
            return
        await d.retry(cfg.tx_check_interval)

    async def _half_record(self, handle: ConsumerHandle, d: Delivery, msg_id: str) -> HalfRecord:
        ts = await self.streams.ensure_topic(handle.spec.topic)
        _k, _g, queue, _t = naming.parse_topic_subject(d.subject)
        return HalfRecord(msg_id, ts, d.stream_seq, queue, d.record, d.time_ms)
