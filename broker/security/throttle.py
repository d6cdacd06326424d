"""Slowing down repeated login failures from one address, without I/O.

How this works
--------------
``LoginThrottle`` counts failed logins per client address (the IP, not the port). The
first ``FREE_FAILURES`` failures within ``WINDOW`` seconds cost nothing; after that, each
failure makes the address wait before its next attempt: ``FIRST_WAIT`` seconds, doubling
with every further failure, at most ``MAX_WAIT``. An attempt made while the address must
wait is refused at once, without looking at the password, so guessing is slowed to one
try per wait whatever the number of connections. A success does not reset the count
(one known password must not buy more guesses at another); the count is forgotten
``WINDOW`` seconds after the last failure. At most ``MAX_ADDRESSES`` addresses are
remembered (the oldest forgotten first), so memory stays bounded.

Time is an argument (``now``, monotonic seconds): tests use made-up clocks.
"""

from __future__ import annotations

from collections import OrderedDict

__all__ = ["LoginThrottle", "FREE_FAILURES", "FIRST_WAIT", "MAX_WAIT", "WINDOW", "MAX_ADDRESSES"]

#: Failures per address within WINDOW that cost nothing.
FREE_FAILURES = 5
#: Wait after the first failure past FREE_FAILURES, in seconds; doubles with each further one.
FIRST_WAIT = 2.0
#: Longest wait, in seconds.
MAX_WAIT = 60.0
#: Seconds after the last failure when an address's count is forgotten.
WINDOW = 600.0
#: Addresses remembered at most.
MAX_ADDRESSES = 10_000


class LoginThrottle:
    """Failed logins per address (see the module docstring)."""

    def __init__(self, *, free_failures: int = FREE_FAILURES, first_wait: float = FIRST_WAIT,
                 max_wait: float = MAX_WAIT, window: float = WINDOW,
                 max_addresses: int = MAX_ADDRESSES) -> None:
        self.free_failures = free_failures
        self.first_wait = first_wait
        self.max_wait = max_wait
        self.window = window
        self.max_addresses = max_addresses
        # address -> (failures, time of the last failure)
        self._failures: OrderedDict[str, tuple[int, float]] = OrderedDict()

    def wait_left(self, address: str, now: float) -> float:
        """Seconds ``address`` must still wait before its next attempt (0: it may try now)."""
        entry = self._failures.get(address)
        if entry is None:
            return 0.0
        count, last = entry
        if now - last >= self.window:
            del self._failures[address]
            return 0.0
        return max(0.0, last + self._wait_after(count) - now)

    def failed(self, address: str, now: float) -> float:
        """Record a failed login from ``address``; return the wait it now has (0 if none)."""
        entry = self._failures.pop(address, None)
        count = 1 if entry is None or now - entry[1] >= self.window else entry[0] + 1
        self._failures[address] = (count, now)
        while len(self._failures) > self.max_addresses:
            self._failures.popitem(last=False)
        return self._wait_after(count)

    def failures(self, address: str) -> int:
        """Failures remembered for ``address``."""
        entry = self._failures.get(address)
        return 0 if entry is None else entry[0]

    def _wait_after(self, count: int) -> float:
        extra = count - self.free_failures
        if extra <= 0:
            return 0.0
        return min(self.max_wait, self.first_wait * 2 ** min(extra - 1, 30))
