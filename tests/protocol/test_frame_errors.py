"""Codec errors: what a bad frame leaves behind; untrusted ERROR payloads and names."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol import (
    FrameDecoder,
    FrameTooLargeError,
    HalfMQError,
    Op,
    ProtocolError,
    encode_frame,
    error_from_code,
)
from protocol.errors import BadRequestError, InvalidNameError, TransactionStateError
from protocol.names import validate_name, validate_send_topic, validate_subscribe_topic

GOOD: list[tuple[int, int, object]] = [(Op.PING, 1, {}), (Op.SEND, 2, {"topic": "t", "msgs": [[b"x", None, [], {}, 0]]})]
BAD_TAILS = {
    "empty frame": (b"\x00\x00\x00\x00", ProtocolError),
    "undecodable": (b"\x00\x00\x00\x02\xc1\xc1", ProtocolError),
    "not an array": (b"\x00\x00\x00\x01\x80", ProtocolError),
    "too large": (b"\x7f\x00\x00\x00", FrameTooLargeError),
}


@pytest.mark.parametrize("tail", sorted(BAD_TAILS))
def test_frames_completed_before_a_bad_one_travel_with_the_error(tail):
    data, error = BAD_TAILS[tail]
    stream = b"".join(encode_frame(*f) for f in GOOD) + data
    with pytest.raises(error) as info:
        FrameDecoder(max_frame_size=1 << 20).feed(stream)
    assert [(op, rid, p) for op, rid, p in info.value.frames] == [(int(o), r, p) for o, r, p in GOOD]


def test_a_bad_frame_alone_carries_no_frames_and_a_partial_one_is_not_delivered():
    dec = FrameDecoder()
    first = encode_frame(Op.PING, 1, {})
    assert dec.feed(first[:3]) == []  # partial: kept, not delivered
    with pytest.raises(ProtocolError) as info:
        dec.feed(first[3:] + b"\x00\x00\x00\x00")
    assert [f[:2] for f in info.value.frames] == [(Op.PING, 1)]
    with pytest.raises(ProtocolError) as info:
        FrameDecoder().feed(b"\x00\x00\x00\x00")
    assert list(info.value.frames) == []
    assert list(ProtocolError("raised elsewhere").frames) == []  # a class default, never shared


@given(st.integers(0, 3), st.integers(1, 40))
def test_frames_before_an_error_do_not_depend_on_the_chunking(n_good, step):
    stream = b"".join(encode_frame(Op.PING, i + 1, {"i": i}) for i in range(n_good)) + b"\x00" * 4
    dec = FrameDecoder()
    seen: list[tuple[int, int, object]] = []
    with pytest.raises(ProtocolError) as info:
        for pos in range(0, len(stream), step):
            seen += dec.feed(stream[pos : pos + step])
    seen += info.value.frames
    assert [rid for _op, rid, _p in seen] == list(range(1, n_good + 1))


@pytest.mark.parametrize(
    ("code", "message", "cls", "text"),
    [
        (6, "conflict", TransactionStateError, "conflict"),
        (8, "bad", BadRequestError, "bad"),
        ([1], "x", HalfMQError, "x"),  # unhashable: used to raise TypeError in the reader
        ({"a": 1}, "x", HalfMQError, "x"),
        ("6", "x", HalfMQError, "x"),  # a string is not a code
        (True, "x", HalfMQError, "x"),  # nor is a bool
        (2**70, "x", HalfMQError, "x"),
        (None, None, HalfMQError, "None"),
        (8, b"\xff" * 1000, BadRequestError, None),
    ],
)
def test_error_from_code_never_raises_on_an_untrusted_payload(code, message, cls, text):
    exc = error_from_code(code, message)
    assert type(exc) is cls
    if text is not None:
        assert str(exc) == text
    assert len(str(exc)) < 200


def test_error_from_code_abbreviates_deeply_nested_messages():
    deep: list = []
    for _ in range(5000):
        deep = [deep]
    assert len(str(error_from_code(8, deep))) < 200


@pytest.mark.parametrize("check", [validate_name, validate_send_topic, validate_subscribe_topic])
@pytest.mark.parametrize("value", ["deep", "long", "%long"])
def test_name_errors_quote_the_value_abbreviated(check, value):
    """A name 5,000 levels deep or a megabyte long is refused with a short message
    (``repr`` of the first raised RecursionError inside the broker's request handler)."""
    if value == "deep":
        bad: object = None
        for _ in range(5000):
            bad = [bad]
    else:
        bad = value[:-4] + "x" * (1 << 20)
    with pytest.raises(InvalidNameError) as info:
        check(bad)
    assert len(str(info.value)) < 400
