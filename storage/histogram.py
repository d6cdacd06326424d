"""A fixed-bucket histogram the store fills once per batch (fsync latency, batch sizes).

How this works
--------------
``observe(v)`` adds one to the first bucket whose upper bound is at least ``v`` (one
``bisect`` and two additions: cheap enough for every batch, never called per message) and
adds ``v`` to the sum. ``cumulative()`` gives the Prometheus form: ``(upper bound,
observations at or below it)`` with ``+Inf`` last. The buckets are fixed at creation.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence

__all__ = ["Histogram", "FSYNC_SECONDS_BUCKETS", "BATCH_RECORDS_BUCKETS"]

#: Upper bounds of the fsync latency buckets, in seconds.
FSYNC_SECONDS_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                         1.0, 2.5, 10.0)
#: Upper bounds of the batch size buckets, in records.
BATCH_RECORDS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


class Histogram:
    """Counts of observations per bucket, and their sum (see the module docstring)."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last: above every bound
        self.total = 0.0

    def observe(self, value: float) -> None:
        """Count one observation of ``value``."""
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    @property
    def count(self) -> int:
        """Observations so far."""
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, int]]:
        """``[(upper bound as text, observations at or below it), ..., ("+Inf", all)]``."""
        out = []
        n = 0
        for bound, c in zip((*self.bounds, float("inf")), self.counts, strict=True):
            n += c
            out.append(("+Inf" if bound == float("inf") else repr(float(bound)), n))
        return out
