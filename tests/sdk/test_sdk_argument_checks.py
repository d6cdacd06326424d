"""SDK argument checks: a bad delay or deliver_at, count or number of seconds raises at once
(``TypeError``/``ValueError`` naming it, nothing sent), and a request that cannot be encoded
fails its own caller at once instead of leaving it waiting."""

from __future__ import annotations

import asyncio
import math
import time

import pytest

from consumer_sdk import ConsumeResult, PushConsumer, ReceivedMessage, SimpleConsumer
from producer_sdk import (
    LimitExceededError,
    LocalTransactionState,
    Producer,
    SendResult,
    TransactionListener,
    TransactionProducer,
)
from producer_sdk.connection import Connection
from protocol import MAX_SEND_MESSAGES, Op, Role
from tests.sdk.schedule_helpers import topic_view

pytestmark = pytest.mark.timeout(60)

#: Seconds within which a refused argument must have raised (a hang fails the test).
PROMPT = 5.0
#: An address nothing listens on: the constructors do not connect.
NOWHERE = "127.0.0.1:9"
NAN, INF = math.nan, math.inf


async def _on_message(message: object) -> ConsumeResult:
    return ConsumeResult.SUCCESS


class _Listener(TransactionListener):
    def __init__(self) -> None:
        self.executed = 0

    async def execute_local_transaction(self, message, arg):
        self.executed += 1
        return LocalTransactionState.COMMIT

    async def check_local_transaction(self, message):
        return LocalTransactionState.COMMIT


# -- delay and deliver_at, against a broker ---------------------------------------------------


async def test_out_of_range_schedules_raise_at_once_and_the_producer_keeps_sending(broker):
    async with Producer(broker.address) as p:
        cases = [
            ({"delay": 1e30}, ValueError),
            ({"delay": 10**30}, ValueError),
            ({"delay": 200 * 365 * 86400.0}, ValueError),
            ({"delay": -1e30}, ValueError),
            ({"deliver_at": 1e30}, ValueError),
            ({"deliver_at": 10**400}, ValueError),
            ({"deliver_at": -1e30}, ValueError),
            ({"deliver_at": 0}, ValueError),
            ({"delay": NAN}, TypeError),
            ({"delay": INF}, TypeError),
            ({"deliver_at": -INF}, TypeError),
            ({"deliver_at": NAN}, TypeError),
        ]
        for kwargs, error in cases:
            with pytest.raises(error, match="delay|deliver_at"):
                await asyncio.wait_for(p.send("argsched", b"bad", **kwargs), PROMPT)
        # concurrent sends around a refused one: it alone fails, at once
        sends = [p.send("argsched", f"m{i}", delay=1e30 if i == 2 else None) for i in range(5)]
        results = await asyncio.wait_for(asyncio.gather(*sends, return_exceptions=True), PROMPT)
        assert isinstance(results[2], ValueError)
        assert all(isinstance(r, SendResult) for i, r in enumerate(results) if i != 2)
        # the same producer still sends: one at a time, and scheduled within range
        assert isinstance(await asyncio.wait_for(p.send("argsched", b"ok"), PROMPT), SendResult)
        later = await asyncio.wait_for(p.send("argsched", b"later", deliver_at=time.time() + 30), PROMPT)
        assert later.queue_offset == -1
        assert p._conn.idle
    view = topic_view(broker.http_url, "argsched")
    assert view["messages"] == 5 and view["scheduled"] == 1  # none of the refused ones


async def test_a_batch_item_with_a_bad_schedule_fails_the_batch_at_once(broker):
    async with Producer(broker.address) as p:
        for bad in ({"delay": 1e30}, {"deliver_at": 1e30}, {"delay": 2**70}, {"delay": NAN}):
            items = [{"body": b"fine", "delay": 1.0}, {"body": b"bad", **bad}]
            with pytest.raises((ValueError, TypeError), match="delay|deliver_at"):
                await asyncio.wait_for(p.send_batch("argbatch", items), PROMPT)
        assert p._conn.idle  # nothing sent, nothing waiting for a reply
        results = await asyncio.wait_for(p.send_batch("argbatch", [b"a", b"b"]), PROMPT)
        assert len(results) == 2
    view = topic_view(broker.http_url, "argbatch")
    assert view["messages"] == 2 and view["scheduled"] == 0


