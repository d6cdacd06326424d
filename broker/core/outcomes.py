"""The outcomes of deliveries: acks, nacks, settles by receipt handle, expiries.

How this works
--------------
One part of :class:`broker.core.delivery.GroupDelivery` (a mixin over the group's state,
``broker.core.group_state``), still without I/O: every outcome is applied to the group's
leases, cursors and FIFO order at once, and what must be stored comes back as a
``PendingRecord``.

- **Acks.** ``ack_many`` takes one push member's ``(token, ok)`` results in order; an ok
  one ends its lease (LEASED → ACKED), leaves its queue's in-flight set and is reported by
  ``take_acked`` for the shell to log. A pull consumer's ack, nack or lease change comes
  by receipt handle through ``settle``, from any connection of the group.
- **Failures.** A failed ack, a nack that runs out or an expired lease (``expire``) is a
  failed attempt: ``_fail`` returns a retry record for ``%RETRY%<group>`` (queue: the
  delay level of this attempt, or ``EXPIRED_LEVEL`` for an expiry), or, once the
  attempts allowed are used up, a dead-letter record for ``%DLQ%<group>`` whose index
  entry points at the original record (the body is not copied). A FIFO message group is
  held through its retry.
- **Durable.** The offset of a failed delivery stays in flight until the shell reports
  its record stored (``durable``): only then is it done, and a dead-lettered FIFO message
  releases its group.
"""

from __future__ import annotations

from collections.abc import Iterable

from broker.core.group_state import DEFAULT_MAX_RECONSUME, EXPIRED_LEVEL, GroupState, PendingRecord
from broker.core.leases import Delivery, StaleHandleError
from broker.core.lifecycle import DELIVERY_TRANSITIONS, DeliveryEvent, DeliveryState, transition
from broker.core.records import RT_DLQ, RT_RETRY, tag_hash
from protocol.names import dlq_topic
from storage import IndexTarget, NewRecord

__all__ = ["DeliveryOutcomes"]

_LEASED = DeliveryState.LEASED
_ACKED = DELIVERY_TRANSITIONS[(_LEASED, DeliveryEvent.ACK)]


