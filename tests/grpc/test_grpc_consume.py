"""The official RocketMQ 5 client consuming from halfmq: SimpleConsumer receive, ack,
change of invisible duration, redelivery and stale handles; PushConsumer consumption,
failure with back-off, dead letters, FIFO with its local retries; leases the broker
renews for a live push consumer and releases when it goes."""

from __future__ import annotations

import asyncio
import copy
import threading
import time
from typing import Any

import pytest

from tests.conftest import wait_for
from tests.grpc.conftest import message
from tests.grpc.test_grpc_produce import receive_all

pytestmark = pytest.mark.timeout(60)


def receive_one(consumer: Any, invisible: int, deadline: float = 15.0) -> Any:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        got = consumer.receive(1, invisible)
        if got:
            return got[0]
    raise AssertionError("nothing received")


def code_of(exc: BaseException) -> int:
    """The RocketMQ status code a client exception carries (its text starts with it)."""
    import re

    m = re.match(r"\D*(\d{5})", str(exc))
    assert m, str(exc)
    return int(m.group(1))


async def test_simple_receive_ack_and_stale_handle(rmq, clients):
    def run() -> None:
        p = clients.producer("s-t")
        p.send(message(rmq, "s-t", "one"))
        c = clients.simple("g-s", "s-t")
        m = receive_one(c, 10)
        c.ack(m)
        with pytest.raises(Exception) as err:  # acked: its handle is stale now
            c.ack(m)
        assert code_of(err.value) == 40013  # INVALID_RECEIPT_HANDLE
        assert c.receive(32, 10) == []  # not redelivered

    await asyncio.to_thread(run)


async def test_change_invisible_duration_gives_a_new_handle(rmq, clients):
    def run() -> None:
        p = clients.producer("cid-t")
        p.send(message(rmq, "cid-t", "x"))
        c = clients.simple("g-cid", "cid-t")
        m = receive_one(c, 2)
        stale = copy.copy(m)
        c.change_invisible_duration(m, 30)  # the message object takes the new handle
        assert m.receipt_handle != stale.receipt_handle
        with pytest.raises(Exception) as err:  # the old handle is stale at once
            c.ack(stale)
        assert code_of(err.value) == 40013
        assert c.receive(1, 10) == []  # still invisible after its first 2 s
        c.ack(m)

    await asyncio.to_thread(run)


async def test_unacked_message_comes_again_with_the_next_attempt(rmq, clients):
    def run() -> None:
        p = clients.producer("redo-t")
        p.send(message(rmq, "redo-t", "again"))
        c1 = clients.simple("g-redo", "redo-t")
        first = receive_one(c1, 1)  # not acked: visible again after 1 s
        c2 = clients.simple("g-redo", "redo-t")
        second = receive_one(c2, 10)
        assert (second.message_id, second.delivery_attempt) == (first.message_id, 2)
        with pytest.raises(Exception) as err:  # the first holder's handle is stale
            c1.ack(first)
        assert code_of(err.value) == 40013
        c1.ack(second)  # any member of the group may ack the current handle

    await asyncio.to_thread(run)


async def test_push_consumer_failure_backs_off_then_dead_letters(rmq, clients, gbroker):
    await gbroker.engine.admin_set_group_settings("g-push", max_attempts=3, retry_delays=[1.0, 1.0])
    attempts: list[tuple[bytes, int, float]] = []
    done = threading.Event()

    def on_message(m: Any) -> Any:
        attempts.append((m.body, m.delivery_attempt, time.monotonic()))
        if m.body == b"bad":
            if m.delivery_attempt == 3:
                done.set()
            return rmq.ConsumeResult.FAILURE
        return rmq.ConsumeResult.SUCCESS

    def run() -> None:
        p = clients.producer("push-t")
        c = clients.push("g-push", "push-t", on_message)
        p.send(message(rmq, "push-t", "good"))
        p.send(message(rmq, "push-t", "bad"))
        assert done.wait(20), attempts
        clients.shutdown(c)

    await asyncio.to_thread(run)
    bad = [a for a in attempts if a[0] == b"bad"]
    assert [a[1] for a in bad] == [1, 2, 3]
    assert bad[1][2] - bad[0][2] >= 0.9 and bad[2][2] - bad[1][2] >= 0.9  # the group's 1 s back-off
    assert [a[0] for a in attempts].count(b"good") == 1

    def dead() -> list[Any]:  # the DLQ is a topic like any other
        return receive_all(clients.simple("g-dlq-reader", "%DLQ%g-push"), 1)

    (d,) = await asyncio.to_thread(dead)
    assert d.body == b"bad" and d.properties.get("ORIGIN_TOPIC") == "push-t"


async def test_fifo_push_retries_locally_then_forwards_to_the_dlq(rmq, clients, gbroker):
    await gbroker.engine.admin_set_group_settings("g-ff", fifo=True, max_attempts=2, retry_delays=[1.0])
    order: list[tuple[str, int]] = []
    done = threading.Event()

    def on_message(m: Any) -> Any:
        order.append((m.body.decode(), m.delivery_attempt))
        if m.body == b"poison":
            return rmq.ConsumeResult.FAILURE
        if m.body == b"after":
            done.set()
        return rmq.ConsumeResult.SUCCESS

    def run() -> None:
        p = clients.producer("ff-t")
        for body in ("first", "poison", "after"):
            p.send(message(rmq, "ff-t", body, message_group="acct-1"))
        c = clients.push("g-ff", "ff-t", on_message)
        assert done.wait(20), order
        clients.shutdown(c)

    await asyncio.to_thread(run)
    # the poison message holds its group through its local retries; then "after" follows
    assert [b for b, _ in order] == ["first", "poison", "poison", "after"]
    await wait_for(lambda: gbroker.engine.groups["g-ff"].stats["dead_lettered"] == 1, what="the dead letter")


async def test_push_lease_is_renewed_while_a_slow_listener_runs(rmq, clients, gbroker):
    """The lease slice is 1.5 s in these tests; a listener taking 4 s must not see its
    message delivered twice."""
    calls: list[int] = []
    done = threading.Event()

    def on_message(m: Any) -> Any:
        calls.append(m.delivery_attempt)
        time.sleep(4)
        done.set()
        return rmq.ConsumeResult.SUCCESS

    def run() -> None:
        p = clients.producer("slow-t")
        c = clients.push("g-slow", "slow-t", on_message)
        p.send(message(rmq, "slow-t", "slow"))
        assert done.wait(20)
        clients.shutdown(c)

    await asyncio.to_thread(run)
    assert calls == [1]
    gd = gbroker.engine.groups["g-slow"]
    await wait_for(lambda: gd.stats["acked"] == 1, what="the ack")
    assert gd.stats["expired"] == 0
