"""A SEND of very many (empty) messages: one frame under the size limit could hold ~600,000
of them, seconds of event-loop work and over a gigabyte of memory for a handful of frames,
while ``--max-inflight-bytes`` counted only body bytes. A SEND now holds at most 10,000
messages (more: ``LimitExceededError``, nothing stored), and each message weighs its body
plus a fixed overhead in the connection's in-flight bytes, a SEND that wants no reply
(rid 0) included.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from broker import Broker, BrokerConfig
from broker.frontends.native.checks import MAX_SEND_MESSAGES, SEND_MESSAGE_OVERHEAD
from producer_sdk import Producer
from protocol import Op, encode_frame
from protocol.errors import LimitExceededError
from tests.broker.test_process import RawClient, topic_names
from tests.conftest import wait_for

EMPTY = [b"", None, [], {}, 0]


async def test_a_send_of_more_messages_than_the_cap_is_refused_and_stores_nothing(broker):
    assert MAX_SEND_MESSAGES == 10_000  # README, "Limits"
    p = await RawClient.connect(broker.address)
    try:
        answer, reply = await p.request(Op.SEND, {"topic": "many", "msgs": [EMPTY] * (MAX_SEND_MESSAGES + 1)})
        assert answer == Op.ERROR and reply["code"] == LimitExceededError.code, reply
        assert "10000 messages" in reply["message"] and str(MAX_SEND_MESSAGES + 1) in reply["message"], reply
        assert "many" not in topic_names(broker)  # refused whole: nothing stored, no topic made
        answer, reply = await p.request(Op.SEND, {"topic": "many", "msgs": [EMPTY] * MAX_SEND_MESSAGES})
        assert answer == Op.REPLY and len(reply["r"]) == MAX_SEND_MESSAGES, str(reply)[:200]
    finally:
        p.close()
    async with Producer(broker.address) as producer:  # the SDK's batches stay well under it
        results = await producer.send_batch("many", [b""] * 2_000)
        assert len(results) == 2_000


@contextlib.asynccontextmanager
async def _sends_held(tmp_path, monkeypatch, **limits: int) -> AsyncIterator[tuple[Broker, list[tuple[Any, int, int]],
                                                                                     RawClient]]:
    """A broker with --max-inflight-bytes 1 MiB (or ``limits``) whose engine keeps each SEND
    unanswered (as a slow disk would) until the test answers it: ``(broker, held,
    client)``, ``held`` getting ``(session, rid, messages)`` per SEND."""
    async with Broker(BrokerConfig(data_dir=str(tmp_path / "d"), port=0, http_port=0,
                                   **({"max_inflight_bytes": 1 << 20} | limits))) as b:
        held: list[tuple[Any, int, int]] = []
        monkeypatch.setattr(b.engine, "send", lambda s, rid, topic, msgs, half: held.append((s, rid, len(msgs))))
        c = await RawClient.connect(b.address)
        try:
            yield b, held, c
        finally:
            c.close()


async def test_empty_messages_weigh_in_the_inflight_bytes(tmp_path, monkeypatch):
    """With --max-inflight-bytes 1 MiB, a SEND of 5,000 empty messages (5,000 x
    ``SEND_MESSAGE_OVERHEAD`` bytes) stops the broker reading that connection until it is answered; it used
    to weigh 0 bytes."""
    async with _sends_held(tmp_path, monkeypatch) as (b, held, c):
        n = 5_000
        c.writer.write(encode_frame(Op.SEND, 100, {"topic": "t", "msgs": [EMPTY] * n}))
        await wait_for(lambda: held, what="the SEND handed to the engine")
        (conn,) = b.native.connections
        assert conn._inflight_bytes == n * SEND_MESSAGE_OVERHEAD
        c.writer.write(encode_frame(Op.PING, 101, {}))
        with pytest.raises(asyncio.TimeoutError):  # not read: the connection is past the limit
            await c.next_frame(timeout=0.5)
        session, rid, _n = held[0]
        session.reply(rid, {"p": "", "r": []})
        answers = {(await c.next_frame())[1], (await c.next_frame())[1]}
        assert answers == {100, 101}  # the SEND answered, then the PING read and answered
        assert conn._inflight_bytes == 0


async def test_sends_without_a_reply_weigh_in_the_inflight_limits_too(tmp_path, monkeypatch):
    """A SEND with rid 0 (no reply wanted) was counted in neither in-flight limit: a client
    could hand the broker fire-and-forget SENDs faster than the disk took them, with nothing
    to stop its reads. It now counts like any SEND, under an id of the broker's own that
    never reaches the client: no REPLY, and an ERROR goes out with rid 0."""
    async with _sends_held(tmp_path, monkeypatch) as (b, held, c):
        n = 5_000
        c.writer.write(encode_frame(Op.SEND, 0, {"topic": "t", "msgs": [EMPTY] * n}))
        await wait_for(lambda: held, what="the SEND handed to the engine")
        (conn,) = b.native.connections
        assert conn._inflight_bytes == n * SEND_MESSAGE_OVERHEAD and conn._inflight == 1
        c.writer.write(encode_frame(Op.SEND, 0, {"topic": "t", "msgs": [EMPTY] * 10}))
        c.writer.write(encode_frame(Op.PING, 101, {}))
        with pytest.raises(asyncio.TimeoutError):  # not read: past the limit
            await c.next_frame(timeout=0.5)
        assert len(held) == 1  # nor the second SEND
        session, rid, _n = held[0]
        assert rid < -(1 << 63)  # never a client's
        session.reply(rid, {"p": "", "r": []})
        await wait_for(lambda: len(held) == 2, what="the second SEND read")
        assert (await c.next_frame())[:2] == (Op.REPLY, 101)  # only the PING is answered
        session, rid, _n = held[1]
        assert rid < -(1 << 63) and rid != held[0][1]
        session.error(rid, LimitExceededError("refused"))
        op, answered_rid, payload = await c.next_frame()
        assert (op, answered_rid, payload["message"]) == (Op.ERROR, 0, "refused")
        assert conn._inflight_bytes == 0 and conn._inflight == 0


async def test_a_reused_rid_does_not_hide_a_sends_weight(tmp_path, monkeypatch):
    """The weights were kept by rid: the first reply to a rid the client had used twice
    released both SENDs' weight, so a client reusing rids could keep any amount in flight.
    Now each SEND is counted apart, and answered with the rid it came with."""
    async with _sends_held(tmp_path, monkeypatch, max_inflight_bytes=4 << 20) as (b, held, c):
        for _ in range(2):
            c.writer.write(encode_frame(Op.SEND, 7, {"topic": "t", "msgs": [EMPTY] * 1_000}))
        await wait_for(lambda: len(held) == 2, what="both SENDs handed to the engine")
        (conn,) = b.native.connections
        assert conn._inflight_bytes == 2_000 * SEND_MESSAGE_OVERHEAD
        held[0][0].reply(held[0][1], {"p": "", "r": []})
        assert (await c.next_frame())[:2] == (Op.REPLY, 7)
        assert conn._inflight_bytes == 1_000 * SEND_MESSAGE_OVERHEAD  # the other one still weighs
        held[1][0].error(held[1][1], LimitExceededError("refused"))
        op, rid, payload = await c.next_frame()
        assert (op, rid, payload["message"]) == (Op.ERROR, 7, "refused")
        assert conn._inflight_bytes == 0 and b.native.inflight_bytes == 0


async def test_the_sends_of_all_connections_share_one_budget(tmp_path, monkeypatch, caplog):
    """--max-inflight-bytes holds one connection; many connections could each hold that
    much of the broker's memory. Past --max-inflight-total (1 MiB here) the broker stops
    reading each connection that sends until half of it is stored."""
    async with _sends_held(tmp_path, monkeypatch, max_inflight_total=1 << 20) as (b, held, first):
        second = await RawClient.connect(b.address)
        try:
            n = (3 << 20) // (4 * SEND_MESSAGE_OVERHEAD)  # three quarters of the budget each: one fits, two do not
            first.writer.write(encode_frame(Op.SEND, 10, {"topic": "t", "msgs": [EMPTY] * n}))
            await wait_for(lambda: len(held) == 1, what="the first SEND handed to the engine")
            assert (await first.request(Op.PING, {}))[0] == Op.REPLY  # under the budget: read on
            second.writer.write(encode_frame(Op.SEND, 20, {"topic": "t", "msgs": [EMPTY] * n}))
            await wait_for(lambda: len(held) == 2, what="the second SEND handed to the engine")
            assert b.native.inflight_bytes == 2 * n * SEND_MESSAGE_OVERHEAD
            second.writer.write(encode_frame(Op.PING, 21, {}))
            with pytest.raises(asyncio.TimeoutError):  # over the budget: not read
                await second.next_frame(timeout=0.5)
            assert "over --max-inflight-total" in caplog.text
            held[0][0].reply(held[0][1], {"p": "", "r": []})
            assert (await first.next_frame())[:2] == (Op.REPLY, 10)
            with pytest.raises(asyncio.TimeoutError):  # three quarters left: over half the budget
                await second.next_frame(timeout=0.3)
            held[1][0].reply(held[1][1], {"p": "", "r": []})
            answers = {(await second.next_frame())[1], (await second.next_frame())[1]}
            assert answers == {20, 21} and b.native.inflight_bytes == 0  # read again
        finally:
            second.close()


async def test_a_closed_connections_sends_leave_the_budget(tmp_path, monkeypatch):
    """A connection that closes with SENDs still being stored takes their weight out of the
    budget at once, and a connection held for the budget is read again."""
    big, small = (85 << 20) // (100 * SEND_MESSAGE_OVERHEAD), (20 << 20) // (100 * SEND_MESSAGE_OVERHEAD)
    async with _sends_held(tmp_path, monkeypatch, max_inflight_total=1 << 20) as (b, held, first):
        second = await RawClient.connect(b.address)
        try:
            first.writer.write(encode_frame(Op.SEND, 10, {"topic": "t", "msgs": [EMPTY] * big}))
            await wait_for(lambda: len(held) == 1, what="the first SEND handed to the engine")
            second.writer.write(encode_frame(Op.SEND, 20, {"topic": "t", "msgs": [EMPTY] * small}))
            await wait_for(lambda: len(held) == 2, what="the second SEND handed to the engine")
            second.writer.write(encode_frame(Op.PING, 21, {}))
            with pytest.raises(asyncio.TimeoutError):  # 105 % of the budget: not read
                await second.next_frame(timeout=0.3)
            first.close()  # its SEND is not answered yet: the engine still holds it
            assert (await second.next_frame())[:2] == (Op.REPLY, 21)  # 20 % left: read again
            held[0][0].reply(held[0][1], {"p": "", "r": []})  # stored after the close: counted out once
            assert b.native.inflight_bytes == small * SEND_MESSAGE_OVERHEAD
        finally:
            second.close()
