"""broker.core.transactions: the half-message table, with a made-up clock (no I/O, no sleeps)."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)

from broker.core.lifecycle import TxState
from broker.core.transactions import HalfMessage, HalfMessageTable
from protocol.errors import TransactionStateError

C, R, A, P = TxState.COMMITTED, TxState.ROLLED_BACK, TxState.ABANDONED, TxState.PREPARED
T0 = 1_700_000_000.0   # a wall-clock time


def make(tx_timeout=6.0, tx_check_interval=30.0, tx_check_max=3, **kw) -> HalfMessageTable:
    return HalfMessageTable(tx_timeout=tx_timeout, tx_check_interval=tx_check_interval,
                            tx_check_max=tx_check_max, **kw)


def add(table: HalfMessageTable, msg_id: str, now: float = T0, pos: int = 0,
        producer_id: str = "p1") -> HalfMessage:
    return table.add(msg_id, topic="transfer", group="producer_bank1", producer_id=producer_id,
                     keys=["tx-" + msg_id], pos=pos, now=now)


def snapshot(table: HalfMessageTable):
    return ([(e.msg_id, e.state, e.checks, e.next_check_at, e.resolved_at)
             for e in table.list()], table.stats)


# --------------------------------------------------------------------------- add / get


def test_add_registers_a_prepared_half_message():
    t = make()
    h = add(t, "m1", pos=42)
    assert h == HalfMessage("m1", "transfer", "producer_bank1", "p1", ("tx-m1",), 42, T0,
                            P, 0, T0 + 6.0, None)
    assert t.get("m1") is h
    assert t.get("nope") is None
    assert "m1" in t and "nope" not in t
    assert len(t) == 1 and t.pending_count == 1
    assert t.stats == {"PREPARED": 1, "COMMITTED": 0, "ROLLED_BACK": 0, "ABANDONED": 0}


def test_add_twice_is_a_bug():
    t = make()
    add(t, "m1")
    with pytest.raises(ValueError, match="already exists"):
        add(t, "m1")


def test_constructor_validates():
    with pytest.raises(ValueError):
        make(tx_check_interval=0)
    with pytest.raises(ValueError):
        make(tx_timeout=-1)
    with pytest.raises(ValueError):
        make(tx_check_max=-1)


# --------------------------------------------------------------------------- T6: resolve


@pytest.mark.parametrize("outcome", [C, R])
def test_resolve_records_the_first_outcome(outcome):
    t = make()
    add(t, "m1")
    assert t.resolve("m1", outcome, T0 + 1) == (outcome, True)
    h = t.get("m1")
    assert h.state is outcome and h.resolved_at == T0 + 1
    assert t.pending_count == 0
    assert t.stats[outcome.name] == 1 and t.stats["PREPARED"] == 0


@pytest.mark.parametrize("outcome", [C, R])
def test_same_outcome_again_changes_nothing(outcome):
    t = make()
    add(t, "m1")
    t.resolve("m1", outcome, T0 + 1)
    before = snapshot(t)
    assert t.resolve("m1", outcome, T0 + 2) == (outcome, False)
    assert t.resolve("m1", outcome, T0 + 3) == (outcome, False)
    assert snapshot(t) == before
    assert t.get("m1").resolved_at == T0 + 1


@pytest.mark.parametrize(("first", "second"), [(C, R), (R, C)])
def test_conflicting_outcome_raises_and_changes_nothing(first, second):
    t = make()
    add(t, "m1")
    t.resolve("m1", first, T0 + 1)
    before = snapshot(t)
    with pytest.raises(TransactionStateError, match=rf"already {first.name}.*{second.name}"):
        t.resolve("m1", second, T0 + 2)
    assert snapshot(t) == before


@pytest.mark.parametrize("outcome", [C, R])
def test_any_outcome_for_an_abandoned_transaction_raises(outcome):
    t = make(tx_check_max=1)
    add(t, "m1")
    t.check_reached("m1", T0 + 6)
    assert t.check_unknown("m1", T0 + 7) is A
    before = snapshot(t)
    with pytest.raises(TransactionStateError, match="already ABANDONED"):
        t.resolve("m1", outcome, T0 + 8)
    assert snapshot(t) == before


def test_unknown_transaction_raises():
    t = make()
    with pytest.raises(TransactionStateError, match="unknown transaction 'ghost'"):
        t.resolve("ghost", C, T0)
    assert len(t) == 0 and t.stats["COMMITTED"] == 0


@pytest.mark.parametrize("bad", [P, A])
def test_resolve_takes_only_commit_or_rollback(bad):
    t = make()
    add(t, "m1")
    with pytest.raises(ValueError, match="COMMITTED or ROLLED_BACK"):
        t.resolve("m1", bad, T0)
    assert t.get("m1").state is P


def test_transaction_state_error_is_the_protocol_error():
    assert TransactionStateError.code == 6


# --------------------------------------------------------------------------- check-back timing


def test_first_check_is_due_after_tx_timeout_then_every_interval():
    t = make(tx_timeout=6.0, tx_check_interval=30.0, tx_check_max=15)
    add(t, "m1")
    assert t.due_checks(T0) == []
    assert t.due_checks(T0 + 5.999) == []
    assert t.next_due_at() == T0 + 6.0
    assert [h.msg_id for h in t.due_checks(T0 + 6.0)] == ["m1"]
    t.check_reached("m1", T0 + 6.5)
    assert t.get("m1").checks == 1
    assert t.due_checks(T0 + 36.0) == []
    assert [h.msg_id for h in t.due_checks(T0 + 36.5)] == ["m1"]
    assert t.next_due_at() == T0 + 36.5


def test_due_checks_oldest_first_and_only_prepared():
    t = make(tx_timeout=1.0)
    add(t, "c", now=T0 + 2, pos=30)
    add(t, "a", now=T0, pos=10)
    add(t, "b", now=T0 + 1, pos=20)
    add(t, "d", now=T0 + 1.5, pos=25)
    t.resolve("d", C, T0 + 1.6)
    assert [h.msg_id for h in t.due_checks(T0 + 10)] == ["a", "b", "c"]
    assert [h.msg_id for h in t.due_checks(T0 + 2.5)] == ["a", "b"]
    assert t.next_due_at() == T0 + 1


def test_unreached_checks_are_not_counted():
    t = make(tx_check_max=2, tx_check_interval=10.0)
    add(t, "m1")
    now = T0 + 6
    for _ in range(10):
        assert [h.msg_id for h in t.due_checks(now)] == ["m1"]
        t.check_unreached("m1", now)
        assert t.get("m1").checks == 0
        assert t.due_checks(now + 9.9) == []
        assert t.abandon_overdue(now + 10) == []
        now += 10
    assert t.get("m1").state is P


def test_abandoned_after_tx_check_max_reached_checks_answered_unknown():
    t = make(tx_check_max=3, tx_check_interval=10.0)
    add(t, "m1")
    now = T0 + 6
    for n in range(1, 4):
        assert [h.msg_id for h in t.due_checks(now)] == ["m1"]
        t.check_reached("m1", now)
        result = t.check_unknown("m1", now + 1)
        assert t.get("m1").checks == n
        if n < 3:
            assert result is None and t.get("m1").state is P
        now += 10
    assert result is A
    h = t.get("m1")
    assert h.state is A and h.resolved_at == now - 10 + 1
    assert t.due_checks(now + 1000) == []
    assert t.list(A) == [h]
    assert t.stats["ABANDONED"] == 1


def test_last_check_unanswered_is_abandoned_when_due_again():
    t = make(tx_check_max=2, tx_check_interval=10.0)
    add(t, "m1")
    add(t, "m2", pos=5)
    t.check_reached("m1", T0 + 6)
    t.check_reached("m1", T0 + 16)     # second and last check, no answer yet
    t.check_reached("m2", T0 + 6)
    assert t.due_checks(T0 + 26) == [t.get("m2")]    # m1 used up its checks
    assert t.abandon_overdue(T0 + 25.9) == []
    abandoned = t.abandon_overdue(T0 + 26)
    assert [h.msg_id for h in abandoned] == ["m1"]
    assert abandoned[0].state is A and abandoned[0].resolved_at == T0 + 26
    assert t.get("m2").state is P


def test_a_late_answer_before_abandonment_still_resolves():
    t = make(tx_check_max=1, tx_check_interval=10.0)
    add(t, "m1")
    t.check_reached("m1", T0 + 6)
    assert t.resolve("m1", C, T0 + 15) == (C, True)
    assert t.abandon_overdue(T0 + 100) == []


def test_check_calls_on_resolved_or_unknown_ids_do_nothing():
    t = make(tx_check_max=1)
    add(t, "m1")
    t.resolve("m1", R, T0 + 1)
    before = snapshot(t)
    t.check_reached("m1", T0 + 2)
    t.check_unreached("m1", T0 + 2)
    assert t.check_unknown("m1", T0 + 2) is None
    t.check_reached("ghost", T0 + 2)
    t.check_unreached("ghost", T0 + 2)
    assert t.check_unknown("ghost", T0 + 2) is None
    assert snapshot(t) == before


def test_check_unknown_without_enough_checks_keeps_schedule():
    t = make(tx_check_max=5, tx_check_interval=10.0)
    add(t, "m1")
    t.check_reached("m1", T0 + 6)
    assert t.check_unknown("m1", T0 + 7) is None
    assert t.get("m1").next_check_at == T0 + 16


# --------------------------------------------------------------------------- queries


def test_list_and_min_pending_pos():
    t = make()
    assert t.min_pending_pos() is None and t.next_due_at() is None
    add(t, "a", now=T0, pos=300)
    add(t, "b", now=T0 + 1, pos=100)
    add(t, "c", now=T0 + 2, pos=200)
    assert t.min_pending_pos() == 100
    t.resolve("b", C, T0 + 3)
    assert t.min_pending_pos() == 200
    t.resolve("c", R, T0 + 3)
    assert t.min_pending_pos() == 300
    t.resolve("a", C, T0 + 3)
    assert t.min_pending_pos() is None
    assert [h.msg_id for h in t.list()] == ["a", "b", "c"]
    assert [h.msg_id for h in t.list(C)] == ["a", "b"]
    assert [h.msg_id for h in t.list(R)] == ["c"]
    assert t.list(P) == []


# --------------------------------------------------------------------------- forgetting


def test_forget_resolved_keeps_outcomes_answerable():
    t = make()
    add(t, "old")
    add(t, "new", pos=1)
    add(t, "open", pos=2)
    t.resolve("old", C, T0 + 1)
    t.resolve("new", R, T0 + 10)
    assert t.forget_resolved(T0 + 5) == 1
    assert t.get("old") is None and "old" in t
    assert t.state_of("old") is C
    assert t.resolve("old", C, T0 + 20) == (C, False)
    with pytest.raises(TransactionStateError, match="already COMMITTED"):
        t.resolve("old", R, T0 + 20)
    assert t.get("new").state is R and t.get("open").state is P
    assert t.stats == {"PREPARED": 1, "COMMITTED": 1, "ROLLED_BACK": 1, "ABANDONED": 0}
    with pytest.raises(ValueError, match="already exists"):
        add(t, "old")


def test_forgotten_outcomes_are_capped_oldest_first():
    t = make(forgotten_capacity=2)
    for i in range(4):
        add(t, f"m{i}", pos=i)
        t.resolve(f"m{i}", C, T0 + i)
    assert t.forget_resolved(T0 + 100) == 4
    assert [t.state_of(f"m{i}") for i in range(4)] == [None, None, C, C]
    assert t.stats["COMMITTED"] == 2
    with pytest.raises(TransactionStateError, match="unknown"):
        t.resolve("m0", C, T0 + 200)


def test_resolutions_forget_older_ones_as_they_go():
    t = make(resolved_keep=6)
    for i in range(100):
        add(t, f"m{i}", pos=i)
        if i == 10:  # an abandoned one stays whole (listed) however many follow
            for _ in range(3):
                t.check_reached("m10", T0 + 30)
                t.check_unknown("m10", T0 + 30)
            continue
        t.resolve(f"m{i}", C if i % 2 else R, T0 + i)
    # without any forget_resolved() call, only the last 6 resolved are held in full
    assert len(t) == 7 and t.get("m10").state is A
    assert t.get("m93") is None and t.get("m94").state is R and t.get("m99").state is C
    assert [t.state_of(f"m{i}") for i in (0, 1, 50)] == [R, C, R]  # still answerable
    assert t.resolve("m0", R, T0 + 200) == (R, False)
    assert t.stats["COMMITTED"] + t.stats["ROLLED_BACK"] == 99 and t.stats["ABANDONED"] == 1
    # an idle table forgets the rest when asked, abandoned ones excepted
    assert t.forget_resolved(T0 + 1000) == 6 and len(t) == 1


def test_forgotten_transactions_keep_their_check_count():
    t = make()
    add(t, "m")
    t.check_reached("m", T0 + 7)
    t.check_unknown("m", T0 + 7)
    t.check_reached("m", T0 + 40)
    t.resolve("m", C, T0 + 41)
    assert t.forget_resolved(T0 + 100) == 1 and t.get("m") is None
    assert (t.state_of("m"), t.checks_of("m")) == (C, 2)
    assert t.checks_of("nope") is None


def test_forgotten_capacity_zero_remembers_nothing():
    t = make(forgotten_capacity=0)
    add(t, "m1")
    t.resolve("m1", C, T0)
    assert t.forget_resolved(T0 + 1) == 1
    assert t.state_of("m1") is None
    assert t.stats["COMMITTED"] == 0


# --------------------------------------------------------------------------- recovery (T7)


def replay(t: HalfMessageTable, msg_id: str, prepared_at: float, pos: int = 0, **kw) -> None:
    t.replay_prepared(msg_id, topic="transfer", group="producer_bank1", producer_id="old-conn",
                      keys=("k",), pos=pos, prepared_at=prepared_at, **kw)


def test_replay_then_due():
    t = make(tx_timeout=6.0)
    replay(t, "old", T0 - 100, pos=1)       # long overdue: checked right away
    replay(t, "fresh", T0 - 2, pos=2)       # 4 s left of its timeout
    replay(t, "done", T0 - 50, pos=3)
    t.replay_outcome("done", C, T0 - 49)
    t.replay_prepared("old", topic="x", group="y", producer_id="z", keys=(), pos=99,
                      prepared_at=0.0)      # a duplicate record is ignored
    t.after_replay(T0)
    assert t.get("old").next_check_at == T0
    assert t.get("old").prepared_at == T0 - 100 and t.get("old").pos == 1
    assert t.get("fresh").next_check_at == T0 + 4
    assert [h.msg_id for h in t.due_checks(T0)] == ["old"]
    assert [h.msg_id for h in t.due_checks(T0 + 4)] == ["old", "fresh"]
    assert t.get("done").state is C and t.get("done").resolved_at == T0 - 49
    assert t.resolve("done", C, T0) == (C, False)
    assert t.min_pending_pos() == 1
    assert t.stats == {"PREPARED": 2, "COMMITTED": 1, "ROLLED_BACK": 0, "ABANDONED": 0}


def test_replay_first_outcome_wins_and_abandoned_is_replayed():
    t = make()
    replay(t, "m1", T0)
    t.replay_outcome("m1", A, T0 + 1)
    t.replay_outcome("m1", C, T0 + 2)
    assert t.get("m1").state is A and t.get("m1").resolved_at == T0 + 1
    with pytest.raises(TransactionStateError):
        t.resolve("m1", C, T0 + 3)


def test_replay_outcome_without_half_record_is_remembered():
    t = make()
    t.replay_outcome("gone", R, T0)
    assert t.get("gone") is None and t.state_of("gone") is R
    assert t.resolve("gone", R, T0 + 1) == (R, False)
    replay(t, "gone", T0 - 10)              # its half record turns up later: still resolved
    assert t.get("gone") is None and t.pending_count == 0
    assert t.stats["ROLLED_BACK"] == 1


def test_replay_outcome_must_be_final():
    t = make()
    with pytest.raises(ValueError):
        t.replay_outcome("m1", P, T0)


def test_replay_restores_check_counts():
    t = make(tx_check_max=2)
    replay(t, "m1", T0, checks=2)
    t.after_replay(T0 + 100)
    assert t.due_checks(T0 + 100) == []
    assert [h.msg_id for h in t.abandon_overdue(T0 + 100)] == ["m1"]


# --------------------------------------------------------------------------- state machine


class TransactionTableMachine(RuleBasedStateMachine):
    """Random adds, outcomes, check-backs and clock moves against a simple model."""

    ids = Bundle("ids")

    @initialize(max_checks=st.integers(0, 3), timeout=st.sampled_from([0.0, 1.0, 6.0]),
                interval=st.sampled_from([0.5, 3.0]))
    def setup(self, max_checks, timeout, interval):
        self.table = make(tx_timeout=timeout, tx_check_interval=interval,
                          tx_check_max=max_checks)
        self.max_checks = max_checks
        self.now = T0
        self.counter = 0
        self.model_state: dict[str, TxState] = {}
        self.model_checks: dict[str, int] = {}
        self.resolved_at: dict[str, float] = {}
        self.forgotten_before: dict[str, TxState] = {}

    @rule(target=ids, dt=st.floats(0, 2))
    def add(self, dt):
        self.now += dt
        self.counter += 1
        msg_id = f"m{self.counter}"
        add(self.table, msg_id, now=self.now, pos=self.counter)
        self.model_state[msg_id] = P
        self.model_checks[msg_id] = 0
        return msg_id

    @rule(msg_id=ids, outcome=st.sampled_from([C, R]))
    def resolve(self, msg_id, outcome):
        before = self.model_state[msg_id]
        if before is P:
            assert self.table.resolve(msg_id, outcome, self.now) == (outcome, True)
            self.model_state[msg_id] = outcome
            self.resolved_at[msg_id] = self.now
        elif before is outcome:
            assert self.table.resolve(msg_id, outcome, self.now) == (outcome, False)
        else:
            with pytest.raises(TransactionStateError):
                self.table.resolve(msg_id, outcome, self.now)

    @rule(msg_id=st.text(min_size=1, max_size=3), outcome=st.sampled_from([C, R]))
    def resolve_unknown(self, msg_id, outcome):
        with pytest.raises(TransactionStateError):
            self.table.resolve("x-" + msg_id, outcome, self.now)

    @rule(answer=st.sampled_from(["unknown", "reached-only", "unreached", "commit"]))
    def scan(self, answer):
        """One scanner pass: abandon the exhausted, then check every due one."""
        for h in self.table.abandon_overdue(self.now):
            assert self.model_state[h.msg_id] is P
            assert self.model_checks[h.msg_id] >= self.max_checks
            self.model_state[h.msg_id] = A
            self.resolved_at[h.msg_id] = self.now
        for h in self.table.due_checks(self.now):
            assert self.model_state[h.msg_id] is P
            assert self.model_checks[h.msg_id] < self.max_checks
            if answer == "unreached":
                self.table.check_unreached(h.msg_id, self.now)
                continue
            self.table.check_reached(h.msg_id, self.now)
            self.model_checks[h.msg_id] += 1
            if answer == "commit":
                assert self.table.resolve(h.msg_id, C, self.now) == (C, True)
                self.model_state[h.msg_id] = C
                self.resolved_at[h.msg_id] = self.now
            elif answer == "unknown":
                result = self.table.check_unknown(h.msg_id, self.now)
                if self.model_checks[h.msg_id] >= self.max_checks:
                    assert result is A
                    self.model_state[h.msg_id] = A
                    self.resolved_at[h.msg_id] = self.now
                else:
                    assert result is None

    @rule(dt=st.floats(0, 10))
    def advance(self, dt):
        self.now += dt

    @rule(age=st.floats(0, 20))
    def forget(self, age):
        self.table.forget_resolved(self.now - age)

    @invariant()
    def matches_model(self):
        if not hasattr(self, "table"):
            return
        for msg_id, state in self.model_state.items():
            assert self.table.state_of(msg_id) is state, msg_id
            h = self.table.get(msg_id)
            if h is not None:
                assert h.checks == self.model_checks[msg_id]
                if state is not P:
                    assert h.resolved_at == self.resolved_at[msg_id]
        counts = {s.name: sum(1 for v in self.model_state.values() if v is s) for s in TxState}
        assert self.table.stats == counts

    @invariant()
    def abandoned_only_after_max_reached_checks(self):
        if not hasattr(self, "table"):
            return
        for msg_id, state in self.model_state.items():
            if state is A:
                assert self.model_checks[msg_id] >= self.max_checks
            assert self.model_checks[msg_id] <= self.max_checks

    @invariant()
    def due_checks_are_prepared(self):
        if not hasattr(self, "table"):
            return
        for h in self.table.due_checks(self.now + 1000):
            assert h.state is P and self.model_state[h.msg_id] is P
        pending = [m for m, s in self.model_state.items() if s is P]
        assert self.table.pending_count == len(pending)
        assert self.table.min_pending_pos() == (
            min(int(m[1:]) for m in pending) if pending else None
        )


TransactionTableMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40,
                                                     deadline=None)
test_transaction_table_machine = TransactionTableMachine.TestCase
