"""The transaction table: half messages, their outcomes and their check-backs, without I/O.

How this works
--------------
A transactional send stores a *half message* in the log and registers it here with
``add()``: it is PREPARED, invisible to consumers. Then one of three things happens:

1. The producer reports an outcome (END_TX). The shell calls ``resolve(msg_id, COMMITTED
   or ROLLED_BACK, now)``. The first outcome is recorded (the shell appends an outcome
   record to the log and, for a commit, points the topic's queue at the stored half
   record). The same outcome again is answered with the recorded state and
   ``changed=False`` -- nothing is appended twice. A *conflicting* outcome (ROLLBACK after
   COMMIT, anything but the same after ABANDONED) raises ``TransactionStateError`` and
   changes nothing. Only the producer group that sent a half message may report its
   outcome (``group=``): another group gets ``AuthError`` and changes nothing, so a
   producer can never resolve someone else's transaction (an operator passes ``OPERATOR``). This is where we beat RocketMQ, whose END_TX is fire-and-forget and
   can publish a late COMMIT twice.

2. No outcome arrives. ``tx_timeout`` after ``prepared_at`` the half message is *due*:
   the shell's scanner calls ``abandon_overdue(now)`` then ``due_checks(now)`` and, for
   each due one, asks a producer of its group (the instance that sent it first, then any
   live member) through ``check_local_transaction``:

   - the request reached a producer: ``check_reached(msg_id, now)`` -- counted, and the
     next check is scheduled ``tx_check_interval`` later;
   - no live producer: ``check_unreached(msg_id, now)`` -- *not* counted (RocketMQ counts
     it), retried ``tx_check_interval`` later;
   - the producer answered COMMIT/ROLLBACK: ``resolve()`` as in 1;
   - it answered UNKNOWN, failed or timed out: ``check_unknown(msg_id, now)``, which
     abandons the transaction once ``tx_check_max`` checks have reached a producer.

3. ``tx_check_max`` checks reached a producer and none resolved it: the transaction is
   ABANDONED (never delivered; the shell logs a WARNING, records it in the log, and the
   admin API lists it). A late COMMIT after that raises ``TransactionStateError``.

Time is an argument, never read here: every method that needs it takes ``now``, the
broker's wall clock in seconds (``time.time()``), so a half message's age survives a
restart and never depends on the producer's clock. No asyncio, no sockets, no logging:
the table is tested in microseconds with a made-up clock.

Recovery (T7): on start the shell replays the log -- ``replay_prepared()`` for every half
record, ``replay_outcome()`` for every outcome record -- then calls ``after_replay(now)``
so that half messages whose time has come are checked right away.

Memory: resolved entries are kept whole until ``forget_resolved(before)`` drops them
(ABANDONED ones stay whole: the admin API lists them); after that only their final state
and check count are remembered (one int per ``msg_id``, the most recent
``forgotten_capacity`` of them), which is enough to answer a repeated END_TX. Resolved
entries wait in a queue in the order they were resolved, so forgetting costs O(1) per
entry, never a scan of the table; with ``resolved_keep`` set, only the most recent
``resolved_keep`` resolved entries are held whole: each resolution forgets the oldest
beyond that, so the table never builds up (a long-lived object per transaction is work
for the garbage collector, and a big batch to drop at once a pause on the event loop).
"""

from __future__ import annotations

import builtins
import math
from collections import Counter, OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass

from broker.core.lifecycle import TX_TRANSITIONS, TxEvent, TxState, transition
from protocol.errors import AuthError, TransactionStateError

__all__ = ["HalfMessage", "HalfMessageTable", "TxState", "OPERATOR"]

#: ``resolve(group=OPERATOR)``: an outcome set by an operator, not by a producer group
#: (no group name can be ``*``).
OPERATOR = "*"

_STATES = tuple(TxState)
_STATE_INDEX = {state: i for i, state in enumerate(_STATES)}
#: Looked up once: an Enum class attribute costs ~60 ns more than a module global in
#: Python 3.11, and these are read once or twice per transaction.
_PREPARED, _ABANDONED = TxState.PREPARED, TxState.ABANDONED
_OUTCOME_EVENTS = {TxState.COMMITTED: TxEvent.COMMIT, TxState.ROLLED_BACK: TxEvent.ROLLBACK}
_FINAL_EVENTS = {**_OUTCOME_EVENTS, TxState.ABANDONED: TxEvent.ABANDON}


