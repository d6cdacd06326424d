"""A circuit breaker for one webhook endpoint (no I/O; the caller passes the time).

How this works
--------------
::

    CLOSED ──TRIP (K consecutive failures)──▶ OPEN ──COOLED (cool-down over)──▶ HALF_OPEN
      ▲                                                                          │ │
      └────────────────────────────── SUCCESS (of the probe) ────────────────────┘ │
                                      OPEN ◀── FAILURE (of the probe) ─────────────┘

CLOSED admits every request and counts consecutive failures; a success resets the count.
``failures_to_open`` in a row trip it OPEN: nothing is admitted until ``cooldown`` seconds
have passed. Then it is HALF_OPEN and admits exactly one request, the *probe*: its success
closes the breaker, its failure opens it for another cool-down. Results of requests
admitted before the breaker opened (still in flight then) change nothing once it is open,
and in HALF_OPEN only the probe's result counts.

The states and events are Enums and every change goes through one transition table
(``broker.core.lifecycle.transition``), as the other lifecycles of the broker.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum

from broker.core.lifecycle import transition

__all__ = ["Admission", "BreakerEvent", "BreakerState", "BREAKER_TRANSITIONS", "CircuitBreaker"]


class BreakerState(Enum):
    """Whether requests reach the endpoint."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class BreakerEvent(Enum):
    """What happens to a breaker."""

    SUCCESS = "success"
    FAILURE = "failure"
    TRIP = "trip"  # failures_to_open consecutive failures
    COOLED = "cooled"  # the cool-down is over


class Admission(Enum):
    """Whether a request may go: no, as an ordinary request, or as the half-open probe."""

    REFUSED = 0
    NORMAL = 1
    PROBE = 2


BREAKER_TRANSITIONS: Mapping[tuple[BreakerState, BreakerEvent], BreakerState] = {
    (BreakerState.CLOSED, BreakerEvent.SUCCESS): BreakerState.CLOSED,
    (BreakerState.CLOSED, BreakerEvent.FAILURE): BreakerState.CLOSED,
    (BreakerState.CLOSED, BreakerEvent.TRIP): BreakerState.OPEN,
    (BreakerState.OPEN, BreakerEvent.SUCCESS): BreakerState.OPEN,
    (BreakerState.OPEN, BreakerEvent.FAILURE): BreakerState.OPEN,
    (BreakerState.OPEN, BreakerEvent.COOLED): BreakerState.HALF_OPEN,
    (BreakerState.HALF_OPEN, BreakerEvent.SUCCESS): BreakerState.CLOSED,
    (BreakerState.HALF_OPEN, BreakerEvent.FAILURE): BreakerState.OPEN,
}


class CircuitBreaker:
    """See the module docstring. ``failures_to_open`` >= 1, ``cooldown`` in seconds."""

    def __init__(self, *, failures_to_open: int, cooldown: float) -> None:
        self.failures_to_open = failures_to_open
        self.cooldown = cooldown
        self.state = BreakerState.CLOSED
        self.consecutive_failures = 0
        self.opened_at: float | None = None  # when it last opened
        self.retry_at: float | None = None  # while OPEN: when the cool-down ends
        self.probe_out = False  # HALF_OPEN: the probe was admitted and has no result yet
        self.times_opened = 0

    def _go(self, event: BreakerEvent) -> BreakerState:
        self.state = transition(BREAKER_TRANSITIONS, self.state, event)
        return self.state

    def admit(self, now: float) -> Admission:
        """May a request go now? (OPEN turns HALF_OPEN here once the cool-down is over.)"""
        self.cool(now)
        if self.state is BreakerState.CLOSED:
            return Admission.NORMAL
        if self.state is BreakerState.HALF_OPEN and not self.probe_out:
            self.probe_out = True
            return Admission.PROBE
        return Admission.REFUSED

    def cool(self, now: float) -> bool:
        """OPEN -> HALF_OPEN if the cool-down is over; True if that happened now."""
        if self.state is BreakerState.OPEN and self.retry_at is not None and now >= self.retry_at:
            self._go(BreakerEvent.COOLED)
            self.retry_at = None
            self.probe_out = False
            return True
        return False

    def record(self, ok: bool, admission: Admission, now: float) -> BreakerState | None:
        """The result of a request admitted as ``admission``; returns the new state if it
        changed (OPEN or CLOSED), else None."""
        before = self.state
        if self.state is BreakerState.HALF_OPEN and admission is not Admission.PROBE:
            return None  # admitted before the breaker opened: only the probe decides
        if admission is Admission.PROBE:
            self.probe_out = False
        if ok:
            self._go(BreakerEvent.SUCCESS)
            if self.state is BreakerState.CLOSED:
                self.consecutive_failures = 0
        else:
            self._go(BreakerEvent.FAILURE)
            if before is BreakerState.CLOSED:
                self.consecutive_failures += 1
                if self.consecutive_failures >= self.failures_to_open:
                    self._go(BreakerEvent.TRIP)
            elif before is BreakerState.HALF_OPEN:
                self.consecutive_failures += 1
        if self.state is BreakerState.OPEN and before is not BreakerState.OPEN:
            self.opened_at = now
            self.retry_at = now + self.cooldown
            self.times_opened += 1
        return self.state if self.state is not before else None
