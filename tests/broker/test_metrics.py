"""``GET /metrics`` scraped from a real broker and parsed with prometheus_client's parser:
every documented metric is present and moves when its event happens (issue 16)."""

from __future__ import annotations

import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from consumer_sdk import ConsumeResult, PushConsumer
from producer_sdk import (
    LocalTransactionState,
    Producer,
    TransactionListener,
    TransactionProducer,
)
from protocol import Op
from tests.conftest import wait_for
from tests.faults.test_limits import RawClient

pytestmark = pytest.mark.timeout(60)

DOCUMENTED = {
    "halfmq_topic_messages_in", "halfmq_topic_bytes_in", "halfmq_send_requests", "halfmq_request_errors",
    "halfmq_group_deliveries", "halfmq_group_acks", "halfmq_group_failures", "halfmq_group_lease_expiries",
    "halfmq_group_dead_letters", "halfmq_group_lag_messages", "halfmq_group_in_flight_messages",
    "halfmq_group_retrying_messages", "halfmq_group_members", "halfmq_groups", "halfmq_topics",
    "halfmq_transactions", "halfmq_transaction_outcomes", "halfmq_checkbacks", "halfmq_store_records",
    "halfmq_store_batches", "halfmq_store_writes", "halfmq_store_fsyncs", "halfmq_store_bundles",
    "halfmq_store_loop_disk_wait_seconds", "halfmq_connections", "halfmq_store_fsync_seconds",
    "halfmq_store_batch_records",
}


def scrape(http_url: str) -> dict[tuple[str, tuple], float]:
    """Every sample as {(name, sorted labels): value}, plus the family names under ("", ())."""
    with urllib.request.urlopen(f"{http_url}/metrics", timeout=10) as resp:
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    out: dict[tuple[str, tuple], float] = {}
    for fam in text_string_to_metric_families(text):
        out[("family", (("name", fam.name),))] = 1
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


class Unknown(TransactionListener):
    def __init__(self) -> None:
        self.checks = 0

    async def execute_local_transaction(self, message, arg):
        return LocalTransactionState.UNKNOWN

    async def check_local_transaction(self, message):
        self.checks += 1
        return LocalTransactionState.COMMIT


async def test_every_documented_metric_is_present_and_moves(broker):
    before = scrape(broker.http_url)
    names = {labels[0][1] for (kind, labels) in before if kind == "family"}
    assert DOCUMENTED <= names, f"missing: {DOCUMENTED - names}"

    async with Producer(broker.address) as p:
        for i in range(5):
            await p.send("m-topic", f"message {i}".encode())
    raw = RawClient(broker.address)  # a request the broker refuses: counted by error code
    raw.hello(role="producer")
    raw.send(Op.SEND, 2, {"topic": "m-topic", "msgs": [["not bytes", None, [], {}, 0]]})
    assert raw.read_frame()[0] == Op.ERROR
    raw.close()
    listener = Unknown()
    async with TransactionProducer(broker.address, group="m-tx", listener=listener) as tp:
        await tp.send_in_transaction("m-topic", b"half")
        await wait_for(lambda: listener.checks >= 1, timeout=20, what="a check-back")
    seen = []

    async def on(m):
        seen.append(m)
        return ConsumeResult.RECONSUME_LATER if m.reconsume_times == 0 and m.body == b"message 0" else \
            ConsumeResult.SUCCESS

    async with PushConsumer(broker.address, group="m-group", topic="m-topic", listener=on, max_reconsume_times=3):
        await wait_for(lambda: len(seen) >= 7, timeout=20, what="6 messages and one retry")
        during = scrape(broker.http_url)
        assert value(during, "halfmq_connections", role="consumer") >= 1
        assert value(during, "halfmq_group_members", group="m-group") == 1
    after = scrape(broker.http_url)
    assert value(after, "halfmq_topic_messages_in_total", topic="m-topic") == 6
    assert value(after, "halfmq_topic_bytes_in_total", topic="m-topic") == 5 * 9 + 4
    assert value(after, "halfmq_send_requests_total", result="ok") >= 6
    assert value(after, "halfmq_group_deliveries_total", group="m-group") >= 7
    assert value(after, "halfmq_group_acks_total", group="m-group") >= 6
    assert value(after, "halfmq_group_failures_total", group="m-group") == 1
    assert value(after, "halfmq_transaction_outcomes_total", outcome="committed", by="check") == 1
    assert value(after, "halfmq_checkbacks_total", result="sent") >= 1
    assert value(after, "halfmq_checkbacks_total", result="answered") >= 1
    assert value(after, "halfmq_store_fsyncs_total") > value(before, "halfmq_store_fsyncs_total")
    assert value(after, "halfmq_store_records_total") >= 7
    fsyncs = value(after, "halfmq_store_fsync_seconds_count") - value(before, "halfmq_store_fsync_seconds_count")
    assert fsyncs >= 1 and value(after, "halfmq_store_fsync_seconds_sum") > 0
    assert value(after, "halfmq_store_fsync_seconds_bucket", le="+Inf") == value(after, "halfmq_store_fsync_seconds_count")
    assert value(after, "halfmq_store_fsync_seconds_bucket", le="10.0") <= value(after, "halfmq_store_fsync_seconds_count")
    batches = value(after, "halfmq_store_batch_records_count") - value(before, "halfmq_store_batch_records_count")
    assert batches >= 1 and value(after, "halfmq_store_batch_records_sum") == value(after, "halfmq_store_records_total")
    assert value(after, "halfmq_groups") == 1 and value(after, "halfmq_topics") == 1
    assert value(after, "halfmq_request_errors_total", code="8") >= 1
