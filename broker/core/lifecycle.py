"""Lifecycles as data: the states of a transaction and of a delivery, and their transitions.

How this works
--------------
Each lifecycle is an ``Enum`` of states, an ``Enum`` of events and one transition table,
a dict ``{(state, event): new_state}``. ``transition(table, state, event)`` is the only way
a state changes: it returns the new state, or raises ``InvalidTransition`` for any pair
that is not in the table. Nothing is implied: a pair that is missing is forbidden, and a
state with no outgoing pair is terminal.

A transaction (half message)::

    PREPARED ──COMMIT──▶ COMMITTED
       │ ├─────ROLLBACK──▶ ROLLED_BACK
       │ └─────ABANDON───▶ ABANDONED        (after --tx-check-max check-backs)
       └─CHECK_UNKNOWN─▶ PREPARED           (the producer does not know yet)

Terminal states refuse every event, including the outcome they already hold: repeating
an outcome is idempotent, but that is decided by the owner of the state (see
``broker.core.transactions``), not by pretending the repeat is a transition.

A delivery (one message for one consumer group)::

    READY ──LEASE──▶ LEASED ──ACK──▶ ACKED
                       │
                       ├──FAIL / EXPIRE──▶ RETRY_WAIT ──RETRY_DUE──▶ READY
                       └──DEAD_LETTER───▶ DEAD_LETTERED   (its last allowed delivery failed)
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum
from typing import TypeVar

__all__ = [
    "DELIVERY_TRANSITIONS",
    "TX_TRANSITIONS",
    "DeliveryEvent",
    "DeliveryState",
    "InvalidTransition",
    "TxEvent",
    "TxState",
    "is_terminal",
    "transition",
]


class _Lifecycle(Enum):
    """Members are singletons compared by identity: hash them the same way. Enum's own
    ``__hash__`` is a Python function, and states and events are dict keys (transition
    tables, per-state counts) once or twice per message."""

    __hash__ = object.__hash__


class TxState(_Lifecycle):
    """The state of a transaction (a half message)."""

    PREPARED = "prepared"
    COMMITTED = "committed"
    ROLLED_BACK = "rolled_back"
    ABANDONED = "abandoned"


class TxEvent(_Lifecycle):
    """What can happen to a transaction."""

    COMMIT = "commit"
    ROLLBACK = "rollback"
    ABANDON = "abandon"
    CHECK_UNKNOWN = "check_unknown"


class DeliveryState(_Lifecycle):
    """The state of one message's delivery to one consumer group."""

    READY = "ready"
    LEASED = "leased"
    ACKED = "acked"
    RETRY_WAIT = "retry_wait"
    DEAD_LETTERED = "dead_lettered"


class DeliveryEvent(_Lifecycle):
    """What can happen to a delivery."""

    LEASE = "lease"              # handed to a consumer
    ACK = "ack"                  # the listener returned SUCCESS
    FAIL = "fail"                # RECONSUME_LATER or an exception from the listener
    EXPIRE = "expire"            # not acked within --ack-timeout
    RETRY_DUE = "retry_due"      # the retry delay has passed
    DEAD_LETTER = "dead_letter"  # the last allowed delivery failed: move to %DLQ%<group>


TX_TRANSITIONS: Mapping[tuple[TxState, TxEvent], TxState] = {
    (TxState.PREPARED, TxEvent.COMMIT): TxState.COMMITTED,
    (TxState.PREPARED, TxEvent.ROLLBACK): TxState.ROLLED_BACK,
    (TxState.PREPARED, TxEvent.ABANDON): TxState.ABANDONED,
    (TxState.PREPARED, TxEvent.CHECK_UNKNOWN): TxState.PREPARED,
}

DELIVERY_TRANSITIONS: Mapping[tuple[DeliveryState, DeliveryEvent], DeliveryState] = {
    (DeliveryState.READY, DeliveryEvent.LEASE): DeliveryState.LEASED,
    (DeliveryState.LEASED, DeliveryEvent.ACK): DeliveryState.ACKED,
    (DeliveryState.LEASED, DeliveryEvent.FAIL): DeliveryState.RETRY_WAIT,
    (DeliveryState.LEASED, DeliveryEvent.EXPIRE): DeliveryState.RETRY_WAIT,
    (DeliveryState.LEASED, DeliveryEvent.DEAD_LETTER): DeliveryState.DEAD_LETTERED,
    (DeliveryState.RETRY_WAIT, DeliveryEvent.RETRY_DUE): DeliveryState.READY,
}


class InvalidTransition(ValueError):
    """An event that the lifecycle's transition table does not allow in the current state."""

    def __init__(self, state: Enum, event: Enum) -> None:
        super().__init__(f"{event.name} is not allowed in state {state.name}")
        self.state = state
        self.event = event


S = TypeVar("S", bound=Enum)
E = TypeVar("E", bound=Enum)


def transition(table: Mapping[tuple[S, E], S], state: S, event: E) -> S:
    """Return the state that ``event`` leads to from ``state`` according to ``table``.

    Raises ``InvalidTransition`` (a ``ValueError``) if the pair is not in the table.
    """
    try:
        return table[(state, event)]
    except KeyError:
        raise InvalidTransition(state, event) from None


def is_terminal(table: Mapping[tuple[S, E], S], state: S) -> bool:
    """Return True if no event leads out of ``state`` in ``table``."""
    return not any(src is state for src, _ in table)
