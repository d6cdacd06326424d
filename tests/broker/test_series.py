"""The console's per-second series (broker.frontends.http.series): deltas of counters, lag
as it is, fsync latency from the histogram, new series padded, bounded."""

from __future__ import annotations

from broker.frontends.http.series import MAX_SERIES, Series

BUCKETS = [("0.001", 0), ("0.01", 0), ("+Inf", 0)]


def snap(topics=None, groups=None, counters=None, fsync=None, fsync_sum=0.0):
    return {"topics": topics or {}, "groups": groups or {}, "counters": counters or {},
            "histograms": {"fsync_seconds": fsync or BUCKETS, "fsync_seconds_sum": fsync_sum}}


def group(delivered, lag, topic="t"):
    return {"delivered": delivered, "lag": lag, "topic_names": [topic]}


def test_deltas_lag_padding_and_fsync():
    s = Series(seconds=5)
    s.sample(snap({"t": (10, 100)}, {"g": group(4, 6)}), 1000.0)
    s.sample(snap({"t": (15, 150)}, {"g": group(9, 6)}, {"tx_committed_producer": 2, "tx_committed_check": 1},
                  [("0.001", 3), ("0.01", 4), ("+Inf", 4)], 0.006), 1001.0)
    s.sample(snap({"t": (15, 150), "u": (3, 3)}, {"g": group(9, 2)}, {"tx_committed_producer": 2,
                                                                       "tx_committed_check": 1},
                  [("0.001", 3), ("0.01", 4), ("+Inf", 4)], 0.006), 1002.0)
    out = s.to_json()
    assert out["t"] == [1000, 1001, 1002]
    series = out["series"]
    assert series["in/t"] == [None, 5, 0] and series["in/u"] == [None, None, 3]
    assert series["out/t"] == [None, 5, 0] and series["lag/g"] == [6, 6, 2]
    assert series["tx/committed"] == [None, 3, 0]  # by producer and by check-back together
    assert series["fsync/avg_ms"] == [None, 1.5, None] and series["fsync/p99_ms"] == [None, 10.0, None]
    assert s.to_json(last=1) == {"t": [1002], "series": {k: [v[-1]] for k, v in series.items()}}


def test_ring_is_bounded_and_series_per_kind_too():
    s = Series(seconds=3)
    for i in range(10):
        s.sample(snap({f"t{k}": (i, i) for k in range(MAX_SERIES + 20)}), 1000.0 + i)
    out = s.to_json()
    assert out["t"] == [1007, 1008, 1009]
    ins = [k for k in out["series"] if k.startswith("in/")]
    assert len(ins) == MAX_SERIES and all(len(out["series"][k]) == 3 for k in ins)
