"""``GET /metrics``: the broker's state and counters in the Prometheus text format.

How this works
--------------
Nothing is counted here and nothing per message anywhere: the engine keeps its counters per
batch, per request or per group (``metrics_snapshot``), the front ends count connections and
refused requests, and each scrape reads them all once and renders them through
``prometheus_client`` (no hand-written exposition). Names follow Prometheus conventions
(``halfmq_..._total`` for counters, base units); label cardinality is bounded — at most 200
topics and 200 groups by name (further topics are summed under ``topic="_other"``,
further groups are left out and counted in ``halfmq_groups``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

if TYPE_CHECKING:
    from broker.app import Broker

__all__ = ["render_metrics", "metric_families", "CONTENT_TYPE_LATEST"]

_GROUP_COUNTERS = (
    ("delivered", "halfmq_group_deliveries_total", "Messages leased to the group's consumers"),
    ("acked", "halfmq_group_acks_total", "Deliveries acked"),
    ("failed", "halfmq_group_failures_total", "Deliveries that failed (RECONSUME_LATER, an exception, a nack)"),
    ("expired", "halfmq_group_lease_expiries_total", "Deliveries whose lease ran out without an ack"),
    ("dead_lettered", "halfmq_group_dead_letters_total", "Messages moved to the group's dead-letter queue"),
)
_GROUP_GAUGES = (
    ("lag", "halfmq_group_lag_messages", "Messages of the consumed topics not yet done by the group"),
    ("in_flight", "halfmq_group_in_flight_messages", "Messages leased and not yet acked"),
    ("retrying", "halfmq_group_retrying_messages", "Failed messages waiting for their redelivery"),
    ("members", "halfmq_group_members", "Consumers (and pending pull requests) of the group"),
)
_STORE = (
    ("records", "halfmq_store_records_total", "Messages stored in the log (a batch record counts its members)"),
    ("batches", "halfmq_store_batches_total", "Write batches (group commits)"),
    ("writes", "halfmq_store_writes_total", "Write calls to log segments"),
    ("fsyncs", "halfmq_store_fsyncs_total", "fdatasync calls on log segments"),
    ("bundles", "halfmq_store_bundles_total", "Bundles: the messages of one SEND stored as one record"),
    ("ref_records", "halfmq_store_ref_records_total", "Records holding the commits of many half messages of one queue"),
)


def metric_families(snapshot: dict[str, Any], connections: Iterable[Any], errors: dict[int, int]) -> list[Metric]:
    """The metric families of one scrape, from the engine's snapshot, the native
    connections and the front end's error counts (by error code)."""
    out: list[Metric] = []
    msgs = CounterMetricFamily("halfmq_topic_messages_in", "Messages stored per topic", labels=["topic"])
    size = CounterMetricFamily("halfmq_topic_bytes_in", "Message body bytes stored per topic", labels=["topic"])
    for topic, (n, b) in sorted(snapshot["topics"].items()):
        msgs.add_metric([topic], n)
        size.add_metric([topic], b)
    out += [msgs, size]
    counters = snapshot["counters"]
    sends = CounterMetricFamily("halfmq_send_requests", "SEND requests answered, by result", labels=["result"])
    sends.add_metric(["ok"], counters.get("sends_ok", 0))
    sends.add_metric(["failed"], counters.get("sends_failed", 0))
    out.append(sends)
    refused = CounterMetricFamily("halfmq_request_errors", "Requests answered with an error, by error code",
                                  labels=["code"])
    for code, n in sorted(errors.items()):
        refused.add_metric([str(code)], n)
    out.append(refused)
    groups = snapshot["groups"]
    for key, name, doc in _GROUP_COUNTERS:
        fam = CounterMetricFamily(name[: -len("_total")], doc, labels=["group"])
        for g, st in groups.items():
            fam.add_metric([g], st[key])
        out.append(fam)
    for key, name, doc in _GROUP_GAUGES:
        gauge = GaugeMetricFamily(name, doc, labels=["group"])
        for g, st in groups.items():
            gauge.add_metric([g], st[key])
        out.append(gauge)
    out.append(GaugeMetricFamily("halfmq_groups", "Consumer groups", value=snapshot["groups_total"]))
    out.append(GaugeMetricFamily("halfmq_topics", "Topics (system topics not counted)", value=snapshot["topics_total"]))
    tx = GaugeMetricFamily("halfmq_transactions", "Transactions the broker holds, by state "
                           "(resolved ones: the most recent only)", labels=["state"])
    for state, n in sorted(snapshot["transactions"].items()):
        tx.add_metric([state.lower()], n)
    out.append(tx)
    outcomes = CounterMetricFamily("halfmq_transaction_outcomes", "Transaction outcomes recorded, by outcome "
                                   "and by who decided (producer, check-back, operator, recovery)", labels=["outcome", "by"])
    for key, n in sorted(counters.items()):
        if key.startswith("tx_"):
            outcome, _, by = key[3:].rpartition("_")
            outcomes.add_metric([outcome, by], n)
    out.append(outcomes)
    checks = CounterMetricFamily("halfmq_checkbacks", "Check-backs: sent to a producer, answered, failed "
                                 "(no answer in time, the listener failed), lost with the connection, or with "
                                 "no live producer to ask", labels=["result"])
    for result in ("sent", "answered", "failed", "lost", "unreached"):
        checks.add_metric([result], counters.get(f"checks_{result}", 0))
    out.append(checks)
    store = snapshot["store"]
    for key, name, doc in _STORE:
        out.append(CounterMetricFamily(name[: -len("_total")], doc, value=store.get(key, 0)))
    out.append(CounterMetricFamily("halfmq_store_loop_disk_wait_seconds", "Time the event loop waited for "
                                   "the disk in its own fdatasyncs", value=store.get("loop_disk_wait_ns", 0) / 1e9))
    hist = snapshot.get("histograms")
    if hist is not None:
        out.append(HistogramMetricFamily("halfmq_store_fsync_seconds", "Time the fdatasyncs of one write batch took "
                                         "(a big batch written with O_DSYNC: the write and sync together)",
                                         buckets=hist["fsync_seconds"], sum_value=hist["fsync_seconds_sum"]))
        out.append(HistogramMetricFamily("halfmq_store_batch_records", "Records per write batch (group commit)",
                                         buckets=hist["batch_records"], sum_value=hist["batch_records_sum"]))
    roles: dict[str, int] = {"producer": 0, "consumer": 0, "unknown": 0}
    for c in connections:
        roles[c.role if c.role in roles else "unknown"] += 1
    conns = GaugeMetricFamily("halfmq_connections", "Client connections, by role", labels=["role"])
    for role, n in roles.items():
        conns.add_metric([role], n)
    out.append(conns)
    return out


class _Families:
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


def render_metrics(broker: Broker) -> bytes:
    """The text exposition of one scrape of ``broker``."""
    engine: Any = broker.engine
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(metric_families(engine.metrics_snapshot(), broker.native.connections,
                                                broker.native.errors)))
    return generate_latest(registry)
