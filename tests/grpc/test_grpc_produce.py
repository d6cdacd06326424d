"""The official RocketMQ 5 client producing to halfmq: normal, FIFO, delayed and
transactional sends (commit, rollback, an orphan resolved by check-back through a
restarted producer)."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from tests.conftest import wait_for
from tests.grpc.conftest import message

pytestmark = pytest.mark.timeout(60)


def receive_all(consumer: Any, n: int, *, invisible: int = 10, ack: bool = True, deadline: float = 15.0) -> list[Any]:
    """Receive (and ack) until ``n`` messages came, or fail after ``deadline`` seconds."""
    out: list[Any] = []
    end = time.monotonic() + deadline
    while len(out) < n:
        assert time.monotonic() < end, f"received {len(out)} of {n}"
        for m in consumer.receive(32, invisible):
            out.append(m)
            if ack:
                consumer.ack(m)
    return out


async def test_normal_send_carries_tag_keys_and_properties(rmq, clients):
    def run() -> tuple[Any, list[Any]]:
        p = clients.producer("orders")
        r = p.send(message(rmq, "orders", "hello", tag="TagA", keys="k-1", properties={"region": "eu"}))
        c = clients.simple("g-orders", "orders")
        return r, receive_all(c, 1)

    receipt, (m,) = await asyncio.to_thread(run)
    assert m.message_id == receipt.message_id and len(receipt.message_id) == 24
    assert (m.body, m.tag, m.keys, m.properties) == (b"hello", "TagA", {"k-1"}, {"region": "eu"})
    assert m.delivery_attempt == 1 and m.topic == "orders"


async def test_tag_filter_takes_only_the_asked_tags(rmq, clients):
    def run() -> list[bytes]:
        p = clients.producer("tagged")
        for tag in ("A", "B", "C", "A"):
            p.send(message(rmq, "tagged", tag, tag=tag))
        c = clients.simple("g-tagged", "tagged", tags="A || C")
        return sorted(m.body for m in receive_all(c, 3))

    assert await asyncio.to_thread(run) == [b"A", b"A", b"C"]


async def test_fifo_messages_of_a_group_are_consumed_in_send_order(rmq, clients, gbroker):
    await gbroker.engine.admin_set_group_settings("g-fifo", fifo=True)
    seen: dict[str, list[int]] = {"a": [], "b": []}
    done = threading.Event()

    def on_message(m: Any) -> Any:
        seen[m.message_group].append(int(m.body))
        time.sleep(0.005)
        if sum(map(len, seen.values())) == 40:
            done.set()
        return rmq.ConsumeResult.SUCCESS

    def run() -> None:
        p = clients.producer("fifo-t")
        for i in range(20):
            for g in ("a", "b"):
                p.send(message(rmq, "fifo-t", str(i), message_group=g))
        c = clients.push("g-fifo", "fifo-t", on_message)
        assert done.wait(20), seen
        clients.shutdown(c)

    await asyncio.to_thread(run)
    assert seen == {"a": list(range(20)), "b": list(range(20))}


async def test_transaction_commit_delivers_and_rollback_never_does(rmq, clients, gbroker):
    def run() -> list[bytes]:
        p = clients.producer("tx-t")
        for outcome in ("commit", "rollback"):
            tx = p.begin_transaction()
            r = p.send(message(rmq, "tx-t", outcome, keys="tx-" + outcome), tx)
            assert r.transaction_id == r.message_id
            (tx.commit if outcome == "commit" else tx.rollback)()
        p.send(message(rmq, "tx-t", "after"))
        c = clients.simple("g-tx", "tx-t")
        got = receive_all(c, 2)
        assert c.receive(32, 10) == []  # the rolled-back one never comes (one more long poll)
        return sorted(m.body for m in got)

    assert await asyncio.to_thread(run) == [b"after", b"commit"]
    from broker.core.lifecycle import TxState

    assert [t["state"] for t in await gbroker.engine.admin_transactions(TxState.COMMITTED)] == ["COMMITTED"]
    assert [t["group"] for t in await gbroker.engine.admin_transactions(TxState.ROLLED_BACK)] == ["tx-t"]


async def test_orphan_is_resolved_by_check_back_through_a_restarted_producer(rmq, clients, gbroker):
    checked: list[str] = []

    class Commit(rmq.TransactionChecker):
        def check(self, m: Any) -> Any:
            checked.append(m.message_id)
            return rmq.TransactionResolution.COMMIT

    def crash_after_half() -> str:
        p = clients.producer("orphan-t")
        tx = p.begin_transaction()
        r = p.send(message(rmq, "orphan-t", "orphan"), tx)
        clients.shutdown(p)  # gone without an outcome
        return r.message_id

    msg_id = await asyncio.to_thread(crash_after_half)
    # the restarted producer names the topic up front: the check-back finds it by topic
    await asyncio.to_thread(clients.producer, "orphan-t", checker=Commit())
    await wait_for(lambda: checked == [msg_id], timeout=15, what="the check-back")

    def consume() -> list[Any]:
        return receive_all(clients.simple("g-orphan", "orphan-t"), 1)

    (m,) = await asyncio.to_thread(consume)
    assert (m.message_id, m.body) == (msg_id, b"orphan")


async def test_check_back_goes_first_to_the_producer_that_sent_the_half(rmq, clients):
    """A producer made without ``topics=`` did not name the topic in its first Settings:
    the check-back must still reach it (by client id)."""
    checked = threading.Event()

    class Commit(rmq.TransactionChecker):
        def check(self, m: Any) -> Any:
            checked.set()
            return rmq.TransactionResolution.COMMIT

    def run() -> list[Any]:
        p = clients.producer(checker=Commit())
        tx = p.begin_transaction()
        p.send(message(rmq, "late-t", "x"), tx)  # no outcome: the check-back decides
        assert checked.wait(15)
        return receive_all(clients.simple("g-late", "late-t"), 1)

    (m,) = await asyncio.to_thread(run)
    assert m.body == b"x"


async def test_unknown_answer_is_asked_again(rmq, clients):
    answers = iter([rmq.TransactionResolution.TRANSACTION_RESOLUTION_UNSPECIFIED, rmq.TransactionResolution.ROLLBACK])
    asked: list[float] = []
    done = threading.Event()

    class Checker(rmq.TransactionChecker):
        def check(self, m: Any) -> Any:
            asked.append(time.monotonic())
            answer = next(answers)
            if answer == rmq.TransactionResolution.ROLLBACK:
                done.set()
            return answer

    def run() -> None:
        p = clients.producer("unk-t", checker=Checker())
        p.send(message(rmq, "unk-t", "x"), p.begin_transaction())
        assert done.wait(15)

    await asyncio.to_thread(run)
    assert len(asked) == 2

