"""Sending on the embedded engine: SEND requests become log records, one append per iteration.

How this works
--------------
``send`` turns the (already validated) messages of one SEND into records and queues them
with the request; ``_flush_sends`` runs once at the end of the loop iteration and appends
*every* queued record — all connections' sends, transaction outcomes — in one
``store.append``. When the writer is idle the store writes (and syncs) that batch right
there (``append(..., now=True)``), so a lone SEND is answered in the iteration that
appended it; else the writer takes it with what comes meanwhile. When the batch is durable
(after its fsync with ``--flush sync``), the append future's one callback answers every
request of the batch, runs the delivery
dispatch (the consumers learn of the new messages in the same iteration) and writes the
answered connections' output at once. No task, future or log line per message.

Messages go round robin over the topic's queues. A SEND of ``_BUNDLE_MIN`` to
``_BUNDLE_MAX`` messages without options (a ``send_batch``, a big SDK micro-batch) with up
to ``_bundle_bytes`` of bodies is stored as one bundle record in one queue (one encoding,
one CRC); each member keeps its own id and queue offset. A half message is an ``RT_HALF``
record (or a member of an ``RT_HALF`` bundle, whose messages are all delivered from one
queue once committed) indexed only in ``%HALF%``; it joins the transaction table once
durable. A message
with a delivery time (option ``at``) is a record in no queue; its schedule record is
appended right after the iteration's append, in the same batch (see ``.scheduling``).

Records of the engine's own join the same append (``_queue_records``): transaction
outcomes, retry and dead-letter records, and the ack records of the iteration (see
``.delivering``), so one fsync makes them all durable.

A failing append (disk error) fails every request of the batch with a clear error.
"""

from __future__ import annotations

import asyncio
import logging
import time
import zlib
from itertools import repeat
from operator import itemgetter
from typing import TYPE_CHECKING, Any

from broker.core.records import HALF_TOPIC, RT_ACK, RT_HALF, RT_MSG, message_header, tag_hash
from broker.engines.base import Session
from protocol.errors import HalfMQError, LimitExceededError
from storage import BundleTarget, IndexTarget, NewBundle, NewRecord
from storage.framing import MEMBER_BIT

if TYPE_CHECKING:
    from broker.engines.embedded.engine import EmbeddedEngine

__all__ = ["EmbeddedSending", "METRIC_TOPICS"]

#: Topics counted by name in the metrics; the others share the label ``_other``.
METRIC_TOPICS = 200

log = logging.getLogger("halfmq.broker")

#: (Measured: for a few messages per SEND, bundling gains nothing.)
_BUNDLE_MIN = 16
_BUNDLE_MAX = 1000
#: The ``half`` of a SEND's queued entry when its half messages are one bundle's members.
_HALF_MEMBERS = 1 | MEMBER_BIT
_first = itemgetter(0)  # a message's body, a Stored's position
_fourth = itemgetter(3)  # a Stored's queue offset


