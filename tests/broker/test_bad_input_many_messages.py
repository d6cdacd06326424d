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
async def _sends_held(tmp_path, monkeypatch) -> AsyncIterator[tuple[Broker, list[tuple[Any, int, int]], RawClient]]:
    """A broker with --max-inflight-bytes 1 MiB whose engine keeps each SEND unanswered (as
    a slow disk would) until the test answers it: ``(broker, held, client)``, ``held``
    getting ``(session, rid, messages)`` per SEND."""
    async with Broker(BrokerConfig(data_dir=str(tmp_path / "d"), port=0, http_port=0,
                                   max_inflight_bytes=1 << 20)) as b:
        held: list[tuple[Any, int, int]] = []
        monkeypatch.setattr(b.engine, "send", lambda s, rid, topic, msgs, half: held.append((s, rid, len(msgs))))
        c = await RawClient.connect(b.address)
        try:
            yield b, held, c
        finally:
            c.close()


async def test_empty_messages_weigh_in_the_inflight_bytes(tmp_path, monkeypatch):
    """With --max-inflight-bytes 1 MiB, a SEND of 5,000 empty messages (5,000 x 256 bytes
    of overhead) stops the broker reading that connection until it is answered; it used
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
    to stop its reads. It now counts like any SEND, under a negative rid of the broker's
    own that never reaches the client: no REPLY, and an ERROR goes out with rid 0."""
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
        assert rid < 0
        session.reply(rid, {"p": "", "r": []})
        await wait_for(lambda: len(held) == 2, what="the second SEND read")
        assert (await c.next_frame())[:2] == (Op.REPLY, 101)  # only the PING is answered
        session, rid, _n = held[1]
        assert rid < 0 and rid != held[0][1]
        session.error(rid, LimitExceededError("refused"))
        op, answered_rid, payload = await c.next_frame()
        assert (op, answered_rid, payload["message"]) == (Op.ERROR, 0, "refused")
        assert conn._inflight_bytes == 0 and conn._inflight == 0