async def test_a_batch_of_more_messages_than_one_send_holds_is_refused_whole(broker):
    async with Producer(broker.address) as p:
        with pytest.raises(LimitExceededError, match="at most 10000"):
            await p.send_batch("argcount", [b""] * (MAX_SEND_MESSAGES + 1))
        assert p._conn.idle  # nothing sent
        assert len(await p.send_batch("argcount", [b""] * MAX_SEND_MESSAGES)) == MAX_SEND_MESSAGES
    assert topic_view(broker.http_url, "argcount")["messages"] == MAX_SEND_MESSAGES


async def test_a_transaction_with_a_bad_delay_raises_at_once(broker):
    listener = _Listener()
    async with TransactionProducer(broker.address, group="argtx", listener=listener) as p:
        for delay in (1e30, 2**70, INF):
            with pytest.raises((ValueError, TypeError), match="delay"):
                await asyncio.wait_for(p.send_in_transaction("argtx", b"bad", delay=delay), PROMPT)
        assert listener.executed == 0  # no half message was stored
        r = await asyncio.wait_for(p.send_in_transaction("argtx", b"ok", delay=5.0), PROMPT)
        assert r.state is LocalTransactionState.COMMIT and listener.executed == 1


# -- a request that cannot be encoded, against a broker ---------------------------------------


async def test_a_message_that_cannot_be_encoded_fails_alone_and_at_once(broker):
    """A tag, key or property that is not valid Unicode cannot be encoded: only its sender
    fails (with the encoding error), also inside a micro-batch; the others are stored."""
    async with Producer(broker.address) as p:
        sends = [p.send("argenc", f"m{i}", tags="\ud800" if i == 2 else "ok") for i in range(5)]
        results = await asyncio.wait_for(asyncio.gather(*sends, return_exceptions=True), PROMPT)
        assert isinstance(results[2], UnicodeEncodeError)
        assert all(isinstance(r, SendResult) for i, r in enumerate(results) if i != 2)
        # one at a time (the last frame held one message: written straight from send)
        await asyncio.wait_for(p.send("argenc", "alone"), PROMPT)
        with pytest.raises(UnicodeEncodeError):
            await asyncio.wait_for(p.send("argenc", "bad", keys=["\udfff"]), PROMPT)
        assert p._conn.idle  # the refused request left nothing registered
        with pytest.raises(UnicodeEncodeError):
            await asyncio.wait_for(p.send_batch("argenc", [{"body": b"x", "properties": {"k": "\ud800"}}]),
                                   PROMPT)
        assert p._conn.idle
        assert isinstance(await asyncio.wait_for(p.send("argenc", "after"), PROMPT), SendResult)
    assert topic_view(broker.http_url, "argenc")["messages"] == 6


async def test_a_request_that_cannot_be_encoded_leaves_the_connection_idle(broker):
    conn = Connection(broker.address, role=Role.PRODUCER, client_id="argcheck-raw")
    await conn.open(timeout=5)
    try:
        row = [b"x", None, [], {}, 2**70]  # a born timestamp msgpack cannot carry
        with pytest.raises(OverflowError):
            await asyncio.wait_for(conn.request(Op.SEND, {"topic": "argraw", "msgs": [row], "half": False}),
                                   PROMPT)
        assert conn.idle
        await asyncio.wait_for(conn.request(Op.PING, {}), PROMPT)  # still usable
    finally:
        await conn.close()


# -- constructors and per-call counts, no broker needed ---------------------------------------


@pytest.mark.parametrize(("kwargs", "error"), [
    ({"concurrency": 10**9}, ValueError),
    ({"concurrency": 1025}, ValueError),
    ({"concurrency": 2.5}, TypeError),
    ({"concurrency": NAN}, TypeError),
    ({"concurrency": True}, TypeError),
    ({"prefetch": 10**9}, ValueError),
    ({"prefetch": 2.5}, TypeError),
    ({"prefetch": NAN}, TypeError),
    ({"max_reconsume_times": 2**70}, ValueError),
    ({"max_reconsume_times": 1000}, ValueError),
    ({"max_reconsume_times": NAN}, TypeError),
    ({"close_grace": NAN}, ValueError),
    ({"close_grace": INF}, ValueError),
    ({"close_grace": -1}, ValueError),
    ({"client_id": 5}, TypeError),
    ({"client_id": "c" * 257}, ValueError),
])
def test_push_consumer_refuses_bad_arguments_in_its_constructor(kwargs, error):
    (name,) = kwargs
    started = time.monotonic()
    with pytest.raises(error, match=name):
        PushConsumer(NOWHERE, group="g", topic="t", listener=_on_message, **kwargs)
    assert time.monotonic() - started < 1.0