class EmbeddedSending:
    """The send path of :class:`EmbeddedEngine` (see the module docstring)."""

    _send_records: list[NewRecord | NewBundle]
    _send_entries: list[tuple[Any, ...]]
    _sched_rows: list[tuple[int, str, int, int, int, int]]
    _loop: asyncio.AbstractEventLoop | None

    def send(self: EmbeddedEngine, s: Session, rid: int, topic: str, msgs: list[list[Any]], half: bool) -> None:
        """Queue the records of one SEND; the reply goes out once they are durable.

        Raises ``TopicNotFoundError`` (nothing queued) if the topic does not exist and
        auto-create is off.
        """
        if half and self.tx.pending_count + len(msgs) > self.config.max_prepared:
            raise LimitExceededError(
                f"the broker holds --max-prepared {self.config.max_prepared} unresolved half messages: "
                "resolve some (END_TX, check-backs) before sending more")
        nq = self._ensure_topic(topic)
        assert self.store is not None
        epoch = self.store.epoch
        records = self._send_records
        targets = self._targets
        if len(targets) > 100_000:
            targets.clear()
        first = self._send_count
        self._send_count = first + len(msgs)
        rr = self._rr[topic]
        n = len(msgs)
        kind = int(half)  # (_HALF_MEMBERS: bundled half messages)
        if max(map(len, msgs)) > 5:  # with options (message group): one record each
            self._send_with_options(s, rid, topic, msgs, half, nq, epoch, first)
            return
        if (_BUNDLE_MIN <= n <= _BUNDLE_MAX
                and sum(map(len, (columns := tuple(zip(*msgs, strict=True)))[0])) <= self._bundle_bytes):
            # one record for the lot, in one queue (as a RocketMQ batch): one encoding, one
            # CRC; its rows built in C, column by column (a header packs the same as a list)
            bodies, tagss, keyss, propss, borns = columns
            qid = rr % nq
            rr += 1
            if half:  # members of %HALF%; committed, each is delivered from queue ``qid``
                records.append(NewBundle(
                    RT_HALF,
                    list(zip(repeat(topic, n), tagss, keyss, propss, borns, repeat(epoch, n), repeat(s.group, n),
                             repeat(s.client_id, n), repeat(qid, n), strict=True)),
                    list(bodies),
                    BundleTarget(HALF_TOPIC, 0, [0] * n),
                ))
                kind = _HALF_MEMBERS
            else:
                records.append(NewBundle(
                    RT_MSG,
                    list(zip(repeat(topic, n), tagss, keyss, propss, borns, repeat(epoch, n), strict=True)),
                    list(bodies),
                    BundleTarget(topic, qid, [0] * n if tagss.count(None) == n else list(map(tag_hash, tagss))),
                ))
            qids = [qid] * n
        else:
            qids = []
            for body, tags, keys, props, born in msgs:
                qid = rr % nq
                rr += 1
                if half:
                    header = [topic, tags, keys, props, born, epoch, s.group, s.client_id, qid]
                    records.append(NewRecord(RT_HALF, header, body, IndexTarget(HALF_TOPIC, 0)))
                else:
                    header = [topic, tags, keys, props, born, epoch]
                    th = tag_hash(tags) if tags else 0
                    target = targets.get((topic, qid, th))
                    if target is None:
                        target = targets[(topic, qid, th)] = IndexTarget(topic, qid, th)
                    records.append(NewRecord(RT_MSG, header, body, target))
                qids.append(qid)
        self._rr[topic] = rr
        self._send_entries.append((s, rid, kind, topic, first, qids, msgs))
        self._schedule_flush()

    def _send_with_options(self: EmbeddedEngine, s: Session, rid: int, topic: str, msgs: list[list[Any]],
                           half: bool, nq: int, epoch: int, first: int) -> None:
        """Messages with options: a message group picks its queue (all of one group in one
        queue, in send order) and travels in the header's extras."""
        records = self._send_records
        rr = self._rr[topic]
        qids: list[int] = []
        rows = []
        for m in msgs:
            body, tags, keys, props, born = m[:5]
            opts = m[5] if len(m) > 5 else None
            ext = {}
            if opts and "group" in opts:
                ext["g"] = opts["group"]
                qid = zlib.crc32(opts["group"].encode()) % nq
            else:
                qid = rr % nq
                rr += 1
            if half:
                if opts and "delay" in opts:  # delivered that long after the commit (see .scheduling)
                    ext["d"] = opts["delay"]
                header = [topic, tags, keys, props, born, epoch, s.group, s.client_id, qid]
                if ext:
                    header.append(ext)
                records.append(NewRecord(RT_HALF, header, body, IndexTarget(HALF_TOPIC, 0)))
            elif opts and "at" in opts:
                # scheduled: stored now, in no queue until the walker releases it (see .scheduling)
                ext["at"] = at = opts["at"]
                th = tag_hash(tags)
                self._sched_rows.append((first + len(qids), topic, qid, th, at, epoch))
                records.append(NewRecord(RT_MSG, message_header(topic, tags, keys, props, born, epoch, ext), body))
            else:
                header = message_header(topic, tags, keys, props, born, epoch, ext)
                records.append(NewRecord(RT_MSG, header, body, IndexTarget(topic, qid, tag_hash(tags))))
            qids.append(qid)
            rows.append(m)
        self._rr[topic] = rr
        self._send_entries.append((s, rid, half, topic, first, qids, rows))
        self._schedule_flush()

    def _queue_records(self: EmbeddedEngine, records: list[NewRecord], waiter: Any) -> None:
        """Queue records of the engine's own (outcomes, acks) into this iteration's append.

        ``waiter`` is told when they are durable: a future (its result set, or its
        exception), a ``(session, rid, payload)`` request to answer, a callable
        ``waiter(exc_or_None)``, or None (nobody waits).
        """
        self._send_records.extend(records)
        self._send_count += len(records)
        if waiter is not None:
            self._send_entries.append((None, waiter, False, "", 0, (), ()))
        self._schedule_flush()

    def _schedule_flush(self: EmbeddedEngine) -> None:
        """Have ``_flush_sends`` run once, at the end of this loop iteration."""
        if not self._sends_scheduled:
            self._sends_scheduled = True
            loop = self._loop
            if loop is None:  # (asyncio.get_running_loop() costs a getpid() system call)
                loop = self._loop = asyncio.get_running_loop()
            loop.call_soon(self._flush_sends)

    def _flush_sends(self: EmbeddedEngine) -> None:
        """Append every record queued in this loop iteration (all connections) in one store
        call; answer each request when the records are durable."""
        self._sends_scheduled = False
        if self._acked_groups:
            self._send_records.extend(self._ack_records())  # last: the sends' row numbers stay
        trace = self.trace  # --trace (see .tracing): the one check of this batch
        if trace and self._trace_buf:  # the events of this iteration ride along
            self._send_records.extend(self._trace_records())
        records, entries = self._send_records, self._send_entries
        if not records:
            if not entries:
                return
            # only waiters (a barrier): an empty record whose durability implies that of
            # everything appended before it
            records = [NewRecord(RT_ACK, {"g": "", "a": []}, b"", None)]
        self._send_records = []
        self._send_entries = []
        self._send_count = 0
        sched_rows = self._sched_rows
        self._sched_rows = []
        store = self.store
        assert store is not None
        try:
            # written here and now if the writer is idle (a lone SEND: answered in this
            # iteration), else by the writer with what comes meanwhile (group commit);
            # not when schedule records must join this batch
            stored, fut = store.append(records, now=not sched_rows)
        except Exception as exc:
            log.exception("store append failed")
            self.counters["sends_failed"] += sum(1 for e in entries if e[0] is not None)
            failure = HalfMQError(f"store failed: {exc}")
            for s, rid, *_ in entries:
                if s is None:
                    _tell(rid, exc, failure)
                else:
                    s.error(rid, failure)
            return
        if trace:  # who sent what: written with the next append
            self._trace_sent(entries, stored)
        if sched_rows:  # their schedule records, now that the messages have positions
            fut = self._schedule_sent(sched_rows, stored, fut)
        prefix = f"{store.epoch:08X}"
        stored_counts = [(e[3], len(e[5]), sum(map(len, map(_first, e[6])))) for e in entries if e[0] is not None]
        replies = []
        any_plain = False
        now = 0.0
        waiters: list[Any] = []
        for s, rid, half, topic, first, qids, msgs in entries:
            if s is None:  # records of the engine's own: ``rid`` is who waits for them
                waiters.append(rid)
                continue
            part = stored[first : first + len(qids)]
            if half:
                now = now or time.time()
                result = []
                member = half & MEMBER_BIT  # (a commit's index entry to a member says so)
                for st, qid, m in zip(part, qids, msgs, strict=True):
                    msg_id = f"{prefix}{st.pos:016X}"
                    self.tx.add(msg_id, topic=topic, group=s.group, producer_id=s.client_id,
                                keys=tuple(m[2]), pos=st.pos, now=now)
                    self._half_meta[msg_id] = (qid, tag_hash(m[1]), st.size | member)
                    if len(m) > 5 and "delay" in m[5]:
                        self._half_delays[msg_id] = m[5]["delay"]
                    result.append([st.pos, qid, -1])
            else:
                any_plain = True
                # rows carry the position; the client makes the id (prefix + 16 hex digits)
                result = list(map(list, zip(map(_first, part), qids, map(_fourth, part), strict=True)))
            replies.append((s, rid, {"p": prefix, "r": result}))
        self.stats["sent"] += sum(len(e[5]) for e in entries)

        def done(f: asyncio.Future[Any]) -> None:
            exc = f.exception()
            failure = None if exc is None else HalfMQError(f"store failed: {exc}")
            answered: set[Session] = set()
            for w in waiters:
                answered_by = _tell(w, exc, failure)
                if answered_by is not None:
                    answered.add(answered_by)
            if failure is not None:
                self.counters["sends_failed"] += len(replies)
                for s, rid, _ in replies:
                    s.error(rid, failure)
                return
            self.counters["sends_ok"] += len(replies)
            counts = self.topic_counts
            for topic, n, size in stored_counts:
                c = counts.get(topic)
                if c is None:
                    c = counts[topic] = [0, 0] if len(counts) < METRIC_TOPICS else counts.setdefault("_other", [0, 0])
                c[0] += n
                c[1] += size
            for s, rid, reply in replies:
                s.reply(rid, reply)
                answered.add(s)
            # Write the replies now rather than at the end of the iteration: a callback
            # queued for later can run after the next batch's write, which blocks the loop
            # for an fdatasync (measured: a reply then waited a whole fsync, p50 0.2-1.2 ms).
            # And before the deliveries are built: the producers start on their next sends
            # while this process leases, encodes and writes the DELIVER frames.
            for s in answered:
                s.flush()
            if (any_plain or waiters) and not self._stopping:
                self.dispatch(flush=True)

        if fut.done():
            done(fut)
        else:
            fut.add_done_callback(done)


def _tell(waiter: Any, exc: BaseException | None, failure: HalfMQError | None) -> Session | None:
    """Tell one waiter of ``_queue_records`` how its append went; return the session it
    answered, if it was a request."""
    if type(waiter) is tuple:  # a client's request: (session, rid, reply)
        s, rid, payload = waiter
        if failure is None:
            s.reply(rid, payload)
        else:
            s.error(rid, failure)
        return s  # type: ignore[no-any-return]
    if isinstance(waiter, asyncio.Future):
        if not waiter.done():
            if exc is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(exc)
    else:
        waiter(exc)
    return None