class DeliveryOutcomes(GroupState):
    """The outcomes part of :class:`broker.core.delivery.GroupDelivery` (see the module's
    "How this works")."""

    def ack(self, member_id: str, token: int, ok: bool, now: float) -> PendingRecord | None:
        """A push member's result for a delivery. Unknown or expired tokens are ignored (None)."""
        pending = self.ack_many(member_id, ((token, ok),), now)
        return pending[0] if pending else None

    def ack_many(self, member_id: str, acks: Iterable[tuple[int, bool]], now: float) -> list[PendingRecord]:
        """``ack`` for each ``(token, ok)`` of one push member, in order; returns the records
        to append (of the failed ones)."""
        pending: list[PendingRecord] = []
        by_token = self.leases.by_token
        m = self.members.get(member_id)
        mleases = m.leases if m is not None else None
        cursors = self.cursors
        acked = self.acked
        fifo = self.fifo
        n_ok = 0
        last_qkey: tuple[str, int] | None = None  # acks come in runs of one queue's leases
        inflight: set[int] = set()
        for token, ok in acks:
            d = by_token.get(token)  # (LeaseTable.pop, inline: once per message)
            if d is None or d.member != member_id:
                continue  # unknown, expired or another member's
            del by_token[token]
            if mleases is not None:
                mleases.pop(token, None)
            if not ok:
                self.stats["failed"] += 1
                pending.append(self._fail(d, expired=False))
                continue
            state = d.state  # a live lease is LEASED: its one ACK transition, without the lookup
            d.state = _ACKED if state is _LEASED else transition(DELIVERY_TRANSITIONS, state, DeliveryEvent.ACK)
            n_ok += 1
            qkey = d.qkey
            if qkey is not last_qkey:
                inflight = cursors[qkey].inflight
                last_qkey = qkey
            inflight.discard(d.offset)
            acked.append([qkey[0], qkey[1], d.offset])
            if d.mgroup is not None and fifo is not None:
                fifo.done(d.mgroup)
        self.stats["acked"] += n_ok
        return pending

    def settle(self, handle: object, action: str, ms: int, now: float) -> tuple[PendingRecord | None, str | None]:
        """Act on a lease by its receipt handle, from any connection of the group:
        ``"ack"``; ``"nack"`` (redeliver once ``ms`` milliseconds have passed; a negative
        ``ms`` waits the group's retry delay); ``"cid"`` (the lease now ends ``ms`` ms from
        now); ``"renew"`` (the same, keeping the handle: a broker renewing the lease of a
        live push consumer); ``"dlq"`` (dead-letter it now, as a consumer that gave up on it
        after its own retries). Returns a record to append (if any) and, for ``"cid"``, the
        new handle. Raises ``StaleHandleError`` for a handle whose lease ended, expired or
        changed."""
        d = self.leases.by_handle(handle)
        if action == "ack":
            return self._finish(d, True), None
        if action == "nack":
            if ms < 0:
                delays = self.retry_delays
                ms = int(1000 * delays[min(d.reconsume_times, len(delays) - 1)]) if delays else 0
            self.leases.change_deadline(d, now + ms / 1000.0)  # it runs out: a failed attempt
            return None, None
        if action == "cid":
            self.leases.change_deadline(d, now + ms / 1000.0)
            return None, self.leases.handle(d)
        if action == "renew":
            self.leases.renew(d, now + ms / 1000.0)
            return None, None
        if action == "dlq":
            self._release(d)
            self.stats["failed"] += 1
            return self._fail(d, expired=False, dead=True), None
        raise ValueError(f"unknown action {action!r}: expected 'ack', 'nack', 'cid', 'renew' or 'dlq'")

    def handle(self, token: int) -> str:
        """The receipt handle of the live lease ``token``."""
        d = self.leases.get(token)
        if d is None:
            raise StaleHandleError("no such lease")
        return self.leases.handle(d)

    def _finish(self, d: Delivery, ok: bool) -> PendingRecord | None:
        self._release(d)
        if ok:
            d.state = transition(DELIVERY_TRANSITIONS, d.state, DeliveryEvent.ACK)
            self.stats["acked"] += 1
            self.cursors[d.qkey].inflight.discard(d.offset)
            self.acked.append([d.qkey[0], d.qkey[1], d.offset])
            if d.mgroup is not None and self.fifo is not None:
                self.fifo.done(d.mgroup)
            return None
        self.stats["failed"] += 1
        return self._fail(d, expired=False)

    def expire(self, now: float) -> list[PendingRecord]:
        """Leases past their deadline count as failed attempts (C5)."""
        out: list[PendingRecord] = []
        for d in self.leases.expired(now):
            m = self.members.get(d.member)
            if m is not None:
                m.leases.pop(d.token, None)
            self.stats["expired"] += 1
            out.append(self._fail(d, expired=True))
        return out

    def next_expiry(self) -> float | None:
        """Deadline of the earliest live lease."""
        return self.leases.next_deadline()

    def _release(self, d: Delivery) -> None:
        self.leases.pop(d.token)
        m = self.members.get(d.member)
        if m is not None:
            m.leases.pop(d.token, None)

    def _max_reconsume(self, d: Delivery) -> int:
        if self.max_reconsume_times is not None:
            return self.max_reconsume_times
        m = self.members.get(d.member)
        if m is not None and not m.receiver:
            return m.max_reconsume_times
        for other in self.members.values():
            if other.topic == d.topic and not other.receiver:
                return other.max_reconsume_times
        return DEFAULT_MAX_RECONSUME

    def _fail(self, d: Delivery, *, expired: bool, dead: bool = False) -> PendingRecord:
        event = DeliveryEvent.EXPIRE if expired else DeliveryEvent.FAIL
        header = {
            "id": d.msg_id,
            "rp": d.msg_pos,
            "rt": d.reconsume_times + 1,
            "ot": d.topic,
            "oq": d.origin_queue,
            "oo": d.origin_offset,
            "g": self.group,
        }
        if dead or d.reconsume_times >= self._max_reconsume(d):
            d.state = transition(DELIVERY_TRANSITIONS, d.state, DeliveryEvent.DEAD_LETTER)
            self.stats["dead_lettered"] += 1
            header["rt"] = d.reconsume_times
            rec = NewRecord(RT_DLQ, header, b"", IndexTarget(dlq_topic(self.group), 0, tag_hash(d.tags), ref_pos=d.msg_pos))
            return PendingRecord(rec, d.qkey, d.offset, True, d.mgroup)
        d.state = transition(DELIVERY_TRANSITIONS, d.state, event)
        if d.mgroup is not None and self.fifo is not None:
            self.fifo.block(d.mgroup)  # held through its retry: nothing of its group overtakes it
        n = len(self.retry_delays)
        level = EXPIRED_LEVEL if expired or not n else min(d.reconsume_times, n - 1)
        rec = NewRecord(RT_RETRY, header, b"", IndexTarget(self.retry_topic, level, tag_hash(d.tags)))
        return PendingRecord(rec, d.qkey, d.offset, False, d.mgroup)

    def durable(self, pr: PendingRecord) -> None:
        """The retry / dead-letter record ``pr`` is stored: its source offset is done (and
        logged as such), and a dead-lettered FIFO message releases its group."""
        cur = self.cursors.get(pr.qkey)
        if cur is not None:
            cur.inflight.discard(pr.offset)
        self.acked.append([pr.qkey[0], pr.qkey[1], pr.offset])
        if pr.dead_letter and pr.mgroup is not None and self.fifo is not None:
            self.fifo.done(pr.mgroup)

    def record_durable(self, qkey: tuple[str, int], offset: int) -> None:
        """:meth:`durable` for a record known only by its source (no FIFO group)."""
        self.durable(PendingRecord(NewRecord(0, {}), qkey, offset, False))
