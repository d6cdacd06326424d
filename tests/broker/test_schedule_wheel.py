"""The schedule wheel without I/O: a dict for the log, a made-up clock.

``LogSim`` plays the engine's part: it appends schedule / release / recall records to an
in-memory log, walks the wheel at the times the test chooses, persists snapshots and, on
a "crash", throws the wheel away and recovers from the last snapshot plus the records
written after it -- exactly what the embedded engine does with its store.
"""

from __future__ import annotations

import random

import pytest

from broker.core.records import RT_RECALL, RT_RELEASE, RT_SCHEDULE
from broker.core.schedule import (
    E_DUE,
    E_POS,
    E_TOPIC,
    BudgetExceeded,
    ScheduleWheel,
    SnapshotError,
)

T0 = 1_700_000_000_000  # ms: the made-up clock starts here
LEAD_MS = 500


class LogSim:
    """An engine in miniature over an in-memory log (see the module docstring)."""

    def __init__(self, *, slots: int = 64, now_ms: int = T0) -> None:
        self.log: dict[int, tuple[int, dict]] = {}
        self.sched: list[int] = []  # positions of %SCHED% records, in order
        self.next_pos = 100
        self.wheel = ScheduleWheel(slots=slots, cursor=now_ms // 1000 - 1)
        self.released: list[tuple[int, int]] = []  # (message pos, release time ms)
        self.due: dict[int, int] = {}  # message pos -> due ms
        self.topic: dict[int, str] = {}

    def _append(self, rtype: int, header: dict) -> int:
        pos = self.next_pos
        self.next_pos += 10
        self.log[pos] = (rtype, header)
        self.sched.append(pos)
        return pos

    def read(self, pos: int) -> dict:
        rtype, header = self.log[pos]
        assert rtype == RT_SCHEDULE
        return header

    def send(self, due_ms: int, topic: str = "t") -> int:
        """Store a message due at ``due_ms`` and its schedule record; return its position."""
        msg = self.next_pos
        self.next_pos += 10
        self.due[msg] = due_ms
        self.topic[msg] = topic
        entry = (due_ms, msg, 50, topic, 0, 0, 1, 0)
        header = self.wheel.place(due_ms // 1000, [entry])
        self.wheel.placed(header, self._append(RT_SCHEDULE, header))
        return msg

    def send_many(self, dues: list[int], topic: str = "t") -> list[int]:
        """Several messages of one iteration: one schedule record per due second."""
        by_second: dict[int, list] = {}
        msgs = []
        for due in dues:
            msg = self.next_pos
            self.next_pos += 10
            self.due[msg] = due
            self.topic[msg] = topic
            msgs.append(msg)
            by_second.setdefault(due // 1000, []).append((due, msg, 50, topic, 0, 0, 1, 0))
        for second in sorted(by_second):
            header = self.wheel.place(second, by_second[second])
            self.wheel.placed(header, self._append(RT_SCHEDULE, header))
        return msgs

    def walk(self, now_ms: int) -> list[int]:
        """What the engine's timer does at ``now_ms``: load ahead, release what is due."""
        w = self.wheel
        target = (now_ms + LEAD_MS) // 1000
        w.catch_up_start(target)
        out = []
        while w.cursor < target:
            w.load_next(self.read)
            out += self._release(w.pop_due(now_ms), now_ms)
        out += self._release(w.pop_due(now_ms), now_ms)
        return out

    def _release(self, entries: list, now_ms: int) -> list[int]:
        if not entries:
            return []
        self._append(RT_RELEASE, {"r": [[e[E_POS], e[E_TOPIC]] for e in entries]})
        self.released += [(e[E_POS], now_ms) for e in entries]
        return [e[E_POS] for e in entries]

    def recall(self, msg: int, now_ms: int) -> bool:
        new = self.wheel.recall(msg, self.topic[msg], self.due[msg], now_ms)
        if new:
            self._append(RT_RECALL, {"r": msg, "t": self.topic[msg]})
        return new

    def snapshot(self) -> bytes:
        return self.wheel.to_bytes({"off": len(self.sched)})

    def crash_and_recover(self, snap: bytes, *, slots: int | None = None) -> None:
        """Lose the wheel; rebuild it from ``snap`` and the records written after it."""
        w, extra = ScheduleWheel.from_bytes(snap)
        for pos in self.sched[extra["off"]:]:
            rtype, header = self.log[pos]
            if rtype == RT_SCHEDULE:
                w.replay_schedule(header, pos)
            elif rtype == RT_RELEASE:
                w.replay_release(header)
            elif rtype == RT_RECALL:
                w.replay_recall(header)
        w.finish_replay()
        self.wheel = w if slots is None else w.resized(slots)


def test_released_in_due_order_at_their_millisecond_never_early():
    sim = LogSim()
    dues = [T0 + d for d in (1500, 250, 999, 1000, 3001, 2000, 250)]
    msgs = [sim.send(d) for d in dues]
    assert sim.wheel.scheduled() == 7 and sim.wheel.counts == {"t": 7}
    for now in range(T0, T0 + 4000, 7):  # a timer that fires every 7 ms
        sim.walk(now)
    assert sorted(p for p, _ in sim.released) == sorted(msgs)
    for pos, at in sim.released:
        assert sim.due[pos] <= at < sim.due[pos] + 7  # never early, late by less than a tick
    assert [sim.due[p] for p, _ in sim.released] == sorted(dues)
    assert sim.wheel.scheduled() == 0 and not sim.wheel.heap


def test_the_heap_holds_only_what_is_due_soon():
    sim = LogSim(slots=4000)
    sim.send_many([T0 + 10_000 + k for k in range(5000)] + [T0 + 3_000_000 + k for k in range(5000)])
    sim.walk(T0 + 100)
    assert not sim.wheel.heap  # nothing loaded: the schedule is in the log, not in memory
    sim.walk(T0 + 9_600)
    assert len(sim.wheel.heap) == 1000  # the second starting at +10 s, loaded ahead
    assert sim.wheel.scheduled() == 10_000


def test_an_entry_due_in_a_loaded_second_goes_to_the_heap():
    sim = LogSim()
    sim.walk(T0)  # loads up to the second containing T0 + LEAD
    msg = sim.send(T0 + 20)
    header = sim.log[sim.sched[-1]][1]
    assert header.get("h") == 1  # in no chain
    assert sim.wheel.next_due_ms() == T0 + 20
    assert sim.walk(T0 + 19) == [] and sim.walk(T0 + 20) == [msg]


def test_recall_drops_the_entry_and_is_idempotent():
    sim = LogSim()
    a, b = sim.send(T0 + 3000), sim.send(T0 + 3000)
    assert sim.recall(a, T0 + 100) is True
    assert sim.recall(a, T0 + 200) is False  # again: nothing new to record
    assert sim.wheel.counts == {"t": 1}
    sim.walk(T0 + 5000)
    assert [p for p, _ in sim.released] == [b]
    assert sim.wheel.is_recalled(a) and sim.recall(a, T0 + 6000) is False
    with pytest.raises(ValueError):
        sim.recall(b, T0 + 6000)  # its time has come


def test_recall_of_an_entry_already_in_the_heap():
    sim = LogSim()
    a = sim.send(T0 + 1200)
    sim.walk(T0 + 900)  # loaded
    assert sim.wheel.heap
    assert sim.recall(a, T0 + 1000)
    assert sim.walk(T0 + 1300) == [] and sim.wheel.scheduled() == 0


def test_counts_and_upcoming_in_due_order():
    sim = LogSim()
    sim.send_many([T0 + 5000, T0 + 2500], topic="a")
    sim.send_many([T0 + 2600, T0 + 9000], topic="b")
    sim.walk(T0)
    assert sim.wheel.counts == {"a": 2, "b": 2}
    order = [(e[E_TOPIC], e[E_DUE] - T0) for e in sim.wheel.upcoming(sim.read)]
    assert order == [("a", 2500), ("b", 2600), ("a", 5000), ("b", 9000)]
    with pytest.raises(BudgetExceeded):
        list(sim.wheel.upcoming(sim.read, budget=1))


def test_low_pos_covers_chains_and_the_heap():
    sim = LogSim()
    assert sim.wheel.low_pos() is None
    first = sim.send(T0 + 4000)
    sim.send(T0 + 8000)
    assert sim.wheel.low_pos() == first
    sim.walk(T0 + 3600)  # the first is in the heap now
    assert sim.wheel.low_pos() == first
    sim.walk(T0 + 4000)
    assert sim.wheel.low_pos() > first


def test_a_delay_longer_than_the_wheel_uses_the_overflow():
    sim = LogSim(slots=8)
    msgs = sim.send_many([T0 + 3000, T0 + 11_000, T0 + 19_000, T0 + 3_500])  # same slot, three laps
    assert sim.wheel.overflow
    for now in range(T0, T0 + 21_000, 50):
        sim.walk(now)
    assert sorted(p for p, _ in sim.released) == sorted(msgs)
    assert all(sim.due[p] <= at for p, at in sim.released)


def test_catch_up_after_a_long_downtime_releases_everything_once():
    sim = LogSim(slots=16)
    msgs = sim.send_many([T0 + k * 700 for k in range(1, 200)])
    snap = sim.snapshot()
    sim.crash_and_recover(snap)
    sim.walk(T0 + 10_000_000)  # ~3 hours later: a few hundred laps of the wheel
    assert sorted(p for p, _ in sim.released) == sorted(msgs)
    assert sim.wheel.scheduled() == 0 and not sim.wheel.overflow


def test_snapshot_round_trip_and_damage():
    sim = LogSim()
    sim.send_many([T0 + 1500, T0 + 30_000])
    sim.walk(T0 + 1200)
    snap = sim.snapshot()
    w, extra = ScheduleWheel.from_bytes(snap)
    assert extra == {"off": len(sim.sched)}
    assert (w.cursor, w.counts, w.heap) == (sim.wheel.cursor, sim.wheel.counts, sim.wheel.heap)
    assert list(w.heads) == list(sim.wheel.heads)
    damaged = bytearray(snap)
    damaged[len(damaged) // 2] ^= 0xFF
    with pytest.raises(SnapshotError):
        ScheduleWheel.from_bytes(bytes(damaged))
    with pytest.raises(SnapshotError):
        ScheduleWheel.from_bytes(b"something else")


def test_replay_filter_drops_entries_whose_commit_is_lost():
    sim = LogSim()
    a = sim.send(T0 + 2000)
    header = sim.log[sim.sched[-1]][1]
    w = ScheduleWheel(slots=64, cursor=T0 // 1000 - 1)
    w.replay_schedule(header, sim.sched[-1], keep=lambda e: e[E_POS] != a)
    w.finish_replay()
    assert w.counts == {} and a in w.skip
    w.load_next(sim.read)
    w.load_next(sim.read)
    w.load_next(sim.read)
    assert not w.heap and not w.skip


def test_resized_wheel_keeps_every_chain():
    sim = LogSim(slots=10)
    msgs = sim.send_many([T0 + k * 1000 + 1 for k in range(1, 40)])  # more seconds than slots
    sim.crash_and_recover(sim.snapshot(), slots=25)
    assert sim.wheel.slots == 25 and sim.wheel.scheduled() == 39
    for now in range(T0, T0 + 42_000, 100):
        sim.walk(now)
    assert sorted(p for p, _ in sim.released) == sorted(msgs)


@pytest.mark.parametrize("seed", range(40))
def test_crash_anywhere_none_lost_none_doubled_none_early(seed: int):
    """Random sends, recalls, walks, snapshots and crashes: after recovery every message
    not recalled is released exactly once, never before its time."""
    rnd = random.Random(seed)
    slots = rnd.choice([8, 12, 40])  # small wheels: collisions and overflow chains too
    sim = LogSim(slots=slots)
    now = T0
    snap = sim.snapshot()
    recalled: set[int] = set()
    for _step in range(300):
        now += rnd.choice([1, 3, 17, 120, 400, 999])
        action = rnd.random()
        if action < 0.35:
            sim.send_many([now + rnd.randint(1, 30_000) for _ in range(rnd.randint(1, 5))],
                          topic=rnd.choice("ab"))
        elif action < 0.45:
            pending = [p for p in sim.due if p not in recalled and sim.due[p] > now
                       and p not in {r for r, _ in sim.released}]
            if pending:
                p = rnd.choice(pending)
                sim.recall(p, now)
                recalled.add(p)
        elif action < 0.55:
            snap = sim.snapshot()
        elif action < 0.60:
            sim.crash_and_recover(snap)
        sim.walk(now)
    for _ in range(200):  # let everything come due
        now += 500
        sim.walk(now)
    released = [p for p, _ in sim.released]
    assert len(released) == len(set(released)), "a message was released twice"
    assert set(released) == set(sim.due) - recalled, "a message was lost, or a recalled one released"
    for p, at in sim.released:
        assert at >= sim.due[p], "released early"
    assert sim.wheel.scheduled() == 0 and not sim.wheel.heap
