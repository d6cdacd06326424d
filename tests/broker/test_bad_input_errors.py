"""Bad input answered with an error that says what was wrong (docs/protocol.md), over a
real broker process: undecodable frames, requests before the handshake, payloads of the
wrong shape, malformed END_TX items, and receipt handles this broker never issued (told
apart from stale ones, whose lease ended or which an earlier run issued).
"""

from __future__ import annotations

import asyncio
import struct
import time

import msgpack

from protocol import Op
from protocol.errors import BadRequestError, InvalidNameError, StaleReceiptError
from tests.broker.test_process import RawClient, topic_names

#: What a message meant for a client must not show: Python's own exception texts.
PYTHON_INTERNALS = ("Error(", "subscriptable", "unhashable", "unpack", "object is not", "KeyError")


async def _raw(address: str) -> RawClient:
    """A connection that has sent nothing yet (no HELLO)."""
    host, port = address.rsplit(":", 1)
    return RawClient(*await asyncio.open_connection(host, int(port)))


async def _frame_error(address: str, data: bytes) -> str:
    """Send raw bytes; return the message of the ERROR frame the broker answers, after
    checking that it then closes the connection."""
    c = await _raw(address)
    try:
        c.writer.write(data)
        op, rid, payload = await c.next_frame()
        assert op == Op.ERROR and rid == 0, (op, payload)
        assert payload["code"] == BadRequestError.code, payload
        try:
            extra = await c.next_frame()
        except ConnectionError:
            extra = None
        assert extra is None, extra
        return str(payload["message"])
    finally:
        c.close()


def _clear(message: str) -> None:
    assert not any(s in message for s in PYTHON_INTERNALS), message


async def test_undecodable_frames_say_what_was_wrong(broker):
    """A reserved msgpack byte and arrays nested 100,000 deep were both answered
    'undecodable frame: ' with nothing after the colon."""
    garbage = await _frame_error(broker.address, struct.pack(">I", 1) + b"\xc1")
    assert garbage.startswith("undecodable frame: ") and "not valid msgpack" in garbage, garbage
    deep = b"\x93\x01\x01" + b"\x91" * 100_000 + b"\xc0"
    nested = await _frame_error(broker.address, struct.pack(">I", len(deep)) + deep)
    assert "nested too deep" in nested, nested
    bad_utf8 = b"\x93\x01\x01\xa2\xff\xfe"
    text = await _frame_error(broker.address, struct.pack(">I", len(bad_utf8)) + bad_utf8)
    assert "not valid UTF-8" in text, text
    cut = b"\x93\x01\x01\x92\xc0"  # an array of two with one element: cut short
    text = await _frame_error(broker.address, struct.pack(">I", len(cut)) + cut)
    assert "cut short" in text, text


async def test_frames_that_would_take_the_loop_for_seconds_are_refused_undecoded(broker):
    """Under the frame size limit, 4 MiB of empty arrays were 4 million lists to build (and
    1.4 million extension types, 1.4 million Python calls): seconds in which no other client
    was served. Now such a frame is refused with what was wrong, the connection closed, and
    a client already in is answered as before; nothing is stored."""
    other = await RawClient.connect(broker.address)
    try:
        hello = [Op.HELLO, 1, {"version": 1, "client_id": "costly", "role": "producer"}]
        for payload, expected in [
            ([[[]] * 10_000] * 400, "more than 65536 lists and maps in one frame"),
            ([[]] * 4_000_000, "a list of 4000000 entries (at most 65536 in one frame)"),
            ([msgpack.ExtType(5, b"")] * 20_000, "a msgpack extension type"),
        ]:
            frames = _packed(hello) + _packed([Op.SEND, 2, {"topic": "costly", "msgs": payload}])
            c = await _raw(broker.address)
            try:
                c.writer.write(frames)
                assert (await c.next_frame())[0] == Op.REPLY  # the HELLO before it is answered
                op, rid, reply = await c.next_frame()
                assert op == Op.ERROR and rid == 0 and reply["code"] == BadRequestError.code, reply
                assert reply["message"].startswith("undecodable frame: ") and expected in reply["message"], reply
            finally:
                c.close()
            answer, _ = await other.request(Op.PING, {})
            assert answer == Op.REPLY
        assert "costly" not in topic_names(broker)
    finally:
        other.close()


