"""Strings a client chooses never reach the broker's log raw: a HELLO ``client_id`` or a
subscription's tag expression with a control character (a newline would forge log lines,
an escape sequence would reach the operator's terminal) is refused with ``BadRequestError``,
a tag expression is at most 16 KiB characters, and what is accepted is logged quoted
(``%r``), so that even a character that is no control character (U+2028, U+2029) cannot
cut a line. C1 controls (U+0080 to U+009F: U+0085 NEL is a newline to some log viewers,
U+009B CSI an escape to some terminals) are refused like C0.
"""

from __future__ import annotations

import asyncio

from protocol import Op
from protocol.errors import BadRequestError
from tests.broker.test_process import RawClient
from tests.conftest import wait_for

CONTROLS = ["\n", "\r", "\x1b", "\x00", "\x7f", "\t", "\x1f", "\x85", "\x9b", "\x80", "\x9f"]
FORGED = "2026-12-07 00:00:00,000 WARNING halfmq.broker: FORGED LINE"
#: The longest tag expression the broker takes, in characters.
MAX_TAGS = 16 * 1024


def _hello(client_id: str, role: str = "consumer") -> dict:
    return {"version": 1, "client_id": client_id, "role": role, "group": "g"}


async def _connect(address: str) -> RawClient:
    host, port = address.rsplit(":", 1)
    return RawClient(*await asyncio.open_connection(host, int(port)))


async def test_client_ids_with_control_characters_are_refused(broker):
    c = await _connect(broker.address)
    try:
        for ch in CONTROLS:
            answer, reply = await c.request(Op.HELLO, _hello(f"x{ch}{FORGED}\x1b[2J"))
            assert answer == Op.ERROR and reply["code"] == BadRequestError.code, (ch, reply)
            assert "client_id must not hold control characters" in reply["message"], reply
            assert repr(ch) in reply["message"], reply  # the character, quoted
        answer, reply = await c.request(Op.HELLO, _hello("fine-after-all"))
        assert answer == Op.REPLY, reply  # refused, not disconnected: a good HELLO still works
    finally:
        c.close()
    log = broker.log_path.read_text()
    assert "FORGED LINE" not in log and "\x1b" not in log


async def test_tag_expressions_with_control_characters_or_too_long_are_refused(broker):
    c = await RawClient.connect(broker.address, role="consumer", group="g")
    try:
        for op, extra in [(Op.SUBSCRIBE, {}), (Op.RECEIVE, {"wait_ms": 0})]:
            for ch in CONTROLS:
                answer, reply = await c.request(op, {"group": "g", "topic": "t", "tags": f"A{ch}{FORGED}", **extra})
                assert answer == Op.ERROR and reply["code"] == BadRequestError.code, (op, ch, reply)
                assert "tags must not hold control characters" in reply["message"], reply
            long = "A || " * (MAX_TAGS // 5) + "B" * (MAX_TAGS % 5 + 1)  # one character too many
            assert len(long) == MAX_TAGS + 1
            answer, reply = await c.request(op, {"group": "g", "topic": "t", "tags": long, **extra})
            assert answer == Op.ERROR and reply["code"] == BadRequestError.code, (op, reply)
            assert str(MAX_TAGS) in reply["message"], reply
        answer, reply = await c.request(Op.RECEIVE, {"group": "g", "topic": "t", "tags": long[:-1], "wait_ms": 0})
        assert answer == Op.REPLY, reply  # at the limit: taken
        answer, reply = await c.request(Op.SUBSCRIBE, {"group": "g", "topic": "t", "tags": "A || B"})
        assert answer == Op.REPLY, reply  # the refusals left no subscription behind
    finally:
        c.close()
    log = broker.log_path.read_text()
    assert "FORGED LINE" not in log and "\x1b" not in log


async def test_accepted_client_strings_are_logged_quoted(broker):
    """Line and paragraph separators are no control characters: taken, but logged
    escaped (``%r``) in the connect, subscribe and close lines."""
    odd = "odd\u2028client\u2029id"
    c = await _connect(broker.address)
    try:
        answer, reply = await c.request(Op.HELLO, _hello(odd))
        assert answer == Op.REPLY, reply
        answer, reply = await c.request(Op.SUBSCRIBE, {"group": "g", "topic": "t", "tags": "T\u2029U"})
        assert answer == Op.REPLY, reply
    finally:
        c.close()
    # (the close line, quoted or, before the fix, cut in three by the separators)
    await wait_for(lambda: any(end in broker.log_path.read_text() for end in ("id') closed", "id) closed")),
                   what="the close line")
    log = broker.log_path.read_text()
    assert "\u2028" not in log and "\u2029" not in log
    assert repr(odd) in log  # 'odd\u2028client\u2029id'
    assert repr("T\u2029U") in log
