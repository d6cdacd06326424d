"""One broker for both front ends: what a native client sends, an official RocketMQ client
consumes, and the other way round — transactions, retries and the DLQ included."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from consumer_sdk import ConsumeResult, PushConsumer
from consumer_sdk import SimpleConsumer as NativeSimple
from producer_sdk import LocalTransactionState, Producer, TransactionListener, TransactionProducer
from tests.conftest import wait_for
from tests.grpc.conftest import message
from tests.grpc.test_grpc_produce import receive_all

pytestmark = pytest.mark.timeout(60)


async def test_native_producer_to_official_consumer(rmq, clients, gbroker):
    async with Producer(gbroker.address, group="native-p") as p:
        sent = await p.send("n2g", b"from native", tags="T1", keys=["k-9"], properties={"a": "b"})
    (m,) = await asyncio.to_thread(lambda: receive_all(clients.simple("g-n2g", "n2g"), 1))
    assert (m.message_id, m.body, m.tag, m.keys, m.properties) == (sent.msg_id, b"from native", "T1", {"k-9"},
                                                                  {"a": "b"})


async def test_official_producer_to_native_push_consumer_with_a_retry(rmq, clients, gbroker):
    got: list[Any] = []

    async def on_message(m: Any) -> ConsumeResult:
        got.append(m)
        return ConsumeResult.RECONSUME_LATER if m.reconsume_times == 0 else ConsumeResult.SUCCESS

    async with PushConsumer(gbroker.address, group="g-g2n", topic="g2n", listener=on_message):
        receipt = await asyncio.to_thread(
            lambda: clients.producer("g2n").send(message(rmq, "g2n", "from grpc", tag="T2", keys="k-1",
                                                         properties={"x": "y"})))
        await wait_for(lambda: len(got) == 2, timeout=15, what="delivery and its retry")
    first, retry = got
    assert first.msg_id == retry.msg_id == receipt.message_id
    assert (first.body, first.tags, first.keys, first.properties) == (b"from grpc", "T2", ("k-1",), {"x": "y"})
    assert retry.reconsume_times == 1


async def test_native_transaction_consumed_by_an_official_push_consumer(rmq, clients, gbroker):
    class Commit(TransactionListener):
        async def execute_local_transaction(self, message: Any, arg: Any) -> LocalTransactionState:
            return LocalTransactionState.COMMIT

        async def check_local_transaction(self, message: Any) -> LocalTransactionState:
            return LocalTransactionState.COMMIT

    seen: list[bytes] = []
    await asyncio.to_thread(clients.push, "g-ntx", "ntx", lambda m: seen.append(m.body) or rmq.ConsumeResult.SUCCESS)
    async with TransactionProducer(gbroker.address, group="native-tx", listener=Commit()) as p:
        await p.send_in_transaction("ntx", b"committed natively")
    await wait_for(lambda: seen == [b"committed natively"], timeout=15, what="the committed message")


async def test_official_transaction_and_dead_letters_are_seen_by_native_clients(rmq, clients, gbroker):
    await gbroker.engine.admin_set_group_settings("g-mix", max_attempts=1)

    def run() -> str:
        p = clients.producer("mix")
        tx = p.begin_transaction()
        r = p.send(message(rmq, "mix", "tx body", keys="biz-1"), tx)
        tx.commit()
        c = clients.simple("g-mix", "mix")
        (m,) = receive_all(c, 1, ack=False)
        c.change_invisible_duration(m, 1)  # a failed attempt: with max_attempts 1, a dead letter
        return r.message_id

    msg_id = await asyncio.to_thread(run)
    async with NativeSimple(gbroker.address, group="dlq-reader", topic="%DLQ%g-mix") as c:
        got = await c.receive(10, 30, wait=10)
    assert [m.msg_id for m in got] == [msg_id]
    assert got[0].keys == ("biz-1",) and got[0].properties["ORIGIN_TOPIC"] == "mix"