def test_push_consumer_bounds_are_inclusive():
    c = PushConsumer(NOWHERE, group="g", topic="t", listener=_on_message,
                     concurrency=1024, prefetch=1 << 20, max_reconsume_times=999, close_grace=0)
    assert (c.concurrency, c.prefetch, c.max_reconsume_times) == (1024, 1 << 20, 999)
    defaults = PushConsumer(NOWHERE, group="g", topic="t", listener=_on_message)
    assert (defaults.concurrency, defaults.prefetch, defaults.max_reconsume_times) == (16, 64, 16)
    for name, over in (("concurrency", 1025), ("prefetch", (1 << 20) + 1), ("max_reconsume_times", 1000)):
        with pytest.raises(ValueError, match=name):
            PushConsumer(NOWHERE, group="g", topic="t", listener=_on_message, **{name: over})


@pytest.mark.parametrize(("kwargs", "error"), [
    ({"invisible_duration": NAN}, ValueError),
    ({"invisible_duration": INF}, ValueError),
    ({"invisible_duration": 12 * 3600 + 1}, ValueError),
    ({"invisible_duration": True}, TypeError),
    ({"wait": NAN}, ValueError),
    ({"wait": 61}, ValueError),
])
def test_simple_consumer_refuses_bad_arguments_in_its_constructor(kwargs, error):
    (name,) = kwargs
    with pytest.raises(error, match=name):
        SimpleConsumer(NOWHERE, group="g", topic="t", **kwargs)


async def test_simple_consumer_checks_per_call_numbers_before_sending():
    c = SimpleConsumer(NOWHERE, group="g", topic="t", invisible_duration=12 * 3600, wait=60)
    assert (c.invisible_duration, c.wait) == (12 * 3600, 60)  # the broker's bounds are fine
    message = ReceivedMessage(msg_id="m", topic="t", body=b"", receipt_handle="h")
    calls = [
        (lambda: c.receive(max_messages=2.5), TypeError, "max_messages"),
        (lambda: c.receive(max_messages=10**9), ValueError, "max_messages"),
        (lambda: c.receive(invisible_duration=1e9), ValueError, "invisible_duration"),
        (lambda: c.receive(wait=NAN), ValueError, "wait"),
        (lambda: c.nack(message, delay=NAN), ValueError, "delay"),
        (lambda: c.nack(message, delay=1e30), ValueError, "delay"),
        (lambda: c.change_invisible_duration(message, INF), ValueError, "seconds"),
        (lambda: c.change_invisible_duration(message, 1e9), ValueError, "seconds"),
    ]
    for call, error, name in calls:
        with pytest.raises(error, match=name):
            await asyncio.wait_for(call(), PROMPT)


@pytest.mark.parametrize(("kwargs", "error"), [
    ({"send_timeout": NAN}, ValueError),
    ({"send_timeout": INF}, ValueError),
    ({"send_timeout": True}, TypeError),
    ({"retries": 1.5}, TypeError),
    ({"retries": NAN}, TypeError),
    ({"retries": True}, TypeError),
    ({"client_id": 5}, TypeError),
])
def test_producer_refuses_bad_arguments_in_its_constructor(kwargs, error):
    (name,) = kwargs
    with pytest.raises(error, match=name):
        Producer(NOWHERE, **kwargs)
    with pytest.raises(error, match=name):
        TransactionProducer(NOWHERE, group="pg", listener=_Listener(), **kwargs)


@pytest.mark.parametrize(("kwargs", "error"), [
    ({"check_workers": 10**6}, ValueError),
    ({"check_workers": 2.5}, TypeError),
    ({"execute_workers": 10**6}, ValueError),
    ({"execute_workers": NAN}, TypeError),
    ({"execute_workers": False}, TypeError),
])
def test_transaction_producer_refuses_bad_worker_counts(kwargs, error):
    (name,) = kwargs
    with pytest.raises(error, match=name):
        TransactionProducer(NOWHERE, group="pg", listener=_Listener(), **kwargs)
    ok = TransactionProducer(NOWHERE, group="pg", listener=_Listener(), check_workers=1024,
                             execute_workers=0, send_timeout=15, retries=0)
    assert (ok.check_workers, ok.execute_workers, ok.send_timeout, ok.retries) == (1024, 0, 15, 0)


def test_connection_refuses_a_bad_request_timeout():
    for bad in (NAN, INF, 0, -1.0):
        with pytest.raises(ValueError, match="request_timeout"):
            Connection(NOWHERE, role=Role.PRODUCER, request_timeout=bad)
