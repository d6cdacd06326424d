"""The HTML console on the admin HTTP port: what a person sees, escaped."""

from __future__ import annotations

import aiohttp

from broker.frontends.http.console import render_console
from consumer_sdk import ConsumeResult, PushConsumer
from producer_sdk import LocalTransactionState, Producer, TransactionListener, TransactionProducer
from tests.conftest import wait_for


class Undecided(TransactionListener):
    async def execute_local_transaction(self, message, arg):
        return LocalTransactionState.UNKNOWN

    async def check_local_transaction(self, message):
        return LocalTransactionState.UNKNOWN


async def test_console_shows_topics_groups_and_prepared_transactions(embedded_broker):
    b = embedded_broker
    seen = []

    async def listener(message):
        seen.append(message.msg_id)
        return ConsumeResult.SUCCESS

    async with (
        Producer(b.address) as p,
        TransactionProducer(b.address, group="payments", listener=Undecided()) as tp,
        PushConsumer(b.address, group="ledger", topic="orders", listener=listener),
        aiohttp.ClientSession() as http,
    ):
        sent = await p.send("orders", b"plain")
        await wait_for(lambda: sent.msg_id in seen, what="the plain message delivered")
        half = await tp.send_in_transaction("orders", b"held", keys=["<b>order&1</b>"])
        async with http.get(f"{b.http_url}/") as r:
            assert r.status == 200 and r.content_type == "text/html"
            page = await r.text()
    assert "<h2>Topics (1)</h2>" in page and "<td>orders</td>" in page
    assert "<td>ledger</td>" in page
    assert "Prepared transactions (1)" in page and half.msg_id in page and "<td>payments</td>" in page
    assert "&lt;b&gt;order&amp;1&lt;/b&gt;" in page and "<b>order" not in page  # keys are escaped
    assert "Abandoned transactions (0)" in page


def test_abandoned_transactions_are_listed_with_how_to_resolve_them():
    page = render_console(
        broker_id="b1", data_dir="/data", topics=[], groups=[], prepared=[],
        abandoned=[{"msg_id": "00000001000000000000002A", "topic": "t", "keys": ["k"], "group": "pg",
                    "age": 120.5, "checks": 15, "next_check_at": None}],
        now=1_800_000_000.0,
    )
    assert "Abandoned transactions (1)" in page and "00000001000000000000002A" in page
    assert "halfmq admin commit ID" in page
    assert "no topics yet" in page and "no consumer groups yet" in page