def _packed(obj: object) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


async def test_every_request_before_the_handshake_gets_the_same_error(broker):
    """ACK as a first frame was answered 'ACK without a subscription'; every other request
    'the first frame must be HELLO'. Now they all get the latter."""
    requests = {
        Op.ACK: {"a": []},
        Op.SEND: {"topic": "t", "msgs": [[b"x", None, [], {}, 0]]},
        Op.END_TX: {"msg_id": "x", "outcome": "COMMIT"},
        Op.SUBSCRIBE: {"group": "g", "topic": "t"},
        Op.UNSUBSCRIBE: {},
        Op.PING: {},
        Op.RECALL: {"msg_id": "x"},
        Op.RECEIVE: {"group": "g", "topic": "t", "wait_ms": 0},
        Op.SETTLE: {"group": "g", "s": [["a.1.0", "ack", 0]]},
    }
    c = await _raw(broker.address)
    try:
        for op, payload in requests.items():
            answer, reply = await c.request(op, payload)
            assert answer == Op.ERROR and reply["code"] == BadRequestError.code, (op, reply)
            assert reply["message"] == "the first frame must be HELLO", (Op(op).name, reply)
        # the connection is still usable: the handshake may come now
        answer, reply = await c.request(Op.HELLO, {"version": 1, "client_id": "late", "role": "consumer"})
        assert answer == Op.REPLY, reply
        answer, reply = await c.request(Op.ACK, {"a": []})
        assert answer == Op.ERROR and reply["message"] == "ACK without a subscription", reply
    finally:
        c.close()


async def test_payloads_of_the_wrong_shape_name_the_field(broker):
    """A SEND whose payload was not a map, or lacked a key, was answered with Python's
    exception (``TypeError("'int' object is not subscriptable")``, ``KeyError('topic')``)."""
    p = await RawClient.connect(broker.address)
    try:
        for payload, field in [(5, "SEND: payload must be a map"), ({"msgs": []}, "topic is missing"),
                               ({"topic": "t"}, "msgs is missing"), ([1, 2], "SEND: payload must be a map")]:
            answer, reply = await p.request(Op.SEND, payload)
            assert answer == Op.ERROR and reply["code"] == BadRequestError.code, (payload, reply)
            assert field in reply["message"] and "topic (string)" in reply["message"], (payload, reply)
            _clear(reply["message"])
        # a topic that is not a string is an invalid name, whatever its type
        for topic in ([], {"a": 1}, 5):
            answer, reply = await p.request(Op.SEND, {"topic": topic, "msgs": [[b"x", None, [], {}, 0]]})
            assert answer == Op.ERROR and reply["code"] == InvalidNameError.code, (topic, reply)
            assert reply["message"].startswith("invalid topic"), reply
        answer, reply = await p.request(Op.SEND, {"topic": "t", "msgs": 5})
        assert answer == Op.ERROR and "msgs must be a non-empty list" in reply["message"], reply
    finally:
        p.close()
    c = await RawClient.connect(broker.address, role="consumer", group="g")
    try:
        for op, payload, field in [(Op.SUBSCRIBE, 5, "SUBSCRIBE: payload must be a map"),
                                   (Op.SUBSCRIBE, {"topic": "t"}, "group is missing"),
                                   (Op.SUBSCRIBE, {"group": "g"}, "topic is missing"),
                                   (Op.SETTLE, 5, "SETTLE: payload must be a map"),
                                   (Op.SETTLE, {"s": [["a.1.0", "ack", 0]]}, "group is missing"),
                                   (Op.RECEIVE, [], "RECEIVE: payload must be a map")]:
            answer, reply = await c.request(op, payload)
            assert answer == Op.ERROR and reply["code"] == BadRequestError.code, (op, payload, reply)
            assert field in reply["message"], (op, payload, reply)
            _clear(reply["message"])
        answer, reply = await c.request(Op.PING, {})  # the connection stays open
        assert answer == Op.REPLY
    finally:
        c.close()


