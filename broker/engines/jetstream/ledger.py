"""Transactions on the engine: half messages, the one decision, check counts, pointers.

How this works
--------------
A half message is a record on ``hmq.<T>.h.<queue>``; its message id names its stream and
sequence (``naming``), so ``half(msg_id)`` is one get. Nothing about a transaction is kept
in a gateway.

The decision (SPEC T6) is one record on ``hmqs.tx.d.<msg_id>`` in ``HMQ_TX``, payload
``C``, ``R`` or ``A``, published with ``Nats-Expected-Last-Subject-Sequence: 0``: the
engine stores the first and refuses every later one ("wrong last sequence"), so however
many gateways race, one outcome wins. ``decide()`` then reads the winner from the stream
leader: the same outcome → ``changed=False`` (a repeat), another → ``TransactionStateError``.
Each attempt also carries ``Nats-Msg-Id = d:<msg_id>:<code>``, so a retry of our own
stored attempt (ack lost in a failover) is answered as a duplicate, not as a conflict.

A commit of a half sent with a delay schedules the pointer instead (``scheduling``: the
engine's scheduler publishes it ``delay`` ms after the commit). Otherwise a commit
publishes the pointer: ``[3, half_seq]`` on the half's visible subject
``hmq.<T>.m.<queue>.<tag>``, with ``Nats-Msg-Id = c:<msg_id>``. ``end()`` publishes it
after *every* COMMIT it sees recorded, won or repeated: if a gateway died between decision
and pointer, the next END_TX or check-back of that transaction writes it, and the
duplicate window makes a second write a no-op (at most one visible copy, T2 + T9).

Check counts (T4): ``hmqs.tx.c.<msg_id>`` holds the count of check-backs that reached a
producer, each new count written with the previous record's sequence as the expected
last subject sequence (and ``Nats-Msg-Id = n:<msg_id>:<count>``), so two gateways never
both write count 3.

Retention (reference 4.8 item 7): decisions live ``tx_retention`` seconds. Once one has
aged out a compare-and-set on its subject would succeed again, so ``end()`` refuses
(``TransactionStateError``) any outcome for a half older than ``tx_retention`` minus a
margin, as the embedded broker refuses one it has forgotten.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from broker import failpoint
from broker.engines.jetstream import naming
from broker.engines.jetstream.client import (
    EngineClient,
    EngineUnavailableError,
    PubAck,
    WrongLastSequenceError,
)
from broker.engines.jetstream.records import Kind, Record, decode_record, encode_pointer
from broker.engines.jetstream.scheduling import schedule_item
from broker.engines.jetstream.streams import StreamSet, TopicStream
from protocol.errors import TransactionStateError

__all__ = ["CODES", "STATES", "Decision", "HalfRecord", "TxLedger"]

CODES = {"COMMIT": "C", "ROLLBACK": "R", "ABANDON": "A"}
STATES = {"C": "COMMITTED", "R": "ROLLED_BACK", "A": "ABANDONED"}
_CAS_TRIES = 16


@dataclass(frozen=True, slots=True)
class HalfRecord:
    """A stored half message."""

    msg_id: str
    stream: TopicStream
    seq: int
    queue: int
    record: Record
    stored_ms: int  # engine clock

    @property
    def topic(self) -> str:
        return self.stream.topic


@dataclass(frozen=True, slots=True)
class Decision:
    """A decision as recorded: ``code`` C/R/A; ``changed`` False if it was already recorded."""

    code: str
    changed: bool

    @property
    def state(self) -> str:
        return STATES[self.code]


class TxLedger:
    """Decisions, check counts and pointers. ``tx_retention``: seconds decisions are kept
    (``HMQ_TX``'s max age, default 3600); ``margin``: how close to it an outcome is refused (60)."""

    def __init__(self, client: EngineClient, streams: StreamSet, *, margin: float = 60.0) -> None:
        self.client = client
        self.streams = streams
        self.margin = margin

    async def lookup(self, msg_id: str) -> tuple[TopicStream, int, int, Record, int] | None:
        """The record ``msg_id`` names: ``(stream, seq, queue, record, stored_ms)``, or None
        (malformed id, unknown stream, no such record, not a message or half message)."""
        try:
            prefix, seq = naming.decode_msg_id(msg_id)
        except ValueError:
            return None
        stream = await self.streams.topic_of_prefix(prefix)
        if stream is None:
            return None
        stored = await self.client.get(stream.name, seq)
        if stored is None:
            return None
        try:
            kind, _group, queue, _tag = naming.parse_topic_subject(stored.subject)
            record = decode_record(stored.data)
        except ValueError:
            return None
        if (kind, record.kind) not in (("h", Kind.HALF), ("m", Kind.MESSAGE), ("p", Kind.MESSAGE)):
            return None
        return stream, seq, queue, record, stored.time_ms

    async def half(self, msg_id: str) -> HalfRecord | None:
        """The half message ``msg_id`` names, or None (see ``lookup``; or not a half)."""
        found = await self.lookup(msg_id)
        if found is None or found[3].kind is not Kind.HALF:
            return None
        stream, seq, queue, record, stored_ms = found
        return HalfRecord(msg_id, stream, seq, queue, record, stored_ms)

    async def decision(self, msg_id: str) -> str | None:
        """The recorded decision code (``C``/``R``/``A``) or None, read from the leader."""
        found = await self.client.get_last(naming.TX_STREAM, naming.tx_decision_subject(msg_id))
        return found.data.decode() if found is not None else None

    async def decide(self, msg_id: str, code: str) -> Decision:
        """Record ``code`` unless a decision exists; returns what is recorded.

        Raises ``TransactionStateError`` if another decision is recorded (nothing changes).
        """
        if code not in STATES:
            raise ValueError(f"decision code must be one of C, R, A, not {code!r}")
        subject = naming.tx_decision_subject(msg_id)
        for attempt in range(_CAS_TRIES):
            try:
                ack = await self.client.publish(subject, code.encode(), msg_id=f"d:{msg_id}:{code}",
                                                expected_last_subject_seq=0)
                return Decision(code, not ack.duplicate)
            except WrongLastSequenceError:
                pass
            recorded = await self.decision(msg_id)
            if recorded is None:
                # the write we lost to was still in flight and may have failed: try again
                await asyncio.sleep(0.01 * (attempt + 1))
                continue
            if recorded != code:
                raise TransactionStateError(
                    f"transaction {msg_id!r} is already {STATES[recorded]}; {STATES[code]} "
                    "refused, nothing changed")
            return Decision(recorded, False)
        raise EngineUnavailableError(f"transaction {msg_id!r}: decision contended {_CAS_TRIES} times")

    async def publish_pointer(self, half: HalfRecord) -> PubAck:
        """Make a committed half visible (idempotent: ``Nats-Msg-Id = c:<msg_id>``); a half
        sent with a delay is scheduled instead, the delay counted from now (``scheduling``)."""
        delay = half.record.ext.get("d")
        if delay:
            await self.streams.allow_schedules(half.stream)
            subject, payload, headers = schedule_item(half.topic, half.seq, half.queue, half.record.tags,
                                                      int(time.time() * 1000) + int(delay))
            return await self.client.publish(subject, payload, msg_id=f"c:{half.msg_id}", headers=headers)
        subject = naming.message_subject(half.topic, half.queue, half.record.tags)
        return await self.client.publish(subject, encode_pointer(half.seq), msg_id=f"c:{half.msg_id}")

    async def end(self, msg_id: str, outcome: str, *, now_ms: int | None = None,
                  known: HalfRecord | None = None) -> Decision:
        """END_TX: record ``outcome`` (COMMIT/ROLLBACK/ABANDON) for half ``msg_id``, then the pointer.

        ``known``: the half as this gateway stored it (saves reading it back; its record
        needs only the tags). Returns the recorded ``Decision``. Raises
        ``TransactionStateError`` for an unknown id, a conflicting recorded decision, or a
        half too old to decide safely.
        """
        code = CODES.get(outcome)
        if code is None:
            raise ValueError(f"outcome must be COMMIT, ROLLBACK or ABANDON, not {outcome!r}")
        half = known if known is not None and known.msg_id == msg_id else await self.half(msg_id)
        if half is None:
            raise TransactionStateError(f"unknown transaction {msg_id!r}: no such half message")
        now = now_ms if now_ms is not None else int(time.time() * 1000)
        if now - half.stored_ms > (self.streams.tx_retention - self.margin) * 1000:
            recorded = await self.decision(msg_id)
            if recorded == code:
                return Decision(code, False)
            raise TransactionStateError(
                f"transaction {msg_id!r} is older than the engine keeps decisions "
                f"({self.streams.tx_retention:g}s); {outcome} refused, nothing changed")
        decision = await self.decide(msg_id, code)
        if decision.code == "C":
            if decision.changed:
                failpoint.hit("after-decision", msg_id)  # tests only (broker.failpoint)
            await self.publish_pointer(half)
        return decision

    async def checks(self, msg_id: str) -> tuple[int, int]:
        """``(count, seq)``: check-backs that reached a producer, and the count record's sequence."""
        found = await self.client.get_last(naming.TX_STREAM, naming.tx_check_subject(msg_id))
        return (int(found.data), found.seq) if found is not None else (0, 0)

    async def count_check(self, msg_id: str) -> int:
        """Add one reached check-back; returns the new count (compare-and-set, retried)."""
        subject = naming.tx_check_subject(msg_id)
        for _ in range(_CAS_TRIES):
            count, seq = await self.checks(msg_id)
            try:
                await self.client.publish(subject, str(count + 1).encode(),
                                          msg_id=f"n:{msg_id}:{count + 1}",
                                          expected_last_subject_seq=seq)
                return count + 1
            except WrongLastSequenceError:
                await asyncio.sleep(0.005)
                continue
        raise EngineUnavailableError(f"transaction {msg_id!r}: check count contended {_CAS_TRIES} times")
