"""broker.core.lifecycle: every (state, event) pair of both tables is either allowed or refused."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.core.lifecycle import (
    DELIVERY_TRANSITIONS,
    TX_TRANSITIONS,
    DeliveryEvent,
    DeliveryState,
    InvalidTransition,
    TxEvent,
    TxState,
    is_terminal,
    transition,
)

LIFECYCLES = [
    (TX_TRANSITIONS, TxState, TxEvent),
    (DELIVERY_TRANSITIONS, DeliveryState, DeliveryEvent),
]


def _pairs(table, states, events):
    return st.tuples(st.sampled_from(list(states)), st.sampled_from(list(events)))


@given(_pairs(TX_TRANSITIONS, TxState, TxEvent))
def test_tx_every_pair_is_allowed_or_refused(pair):
    _check_pair(TX_TRANSITIONS, *pair)


@given(_pairs(DELIVERY_TRANSITIONS, DeliveryState, DeliveryEvent))
def test_delivery_every_pair_is_allowed_or_refused(pair):
    _check_pair(DELIVERY_TRANSITIONS, *pair)


def _check_pair(table, state, event):
    if (state, event) in table:
        assert transition(table, state, event) is table[(state, event)]
    else:
        with pytest.raises(InvalidTransition) as exc:
            transition(table, state, event)
        assert isinstance(exc.value, ValueError)
        assert exc.value.state is state and exc.value.event is event
        assert state.name in str(exc.value) and event.name in str(exc.value)


@pytest.mark.parametrize(("table", "states", "events"), LIFECYCLES)
def test_exhaustively_every_pair(table, states, events):
    """The same walk without sampling: all |states| x |events| pairs."""
    allowed = 0
    for state, event in itertools.product(states, events):
        _check_pair(table, state, event)
        allowed += (state, event) in table
    assert allowed == len(table)


@pytest.mark.parametrize(("table", "states", "events"), LIFECYCLES)
def test_tables_only_use_their_own_enums(table, states, events):
    for (state, event), new_state in table.items():
        assert isinstance(state, states) and isinstance(new_state, states)
        assert isinstance(event, events)


def test_tx_table():
    assert dict(TX_TRANSITIONS) == {
        (TxState.PREPARED, TxEvent.COMMIT): TxState.COMMITTED,
        (TxState.PREPARED, TxEvent.ROLLBACK): TxState.ROLLED_BACK,
        (TxState.PREPARED, TxEvent.ABANDON): TxState.ABANDONED,
        (TxState.PREPARED, TxEvent.CHECK_UNKNOWN): TxState.PREPARED,
    }


def test_delivery_table():
    assert dict(DELIVERY_TRANSITIONS) == {
        (DeliveryState.READY, DeliveryEvent.LEASE): DeliveryState.LEASED,
        (DeliveryState.LEASED, DeliveryEvent.ACK): DeliveryState.ACKED,
        (DeliveryState.LEASED, DeliveryEvent.FAIL): DeliveryState.RETRY_WAIT,
        (DeliveryState.LEASED, DeliveryEvent.EXPIRE): DeliveryState.RETRY_WAIT,
        (DeliveryState.LEASED, DeliveryEvent.DEAD_LETTER): DeliveryState.DEAD_LETTERED,
        (DeliveryState.RETRY_WAIT, DeliveryEvent.RETRY_DUE): DeliveryState.READY,
    }


@pytest.mark.parametrize("state", [TxState.COMMITTED, TxState.ROLLED_BACK, TxState.ABANDONED])
@pytest.mark.parametrize("event", list(TxEvent))
def test_tx_terminal_states_have_no_exits(state, event):
    assert is_terminal(TX_TRANSITIONS, state)
    with pytest.raises(InvalidTransition):
        transition(TX_TRANSITIONS, state, event)


@pytest.mark.parametrize("state", [DeliveryState.ACKED, DeliveryState.DEAD_LETTERED])
@pytest.mark.parametrize("event", list(DeliveryEvent))
def test_delivery_terminal_states_have_no_exits(state, event):
    assert is_terminal(DELIVERY_TRANSITIONS, state)
    with pytest.raises(InvalidTransition):
        transition(DELIVERY_TRANSITIONS, state, event)


def test_non_terminal_states():
    assert not is_terminal(TX_TRANSITIONS, TxState.PREPARED)
    for state in (DeliveryState.READY, DeliveryState.LEASED, DeliveryState.RETRY_WAIT):
        assert not is_terminal(DELIVERY_TRANSITIONS, state)


@pytest.mark.parametrize(("table", "states", "events"), LIFECYCLES)
def test_every_state_is_reachable_from_the_start(table, states, events):
    start = next(iter(states))
    seen = {start}
    frontier = [start]
    while frontier:
        state = frontier.pop()
        for (src, _), dst in table.items():
            if src is state and dst not in seen:
                seen.add(dst)
                frontier.append(dst)
    assert seen == set(states)


@given(st.lists(st.sampled_from(list(DeliveryEvent)), max_size=30))
def test_delivery_random_walks_stay_in_the_table(events):
    """Apply random events from READY, skipping refused ones: a walk ends only in a terminal
    state or keeps going, and no state is ever reached without a table entry."""
    state = DeliveryState.READY
    for event in events:
        try:
            new_state = transition(DELIVERY_TRANSITIONS, state, event)
        except InvalidTransition:
            assert (state, event) not in DELIVERY_TRANSITIONS
            continue
        assert not is_terminal(DELIVERY_TRANSITIONS, state)
        state = new_state

