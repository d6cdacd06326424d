"""Codec tests: frames round-trip whatever the chunking; bad input is refused early."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol import (
    FrameDecoder,
    FrameTooLargeError,
    Message,
    Op,
    ProtocolError,
    encode_frame,
    error_from_code,
)
from protocol.errors import ERRORS_BY_CODE, HalfMQError
from protocol.names import validate_name, validate_send_topic, validate_subscribe_topic

payloads = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=20) | st.binary(max_size=64),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
frames = st.tuples(st.sampled_from(list(Op)), st.integers(0, 2**31), payloads)


@given(st.lists(frames, min_size=1, max_size=8), st.lists(st.integers(1, 50), min_size=1, max_size=30))
def test_frames_round_trip_in_any_chunking(items, cuts):
    data = b"".join(encode_frame(op, rid, p) for op, rid, p in items)
    dec = FrameDecoder()
    out = []
    pos = 0
    i = 0
    while pos < len(data):
        step = cuts[i % len(cuts)]
        out += dec.feed(data[pos : pos + step])
        pos += step
        i += 1
    assert [(op, rid, p) for op, rid, p in out] == [(int(op), rid, p) for op, rid, p in items]


def test_oversized_frame_refused_from_the_length_prefix_alone():
    dec = FrameDecoder(max_frame_size=1000)
    header = (5000).to_bytes(4, "big")
    with pytest.raises(FrameTooLargeError) as info:
        dec.feed(header)  # nothing of the payload has arrived: refused before buffering
    assert "5000" in str(info.value)


@pytest.mark.parametrize(
    "payload",
    [msgpack.packb({"a": 1}), msgpack.packb([1, 2]), msgpack.packb(["x", 1, {}]), b"\xc1\xc1\xc1"],
)
def test_malformed_frames_raise_protocol_error(payload):
    dec = FrameDecoder()
    with pytest.raises(ProtocolError):
        dec.feed(len(payload).to_bytes(4, "big") + payload)


def test_empty_frame_is_malformed():
    with pytest.raises(ProtocolError):
        FrameDecoder().feed(b"\x00\x00\x00\x00")


def test_message_wire_round_trip():
    m = Message("id", "t", b"\x00body", "A", ("k1", "k2"), {"p": "v"}, 1, 2, 3, 4, 5)
    assert Message.from_wire(msgpack.unpackb(msgpack.packb(m.to_wire()), raw=False)) == m
    with pytest.raises(ValueError):
        Message.from_wire([1, 2])


def test_error_table_is_one_to_one_and_round_trips():
    assert len({cls.code for cls in ERRORS_BY_CODE.values()}) == len(ERRORS_BY_CODE)
    for code, cls in ERRORS_BY_CODE.items():
        exc = error_from_code(code, "why")
        assert type(exc) is cls and str(exc) == "why" and isinstance(exc, HalfMQError)
    assert type(error_from_code(999, "x")) is HalfMQError
    assert ERRORS_BY_CODE[2].retriable and not ERRORS_BY_CODE[3].retriable


@pytest.mark.parametrize("name", ["a", "A-b_9", "x" * 127])
def test_good_names(name):
    assert validate_name(name) == name


@pytest.mark.parametrize("name", ["", "x" * 128, "a b", "a/b", "é", None, 5, "%DLQ%g"])
def test_bad_names(name):
    with pytest.raises(HalfMQError):
        validate_name(name)


def test_reserved_topics():
    with pytest.raises(HalfMQError):
        validate_send_topic("%DLQ%g")
    assert validate_subscribe_topic("%DLQ%g") == "%DLQ%g"
    with pytest.raises(HalfMQError):
        validate_subscribe_topic("%DLQ%bad name")
