"""Per-second series of the last hour, in memory, for the console's charts.

How this works
--------------
A task on the admin HTTP server's loop reads the engine's ``metrics_snapshot()`` once a
second (the same counters ``/metrics`` reads: nothing is counted per message for it) and
keeps, per series, the change since the previous second (messages in per topic, messages
out per topic, transaction outcomes, fsync latency from the histogram) or the value now
(lag per group), in ring buffers of ``SECONDS`` samples. Series are bounded: at most
``MAX_SERIES`` per kind (the snapshot itself caps topics and groups at 200); a series that
appears later is padded with nulls, one that goes away keeps its history until it has
only nulls. ``GET /api/series`` returns them all.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

__all__ = ["Series", "SECONDS", "MAX_SERIES", "run_sampler"]

log = logging.getLogger("halfmq.broker")

#: Samples kept: one hour of seconds.
SECONDS = 3600
#: Series kept per kind (in, out, lag, tx, fsync).
MAX_SERIES = 50


def _p99(buckets: list[tuple[str, int]], before: list[tuple[str, int]] | None) -> float | None:
    """The upper bound (seconds) of the bucket holding the 99th percentile of the
    observations between two cumulative histograms; None without observations."""
    counts = [n - (before[i][1] if before else 0) for i, (_le, n) in enumerate(buckets)]
    total = counts[-1] if counts else 0
    if total <= 0:
        return None
    goal = 0.99 * total
    for (le, _), n in zip(buckets, counts, strict=True):
        if n >= goal:
            return None if le == "+Inf" else float(le)
    return None


class Series:
    """The ring buffers of the console's charts (see the module docstring)."""

    def __init__(self, seconds: int = SECONDS) -> None:
        self.seconds = seconds
        self.times: deque[int] = deque(maxlen=seconds)
        self.data: dict[str, deque[float | None]] = {}
        self._prev: dict[str, Any] | None = None

    def _put(self, name: str, value: float | None, filled: dict[str, bool]) -> None:
        ring = self.data.get(name)
        if ring is None:
            kind = name.split("/", 1)[0]
            if sum(1 for n in self.data if n.startswith(kind + "/")) >= MAX_SERIES:
                return
            ring = self.data[name] = deque([None] * (len(self.times) - 1), maxlen=self.seconds)
        ring.append(value)
        filled[name] = True

    def sample(self, snap: dict[str, Any], now: float) -> None:
        """Add the second ending at ``now`` from an engine snapshot."""
        prev = self._prev
        self.times.append(int(now))
        filled: dict[str, bool] = {}
        if prev is not None:
            for topic, (n, _b) in snap["topics"].items():
                before = prev["topics"].get(topic, (0, 0))[0]
                self._put(f"in/{topic}", max(0, n - before), filled)
            out: dict[str, float] = {}
            for group, st in snap["groups"].items():
                before = prev["groups"].get(group, {}).get("delivered", 0)
                key = "+".join(st.get("topic_names", ())) or group
                out[key] = out.get(key, 0) + max(0, st["delivered"] - before)
            for key, n in out.items():
                self._put(f"out/{key}", n, filled)
            for key, n in snap["counters"].items():
                if key.startswith("tx_"):
                    outcome = key[3:].rpartition("_")[0]
                    name = f"tx/{outcome}"
                    delta = max(0, n - prev["counters"].get(key, 0))
                    if name in filled:
                        ring = self.data[name]
                        ring[-1] = (ring[-1] or 0) + delta
                    else:
                        self._put(name, delta, filled)
            hist = snap.get("histograms")
            old = prev.get("histograms")
            if hist is not None:
                cnt = hist["fsync_seconds"][-1][1] - (old["fsync_seconds"][-1][1] if old else 0)
                total = hist["fsync_seconds_sum"] - (old["fsync_seconds_sum"] if old else 0.0)
                self._put("fsync/avg_ms", round(1000 * total / cnt, 3) if cnt > 0 else None, filled)
                p99 = _p99(hist["fsync_seconds"], old["fsync_seconds"] if old else None)
                self._put("fsync/p99_ms", None if p99 is None else 1000 * p99, filled)
        for group, st in snap["groups"].items():
            self._put(f"lag/{group}", st["lag"], filled)
        for name, ring in list(self.data.items()):
            if name not in filled:
                ring.append(None)
                if all(v is None for v in ring):
                    del self.data[name]
        self._prev = snap

    def to_json(self, last: int | None = None) -> dict[str, Any]:
        """``{"t": [epoch s, ...], "series": {name: [value or null, ...]}}`` of the last
        ``last`` seconds (default: all kept)."""
        n = len(self.times) if last is None else min(last, len(self.times))
        start = len(self.times) - n
        return {"t": list(self.times)[start:],
                "series": {name: list(ring)[len(ring) - n:] if n else [] for name, ring in sorted(self.data.items())}}


async def run_sampler(series: Series, snapshot: Callable[[], dict[str, Any]], interval: float = 1.0) -> None:
    """Sample ``snapshot()`` into ``series`` every ``interval`` seconds, until cancelled."""
    loop = asyncio.get_running_loop()
    next_at = loop.time()
    while True:
        try:
            series.sample(snapshot(), time.time())
        except Exception:
            log.exception("console series: sampling failed")
        next_at += interval
        await asyncio.sleep(max(0.0, next_at - loop.time()))
