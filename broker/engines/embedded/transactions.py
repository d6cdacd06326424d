"""Transactions on the embedded engine: outcomes in the log, check-backs on producers' connections.

How this works
--------------
The rules live in ``HalfMessageTable`` (``broker.core.transactions``); this shell gives them
I/O. An outcome that changes a transaction (END_TX from the producer, a check-back answer,
an operator, abandonment) appends an ``RT_TX_OP`` record to ``%OP%`` (one for all the
changed outcomes of one END_TX); before it, the commits of each of the topic's queues
append one ``RT_COMMIT_REF`` record whose index entries, in that queue, point at the stored
half records — so a committed message is delivered from the bytes the producer sent, never
copied, and an outcome found in the log always has its reference. A half message sent with a delay is scheduled at its commit instead
(see :mod:`.scheduling`): the delay counts from the commit. Both go into the same iteration's append as the sends
(``_queue_records``) and the producer is answered once they are durable. A repeated
outcome is answered at once with the recorded state (T6). A crash that cut an outcome
record off the log's end but kept the commit references before it leaves visible messages
of a PREPARED transaction: recovery counts them as committed and writes the outcome record
(``_commits_without_outcome``), so they are neither checked back nor delivered twice.

Check-backs: a timer wakes at the next due check (at least every ``--tx-check-interval``)
and asks, for each due half message, the producer instance that sent it — else any live
producer of its group — with a CHECK request on that producer's own connection. At most
one check per transaction is outstanding; a check counts only when it reached a producer
(answered, or unanswered on a live connection for ``_check_timeout``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from broker.core.lifecycle import TxState
from broker.core.records import (
    H_QUEUE,
    H_TAGS,
    OP_TOPIC,
    RT_COMMIT_REF,
    RT_TX_OP,
    build_wire,
    header_ext,
    tag_hash,
    tx_op_header,
)
from broker.engines.base import Session, end_tx_item
from protocol import (
    BrokerUnavailableError,
    Op,
    RequestTimeoutError,
    TransactionStateError,
)
from protocol.errors import HalfMQError
from storage import IndexTarget, NewRecord, RefsTarget

if TYPE_CHECKING:
    from broker.engines.embedded.engine import EmbeddedEngine

__all__ = ["EmbeddedTransactions", "CODE_OUTCOMES"]

log = logging.getLogger("halfmq.broker")

#: Seconds a resolved transaction stays in full before only its final state and check
#: count are kept (enough for a repeated END_TX and the admin API).
_RESOLVED_KEPT = 60.0
_OUTCOME_CODES = {TxState.COMMITTED: "C", TxState.ROLLED_BACK: "R", TxState.ABANDONED: "A"}
CODE_OUTCOMES = {v: k for k, v in _OUTCOME_CODES.items()}
#: Who decided an outcome, as its ``%OP%`` record says (``b``; read back by the trace).
_BY_CODES = {"producer": "p", "check": "c", "operator": "o", "recovery": "r"}
BY_NAMES = {v: k for k, v in _BY_CODES.items()}
_REPLY_STATES = {TxState.COMMITTED: "COMMITTED", TxState.ROLLED_BACK: "ROLLED_BACK", TxState.ABANDONED: "ABANDONED"}
_REQUESTED = {"COMMIT": TxState.COMMITTED, "ROLLBACK": TxState.ROLLED_BACK}
#: The counter of an outcome reported by a producer, by state (an Enum member's ``.value``
#: is a descriptor call, and this is per transaction).
_BY_PRODUCER = {state: f"tx_{state.value}_producer" for state in (TxState.COMMITTED, TxState.ROLLED_BACK)}


def _time_out(fut: asyncio.Future[Any]) -> None:
    if not fut.done():
        fut.set_exception(RequestTimeoutError("no answer to the check-back in time"))


class EmbeddedTransactions:
    """The transaction shell of :class:`EmbeddedEngine` (see the module docstring)."""

    def end_tx(self: EmbeddedEngine, s: Session, rid: int, items: list[tuple[str, str]], single: bool) -> None:
        """Record outcomes (T6) reported by ``s``, a producer of the group that sent each half
        message (another group's item is refused with ``AuthError``). ``single``: one item, answered ``{"state": ...}`` or with
        its error; otherwise ``{"r": [...]}`` with, per item, the recorded state or
        ``[code, message]``. The answer goes out once every changed outcome is durable: the
        changed ones of one request are one ``RT_TX_OP`` record."""
        now = time.time()
        if single:
            msg_id, outcome = items[0]
            state = _REQUESTED[outcome]
            recorded, changed = self.tx.resolve(msg_id, state, now, group=s.group)  # raises for the client
            reply = {"state": _REPLY_STATES[recorded]}
            if changed:
                self.counters[_BY_PRODUCER[recorded]] += 1
                self._append_outcomes([(msg_id, recorded)], reply_to=(s, rid, reply))
            else:
                s.reply(rid, reply)
            return
        results: list[Any] = []
        reply_many = {"r": results}
        changes: list[tuple[str, TxState]] = []
        resolve = self.tx.resolve
        group = s.group
        counters = self.counters
        for i, item in enumerate(items):
            try:
                msg_id, outcome = end_tx_item(i, item)
                recorded, changed = resolve(msg_id, _REQUESTED[outcome], now, group=group)
            except HalfMQError as exc:
                results.append([exc.code, str(exc)])
                continue
            results.append(_REPLY_STATES[recorded])
            if changed:
                counters[_BY_PRODUCER[recorded]] += 1
                changes.append((msg_id, recorded))
        if not changes:
            s.reply(rid, reply_many)
            return
        self._append_outcomes(changes, reply_to=(s, rid, reply_many))

    def resolve_transaction(self: EmbeddedEngine, msg_id: str, state: TxState,
                            by: str = "operator") -> asyncio.Future[Any] | None:
        """Record an outcome once (T6), decided ``by`` "operator" or "check" (a check-back
        answer). Returns the append future, or None if nothing changed.

        Raises ``TransactionStateError`` for an unknown id or a conflicting outcome.
        """
        recorded, changed = self.tx.resolve(msg_id, state, time.time())
        if not changed:
            return None
        self.counters[f"tx_{recorded.value}_{by}"] += 1
        return self._append_outcomes([(msg_id, recorded)], by=by)

    def _append_outcomes(self: EmbeddedEngine, outcomes: list[tuple[str, TxState]],
                         reply_to: tuple[Session, int, dict[str, Any]] | None = None,
                         by: str = "producer") -> asyncio.Future[Any] | None:
        """Queue the outcome record of ``outcomes`` (one ``RT_TX_OP``) into this loop
        iteration's append, after the reference record of each commit (an index entry
        pointing at the stored half record). When durable: the client request ``reply_to``
        is answered, or (without one) the returned future resolves. The record says who
        decided (``by``: producer, check, operator) and after how many check-backs each."""
        store = self.store
        assert store is not None
        tx_get = self.tx.get
        metas = self._half_meta
        delays = self._half_delays
        b = _BY_CODES.get(by, "?")
        records: list[NewRecord] = []
        ops: list[list[Any]] = []
        commits: dict[tuple[str, int], tuple[list[str], list[tuple[int, int, int]]]] = {}
        for msg_id, state in outcomes:
            hm = tx_get(msg_id)
            assert hm is not None
            op = [msg_id, _OUTCOME_CODES[state], hm.pos, b, hm.checks]
            meta = metas.pop(msg_id, None)
            delay = delays.pop(msg_id, None)
            if state is TxState.COMMITTED:
                if meta is None:  # not remembered (e.g. recovered from an older log): read the header
                    half = store.read(hm.pos)
                    meta = (half.header[H_QUEUE], tag_hash(half.header[H_TAGS]), half.size)
                    delay = (header_ext(half.header) or {}).get("d")  # type: ignore[arg-type]
                if delay:  # delayed from the commit: scheduled, not visible yet; its schedule
                    # record and its outcome: one append of their own
                    self._schedule_commit(hm, meta, delay, [NewRecord(RT_TX_OP, tx_op_header([op]), b"",
                                                                      IndexTarget(OP_TOPIC, 0))])
                    continue
                topic = hm.topic
                key = (topic, meta[0] % self._ensure_topic(topic))
                queue = commits.get(key)
                if queue is None:
                    queue = commits[key] = ([], [])
                queue[0].append(msg_id)
                queue[1].append((hm.pos, meta[2], meta[1] & 0xFFFFFFFF))
            ops.append(op)
        for (topic, qid), (ids, refs) in commits.items():  # one record per queue
            records.append(NewRecord(RT_COMMIT_REF, {"ids": ids}, b"", RefsTarget(topic, qid, refs)))
        if ops:  # last: a torn write that kept it kept the references before it
            records.append(NewRecord(RT_TX_OP, tx_op_header(ops), b"", IndexTarget(OP_TOPIC, 0)))
        fut = asyncio.get_running_loop().create_future() if reply_to is None else None
        self._queue_records(records, reply_to or fut)
        return fut

    def _commits_without_outcome(self: EmbeddedEngine, outcomes: dict[str, tuple[TxState, float]]) -> list[str]:
        """Recovery: the commits a crash left without their outcome record.

        An END_TX's commit references go into the log before its outcome record, in one
        write. A crash that kept the references but cut the outcome off leaves them as the
        last records of the log (the store's ``recovered_refs_tail``). Their messages are
        already visible, and the producer asked for exactly that, so they count as
        committed: each is added to ``outcomes`` (at its reference's store time) and
        returned, for :meth:`_record_recovered_commits` to write its outcome record.
        """
        store = self.store
        assert store is not None
        lost: list[str] = []
        for pos in store.recovered_refs_tail:
            rec = store.read(pos)
            ids = rec.header.get("ids") if rec.rtype == RT_COMMIT_REF else None
            if not isinstance(ids, list):
                continue  # (a scheduled message's release)
            for msg_id in ids:
                if msg_id not in outcomes:
                    outcomes[msg_id] = (TxState.COMMITTED, rec.store_time / 1000.0)
                    lost.append(msg_id)
        return lost

    async def _record_recovered_commits(self: EmbeddedEngine, lost: list[str]) -> None:
        """Write the outcome record (``by`` recovery) of the commits found by
        :meth:`_commits_without_outcome`, durably, before the broker serves anyone."""
        store = self.store
        assert store is not None
        ops = []
        for msg_id in lost:
            hm = self.tx.get(msg_id)
            if hm is not None and hm.state is TxState.COMMITTED:
                ops.append([msg_id, _OUTCOME_CODES[TxState.COMMITTED], hm.pos, _BY_CODES["recovery"], hm.checks])
        if not ops:
            return
        _stored, written = store.append([NewRecord(RT_TX_OP, tx_op_header(ops), b"", IndexTarget(OP_TOPIC, 0))])
        await store.flush()  # written and fsynced, whatever the flush mode: one write, one fsync
        await written
        self.counters["tx_committed_recovery"] += len(ops)
        log.warning("recovery: %d committed transactions had lost their outcome record (the log's "
                    "end was cut after their commit references); recorded them as committed: %s",
                    len(ops), ", ".join(op[0] for op in ops[:10]) + (", ..." if len(ops) > 10 else ""))

    async def _tx_check_loop(self: EmbeddedEngine) -> None:
        interval = self.config.tx_check_interval
        while True:
            # wake at the next due check (so a check comes soon after --tx-timeout), at
            # least every --tx-check-interval
            due = self.tx.next_due_at()
            delay = interval if due is None else min(interval, max(0.01, due - time.time()))
            await asyncio.sleep(delay)
            try:
                now = time.time()
                if now >= self._next_forget:
                    # resolved transactions keep only their final state after a minute
                    # (enough to answer a repeated END_TX), so memory does not grow per message
                    self.tx.forget_resolved(now - _RESOLVED_KEPT)
                    self._next_forget = now + _RESOLVED_KEPT / 2
                self.run_tx_checks()
            except Exception:
                log.exception("transaction check failed")

    def run_tx_checks(self: EmbeddedEngine) -> None:
        """One check-back scan: abandon overdue ones, ask producers about due ones.

        At most one check per transaction is outstanding; a check is counted when it was
        answered (UNKNOWN or a listener failure) or went unanswered for ``_check_timeout``
        on a live connection -- never merely for being sent, so a slow producer is not
        flooded and a late but real answer is not overtaken by abandonment.
        """
        now = time.time()
        for hm in self.tx.abandon_overdue(now):
            self._abandoned(hm.msg_id)
        for hm in self.tx.due_checks(now):
            if hm.msg_id in self._checks_in_flight:
                continue
            conn = self.producers_by_id.get(hm.producer_id)
            if conn is None or conn.closed:
                live = [c for c in self.producers_by_group.get(hm.group, ()) if not c.closed]
                conn = live[0] if live else None
            # the next check is scheduled now; it is counted only when answered
            self.tx.check_unreached(hm.msg_id, now)
            if conn is None:
                self.counters["checks_unreached"] += 1
                continue
            try:
                rec = self.store.read(hm.pos)  # type: ignore[union-attr]
            except Exception:
                log.exception("cannot read half message %s", hm.msg_id)
                continue
            wire = build_wire(rec, hm.topic, rec.header[H_QUEUE], -1, 0)
            fut = conn.request(Op.CHECK, {"m": wire})
            self.counters["checks_sent"] += 1
            timer = asyncio.get_running_loop().call_later(self._check_timeout, _time_out, fut)
            self._checks_in_flight[hm.msg_id] = fut
            fut.add_done_callback(lambda f, mid=hm.msg_id, t=timer: self._check_answered(mid, f, t))

    @property
    def _check_timeout(self: EmbeddedEngine) -> float:
        """How long a check-back may go unanswered before it counts as an UNKNOWN answer."""
        return max(5.0, 2 * self.config.tx_check_interval)

    def _check_answered(self: EmbeddedEngine, msg_id: str, fut: asyncio.Future[Any],
                        timer: asyncio.TimerHandle | None = None) -> None:
        if timer is not None:
            timer.cancel()
        self._checks_in_flight.pop(msg_id, None)
        now = time.time()
        state = None
        exc = None if fut.cancelled() else fut.exception()
        if fut.cancelled() or isinstance(exc, BrokerUnavailableError):
            self.counters["checks_lost"] += 1
            return  # the connection went away: the check did not reach anyone, not counted
        if exc is None:
            answer = fut.result()
            state = answer.get("state") if isinstance(answer, dict) else None
            self.counters["checks_answered"] += 1
        else:
            self.counters["checks_failed"] += 1  # no answer in time, or the listener failed
        # answered (or timed out on a live connection): one check that reached a producer
        self.tx.check_reached(msg_id, now)
        try:
            if state == "COMMIT":
                self.resolve_transaction(msg_id, TxState.COMMITTED, by="check")
                return
            if state == "ROLLBACK":
                self.resolve_transaction(msg_id, TxState.ROLLED_BACK, by="check")
                return
        except TransactionStateError as err:
            recorded = self.tx.state_of(msg_id)
            if recorded is TxState.ABANDONED:
                log.warning("check-back answered %s for %s after it was abandoned: the outcome "
                            "stays ABANDONED (%s)", state, msg_id, err)
            return  # resolved meanwhile by an END_TX: the recorded outcome stands
        # UNKNOWN, a failing listener, or no answer in time
        if self.tx.check_unknown(msg_id, now) is TxState.ABANDONED:
            self._abandoned(msg_id)

    def _abandoned(self: EmbeddedEngine, msg_id: str) -> None:
        hm = self.tx.get(msg_id)
        log.warning("transaction %s abandoned after %d check-backs (topic %s, group %s): never delivered",
                    msg_id, hm.checks if hm else -1, hm.topic if hm else "?", hm.group if hm else "?")
        self.counters["tx_abandoned_check"] += 1
        self._append_outcomes([(msg_id, TxState.ABANDONED)], by="check")