@dataclass(slots=True)
class HalfMessage:
    """What the broker knows about one half message (one transaction).

    ``pos`` is the log position of the stored half record; ``prepared_at`` and
    ``resolved_at`` are broker wall-clock seconds; ``checks`` counts check-backs that
    reached a producer; ``next_check_at`` is when the next check-back is due.
    """

    msg_id: str
    topic: str
    group: str
    producer_id: str
    keys: tuple[str, ...]
    pos: int
    prepared_at: float
    state: TxState = TxState.PREPARED
    checks: int = 0
    next_check_at: float = 0.0
    resolved_at: float | None = None

    @property
    def resolved(self) -> bool:
        """True once the transaction has a final state."""
        return self.state is not TxState.PREPARED


class HalfMessageTable:
    """Every known transaction of the broker, keyed by the half message's ``msg_id``.

    ``tx_timeout``: age (seconds) of an unresolved half message before its first check;
    ``tx_check_interval``: seconds between checks; ``tx_check_max``: checks that reach a
    producer before the transaction is abandoned; ``forgotten_capacity``: how many final
    states of forgotten (``forget_resolved``) transactions are remembered.
    """

    def __init__(self, *, tx_timeout: float, tx_check_interval: float, tx_check_max: int,
                 forgotten_capacity: int = 1_000_000, resolved_keep: int | None = None) -> None:
        if tx_timeout < 0:
            raise ValueError(f"tx_timeout must not be negative, got {tx_timeout}")
        if tx_check_interval <= 0:
            raise ValueError(f"tx_check_interval must be > 0, got {tx_check_interval}")
        if tx_check_max < 0:
            raise ValueError(f"tx_check_max must not be negative, got {tx_check_max}")
        if forgotten_capacity < 0:
            raise ValueError(f"forgotten_capacity must not be negative, got {forgotten_capacity}")
        self.tx_timeout = float(tx_timeout)
        self.tx_check_interval = float(tx_check_interval)
        self.tx_check_max = tx_check_max
        self.forgotten_capacity = forgotten_capacity
        self._entries: dict[str, HalfMessage] = {}
        self._pending: dict[str, HalfMessage] = {}   # the PREPARED subset of _entries
        # forgotten: msg_id -> checks * 8 + index of the final state in _STATES (an int: no
        # object per transaction for the garbage collector to walk)
        self._forgotten: OrderedDict[str, int] = OrderedDict()
        self._resolved: deque[HalfMessage] = deque()  # resolved entries held whole, in resolution order
        self.resolved_keep = resolved_keep
        self._counts: Counter[TxState] = Counter()

    # ------------------------------------------------------------------ queries

    def __len__(self) -> int:
        """Number of transactions held in full (pending and not yet forgotten)."""
        return len(self._entries)

    def __contains__(self, msg_id: object) -> bool:
        return msg_id in self._entries or msg_id in self._forgotten

    def get(self, msg_id: str) -> HalfMessage | None:
        """Return the half message ``msg_id``, or None if unknown or forgotten."""
        return self._entries.get(msg_id)

    def state_of(self, msg_id: str) -> TxState | None:
        """Return the state of ``msg_id`` (also for forgotten ones), or None if unknown."""
        entry = self._entries.get(msg_id)
        if entry is not None:
            return entry.state
        code = self._forgotten.get(msg_id)
        return None if code is None else _STATES[code & 7]

    def checks_of(self, msg_id: str) -> int | None:
        """Return how many check-backs reached a producer for ``msg_id`` (also for forgotten
        ones), or None if unknown."""
        entry = self._entries.get(msg_id)
        if entry is not None:
            return entry.checks
        code = self._forgotten.get(msg_id)
        return None if code is None else code >> 3

    def list(self, state: TxState | None = None) -> builtins.list[HalfMessage]:
        """Return the held half messages (all, or those in ``state``), oldest first."""
        if state is TxState.PREPARED:
            source: Iterable[HalfMessage] = self._pending.values()
        elif state is None:
            source = self._entries.values()
        else:
            source = (e for e in self._entries.values() if e.state is state)
        return sorted(source, key=_age_key)

    @property
    def pending_count(self) -> int:
        """Number of PREPARED transactions."""
        return len(self._pending)

    def min_pending_pos(self) -> int | None:
        """Return the lowest log position of a PREPARED half message, or None if none.

        Retention must not delete the log segment holding it.
        """
        return min((e.pos for e in self._pending.values()), default=None)

    def next_due_at(self) -> float | None:
        """Return the earliest ``next_check_at`` of a PREPARED half message (when to wake up)."""
        return min((e.next_check_at for e in self._pending.values()), default=None)

    @property
    def stats(self) -> dict[str, int]:
        """Counts of the transactions this table remembers, by state name (``"PREPARED"`` ...)."""
        return {state.name: self._counts[state] for state in TxState}

    # ------------------------------------------------------------------ commands

    def add(self, msg_id: str, *, topic: str, group: str, producer_id: str,
            keys: Iterable[str], pos: int, now: float) -> HalfMessage:
        """Register a half message just stored at log position ``pos``; return it (PREPARED).

        Its first check is due at ``now + tx_timeout``. Raises ``ValueError`` if ``msg_id``
        is already known (the broker assigns unique ids, so that is a bug).
        """
        if msg_id in self._entries or msg_id in self._forgotten:  # (``in self``, without the call)
            raise ValueError(f"transaction {msg_id!r} already exists")
        return self._insert(HalfMessage(
            msg_id, topic, group, producer_id, tuple(keys), pos, now,
            next_check_at=now + self.tx_timeout,
        ))

    def resolve(self, msg_id: str, outcome: TxState, now: float, *,
                group: str | None = OPERATOR) -> tuple[TxState, bool]:
        """Apply an outcome (COMMITTED or ROLLED_BACK) reported for ``msg_id`` by producer
        ``group`` (``OPERATOR``: by hand, any transaction).

        Returns ``(recorded_state, changed)``: ``changed`` is True only the first time, when
        the shell must record the outcome (and deliver a commit). The same outcome again
        returns ``(outcome, False)``. Raises ``TransactionStateError`` -- changing nothing --
        for an unknown ``msg_id`` or an outcome that conflicts with the recorded one
        (including any outcome for an ABANDONED transaction). Raises ``AuthError`` --
        changing nothing -- if ``group`` is not the group that sent the half message (known
        while the entry is held whole). Raises ``ValueError`` if ``outcome`` is not
        COMMITTED or ROLLED_BACK.
        """
        event = _OUTCOME_EVENTS.get(outcome)
        if event is None:
            raise ValueError(f"an outcome must be COMMITTED or ROLLED_BACK, not {outcome!r}")
        entry = self._entries.get(msg_id)
        if entry is not None and group != OPERATOR and group != entry.group:
            raise AuthError(
                f"transaction {msg_id!r} belongs to producer group {entry.group!r}: "
                f"{'a producer without a group' if group is None else f'producer group {group!r}'} "
                "may not resolve it; nothing changed")
        current = entry.state if entry is not None else self.state_of(msg_id)
        if current is None:
            raise TransactionStateError(f"unknown transaction {msg_id!r}: no such half message")
        if current is outcome:
            return current, False
        if current is not _PREPARED:
            raise TransactionStateError(
                f"transaction {msg_id!r} is already {current.name}; "
                f"{outcome.name} refused, nothing changed"
            )
        assert entry is not None
        self._finish(entry, transition(TX_TRANSITIONS, current, event), now)
        return outcome, True

    def due_checks(self, now: float) -> builtins.list[HalfMessage]:
        """Return the PREPARED half messages whose next check is due at ``now``, oldest first.

        Those that have used up ``tx_check_max`` checks are not returned: they are for
        ``abandon_overdue()``, which the scanner calls first.
        """
        due = [e for e in self._pending.values()
               if e.next_check_at <= now and e.checks < self.tx_check_max]
        due.sort(key=_age_key)
        return due

    def check_reached(self, msg_id: str, now: float) -> None:
        """A check-back for ``msg_id`` was delivered to a producer: count it, schedule the next.

        Does nothing if ``msg_id`` is no longer PREPARED (resolved meanwhile) or unknown.
        """
        entry = self._pending.get(msg_id)
        if entry is not None:
            entry.checks += 1
            entry.next_check_at = now + self.tx_check_interval

    def check_unreached(self, msg_id: str, now: float) -> None:
        """No live producer could be asked about ``msg_id``: not counted; retry later.

        Does nothing if ``msg_id`` is no longer PREPARED or unknown.
        """
        entry = self._pending.get(msg_id)
        if entry is not None:
            entry.next_check_at = now + self.tx_check_interval

    def check_unknown(self, msg_id: str, now: float) -> TxState | None:
        """The producer answered UNKNOWN to a check (or failed, or timed out).

        Returns ``TxState.ABANDONED`` if this ends the transaction, because
        ``tx_check_max`` checks have reached a producer -- the shell then logs a WARNING and
        records it. Otherwise (also if ``msg_id`` is no longer PREPARED) returns None; the
        next check stays scheduled.
        """
        entry = self._pending.get(msg_id)
        if entry is None:
            return None
        transition(TX_TRANSITIONS, entry.state, TxEvent.CHECK_UNKNOWN)
        if entry.checks >= self.tx_check_max:
            self._finish(entry, transition(TX_TRANSITIONS, entry.state, TxEvent.ABANDON), now)
            return TxState.ABANDONED
        return None

    def abandon_overdue(self, now: float) -> builtins.list[HalfMessage]:
        """Abandon every PREPARED half message that used up its checks and is due again.

        A check that reached the producer but got no answer before the next one was due
        counts as unanswered. Returns the abandoned ones, oldest first (the shell logs a
        WARNING for each and records them).
        """
        overdue = [e for e in self._pending.values()
                   if e.checks >= self.tx_check_max and e.next_check_at <= now]
        overdue.sort(key=_age_key)
        for entry in overdue:
            self._finish(entry, transition(TX_TRANSITIONS, entry.state, TxEvent.ABANDON), now)
        return overdue

    def forget_resolved(self, before: float) -> int:
        """Drop the full entries of transactions resolved before ``before``; return how many.

        Their final states stay answerable (``resolve``, ``state_of``, ``in``) as long as they
        are among the most recent ``forgotten_capacity`` forgotten ones.
        """
        return self._forget(before)

    def _forget(self, before: float, keep: int = 0) -> int:
        """Forget resolved entries, oldest first, resolved before ``before`` and beyond the
        ``keep`` most recent; return how many."""
        resolved = self._resolved
        n = 0
        while len(resolved) > keep:
            entry = resolved[0]
            if entry.resolved_at is not None and entry.resolved_at >= before:
                break
            resolved.popleft()
            if entry.state is not _ABANDONED and self._entries.get(entry.msg_id) is entry:
                del self._entries[entry.msg_id]
                self._remember(entry.msg_id, entry.state, entry.checks)
                n += 1
        return n

    # ------------------------------------------------------------------ recovery

    def replay_prepared(self, msg_id: str, *, topic: str, group: str, producer_id: str,
                        keys: Iterable[str], pos: int, prepared_at: float,
                        checks: int = 0) -> None:
        """Recovery: a half record found in the log. Registers it as PREPARED.

        ``prepared_at`` is the broker's store time of the record, in seconds. ``checks``
        restores a check count if the shell persists one. A record seen again (or one whose
        outcome is already known) is ignored.
        """
        if msg_id in self:
            return
        self._insert(HalfMessage(
            msg_id, topic, group, producer_id, tuple(keys), pos, prepared_at,
            checks=checks, next_check_at=prepared_at + self.tx_timeout,
        ))

    def replay_outcome(self, msg_id: str, state: TxState, resolved_at: float) -> None:
        """Recovery: an outcome record (COMMITTED, ROLLED_BACK or ABANDONED) found in the log.

        The first recorded outcome wins; a later one for the same transaction is ignored
        (the live path never records two). An outcome whose half record is gone (deleted
        by retention) is remembered as a forgotten final state, so a repeated END_TX is
        still answered.
        """
        if state not in _FINAL_EVENTS:
            raise ValueError(f"a replayed outcome must be a final state, not {state!r}")
        entry = self._entries.get(msg_id)
        if entry is None:
            if msg_id not in self._forgotten:
                self._counts[state] += 1
                self._remember(msg_id, state)
            return
        if entry.state is TxState.PREPARED:
            self._finish(entry, transition(TX_TRANSITIONS, entry.state, _FINAL_EVENTS[state]),
                         resolved_at)

    def after_replay(self, now: float) -> None:
        """Recovery done: a PREPARED half message is checked at ``prepared_at + tx_timeout``,
        or right away (``now``) if that moment has passed while the broker was down."""
        for entry in self._pending.values():
            entry.next_check_at = max(entry.prepared_at + self.tx_timeout, now)

    # ------------------------------------------------------------------ internals

    def _insert(self, entry: HalfMessage) -> HalfMessage:
        self._entries[entry.msg_id] = entry
        self._pending[entry.msg_id] = entry
        self._counts[_PREPARED] += 1
        return entry

    def _finish(self, entry: HalfMessage, state: TxState, now: float) -> None:
        del self._pending[entry.msg_id]
        self._counts[entry.state] -= 1
        self._counts[state] += 1
        entry.state = state
        entry.resolved_at = now
        self._resolved.append(entry)
        if self.resolved_keep is not None:
            self._forget(math.inf, self.resolved_keep)

    def _remember(self, msg_id: str, state: TxState, checks: int = 0) -> None:
        """Keep the final state of a forgotten transaction, evicting the oldest past capacity."""
        self._forgotten[msg_id] = checks << 3 | _STATE_INDEX[state]
        while len(self._forgotten) > self.forgotten_capacity:
            _, evicted = self._forgotten.popitem(last=False)
            self._counts[_STATES[evicted & 7]] -= 1


def _age_key(entry: HalfMessage) -> tuple[float, int]:
    return (entry.prepared_at, entry.pos)
