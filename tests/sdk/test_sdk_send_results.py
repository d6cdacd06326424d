"""The producer's SEND reply hand-out, without a broker: each caller's ``SendResult`` is the
object the public constructor makes, ids are formatted as the protocol says, and a
malformed reply fails every caller."""

from __future__ import annotations

import asyncio
import dataclasses
import functools

import pytest

from producer_sdk.connection import ReplyCallback
from producer_sdk.producer import _hand_out
from protocol import HalfMQError, SendResult
from protocol.message import UnfrozenSendResult


async def _hand_out_reply(payload: object, n: int) -> list[asyncio.Future[SendResult]]:
    loop = asyncio.get_running_loop()
    futs: list[asyncio.Future[SendResult]] = [loop.create_future() for _ in range(n)]
    ReplyCallback(functools.partial(_hand_out, futs=futs, topic="t")).set_result(payload)
    await asyncio.wait(futs)
    return futs


def test_an_unfrozen_result_made_a_send_result_is_one():
    r = UnfrozenSendResult()
    r.msg_id, r.queue_id, r.queue_offset, r.topic, r.state = "AC1F00010000000000000001", 2, 3, "t", None
    r.__class__ = SendResult  # type: ignore[assignment]
    same = SendResult("AC1F00010000000000000001", 2, 3, "t")
    assert type(r) is SendResult and r == same and hash(r) == hash(same) and repr(r) == repr(same)
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.queue_id = 5  # type: ignore[misc]
    assert UnfrozenSendResult.__slots__ == tuple(f.name for f in dataclasses.fields(SendResult))


async def test_each_caller_gets_its_row_as_a_send_result():
    positions = [0, 1, 0xABCDEF, 2**63, 2**64 - 1]
    rows = [[pos, i, pos % 1000] for i, pos in enumerate(positions)]
    futs = await _hand_out_reply({"p": "AC1F0001", "r": rows}, len(rows))
    assert [f.result() for f in futs] == [
        SendResult(f"AC1F0001{pos:016X}", i, pos % 1000, "t") for i, pos in enumerate(positions)]


async def test_ids_that_are_not_positions_are_taken_as_they_are():
    futs = await _hand_out_reply({"r": [["an-id", 0, 1]]}, 1)
    assert futs[0].result() == SendResult("an-id", 0, 1, "t")


@pytest.mark.parametrize("payload", [
    {"p": "P", "r": [[1, 0, 1]]},  # one row for two messages
    {"p": "P", "r": [[1, 0, 1], [2, 0]]},  # a short row
    {"p": "P", "r": [[1, 0, 1], [-1, 0, 2]]},  # a negative position
    {"p": "P", "r": [[1, 0, 1], [2**64, 0, 2]]},  # a position past 64 bits
    {"p": 7, "r": [[1, 0, 1], [2, 0, 2]]},  # a prefix that is no string
    ["not", "a", "map"],
])
async def test_a_malformed_reply_fails_the_callers_left(payload):
    futs = await _hand_out_reply(payload, 2)
    errors = [f.exception() for f in futs]  # (the rows before the bad one may have their result)
    assert isinstance(errors[-1], HalfMQError) and "malformed SEND reply" in str(errors[-1])