async def test_malformed_end_tx_items_are_named_by_position(broker):
    """END_TX items were answered 'malformed item: TypeError('cannot unpack non-iterable
    int object')'."""
    p = await RawClient.connect(broker.address)  # a producer of group "pg"
    try:
        answer, reply = await p.request(Op.END_TX, {"items": [5, ["only-one"], [1, "COMMIT"], ["id", "MAYBE"],
                                                              ["unknown-id", "COMMIT"]]})
        assert answer == Op.REPLY, reply
        results = reply["r"]
        assert [r[0] for r in results[:4]] == [BadRequestError.code] * 4, results
        assert results[0][1].startswith("END_TX item 0: expected [msg_id, outcome]"), results
        assert results[1][1].startswith("END_TX item 1: expected [msg_id, outcome]"), results
        assert results[2][1].startswith("END_TX item 2: msg_id must be a string"), results
        assert results[3][1].startswith("END_TX item 3: outcome must be 'COMMIT' or 'ROLLBACK'"), results
        assert results[4][0] == 6, results  # a well-formed item of an unknown transaction
        for _code, message in results:
            _clear(message)
    finally:
        p.close()


async def _received_handle(broker, group: str, topic: str) -> str:
    p = await RawClient.connect(broker.address)
    try:
        assert (await p.send(topic, b"m"))[0] == Op.REPLY
    finally:
        p.close()
    c = await RawClient.connect(broker.address, role="consumer", group=group)
    try:
        answer, reply = await c.request(Op.RECEIVE, {"group": group, "topic": topic, "max": 1,
                                                     "invisible_ms": 60_000, "wait_ms": 5_000})
        assert answer == Op.REPLY and len(reply["m"]) == 1, reply
        return str(reply["m"][0][0])
    finally:
        c.close()


async def _settle(broker, group: str, handle: object) -> list:
    c = await RawClient.connect(broker.address, role="consumer", group=group)
    try:
        answer, reply = await c.request(Op.SETTLE, {"group": group, "s": [[handle, "ack", 0]]})
        assert answer == Op.REPLY, reply
        return reply["r"][0]
    finally:
        c.close()


async def test_receipt_handles_never_issued_are_unknown_not_stale(broker):
    """A made-up handle ('a.1.0') on a broker that never restarted was answered 'stale
    receipt handle: the broker restarted since it was issued'. It is now 'unknown receipt
    handle' (same code); a handle of an earlier run is still stale, saying the broker
    restarted, and an acked one still says its lease ended."""
    handle = await _received_handle(broker, "sg", "handles")
    boot, token, version = handle.split(".")
    future_boot = f"{int(time.time() * 1000) + 86_400_000:x}" + "0" * 8
    for made_up in ["a.1.0", "not-a-handle", f"{boot}.{token}.{int(version) + 5}", f"{future_boot}.{token}.0",
                    f"zz{boot}.{token}.{version}", 12]:
        result = await _settle(broker, "sg", made_up)
        assert result[0] == StaleReceiptError.code, (made_up, result)
        assert result[1].startswith("unknown receipt handle"), (made_up, result)
        assert "restarted" not in result[1], (made_up, result)
    assert await _settle(broker, "sg", handle) is True
    again = await _settle(broker, "sg", handle)
    assert again[0] == StaleReceiptError.code and "acked, failed or expired" in again[1], again
    # the genuine restart case: a handle of the previous run
    held = await _received_handle(broker, "sg", "handles2")
    broker.restart()
    result = await _settle(broker, "sg", held)
    assert result[0] == StaleReceiptError.code and "the broker restarted" in result[1], result
    # handles of versions before the time-stamped boot (8 hex digits): an earlier run too
    result = await _settle(broker, "sg", "0123abcd.1.0")
    assert result[0] == StaleReceiptError.code and "the broker restarted" in result[1], result

