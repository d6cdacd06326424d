"""Names and records: pure functions, exhaustive round trips."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.engines.jetstream import naming
from broker.engines.jetstream.records import (
    Kind,
    decode_record,
    encode_dead,
    encode_half,
    encode_message,
    encode_pointer,
)

_SUBJECT_SAFE = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


@given(st.one_of(st.none(), st.text()))
def test_tag_token_round_trip_and_is_one_safe_token(tag):
    tok = naming.encode_tag(tag)
    assert tok and set(tok) <= _SUBJECT_SAFE
    assert naming.decode_tag(tok) == tag


@given(st.text(), st.text())
def test_tag_tokens_are_one_to_one(a, b):
    if a != b:
        assert naming.encode_tag(a) != naming.encode_tag(b)
    assert naming.encode_tag(a) != naming.encode_tag(None)


def test_tag_token_examples():
    assert naming.encode_tag("TagA") == "TagA"
    assert naming.encode_tag("a.b *>") == "a_2Eb_20_2A_3E"
    assert naming.encode_tag("x_y") == "x_5Fy"
    assert naming.encode_tag("") == "__"
    assert naming.encode_tag(None) == "_"
    for bad in ("_", "a_2e", "a_ZZ", "a.b", "", "a_2"):
        with pytest.raises(ValueError):
            naming.untoken(bad)


@given(st.text(alphabet="0123456789ABCDEF", min_size=8, max_size=8), st.integers(1, 2**64 - 1))
def test_msg_id_round_trip(prefix, seq):
    msg_id = naming.encode_msg_id(prefix, seq)
    assert len(msg_id) == 24
    assert naming.decode_msg_id(msg_id) == (prefix, seq)
    # the native reply shape: prefix + pos as 16 upper-case hex digits
    assert msg_id == prefix + f"{seq:016X}"


def test_malformed_msg_ids():
    for bad in ("", "0" * 24, "G" * 24, "8F4F14E8" + "1" * 15, 17, "8f4f14e80000000000000001"):
        with pytest.raises(ValueError):
            naming.decode_msg_id(bad)


def test_subjects_and_filters():
    assert naming.message_subject("orders", 2, "A.B") == "hmq.orders.m.2.A_2EB"
    assert naming.parse_topic_subject("hmq.orders.m.2.A_2EB") == ("m", "", 2, "A.B")
    assert naming.parse_topic_subject(naming.half_subject("orders", 3)) == ("h", "", 3, None)
    assert naming.parse_topic_subject(naming.resend_subject("orders", "g-1", 0)) == ("r", "g-1", 0, None)
    with pytest.raises(ValueError):
        naming.parse_topic_subject("hmqs.tx.d.X")
    # what is not a topic's lies outside every topic stream's hmq.<T>.>, whatever T is
    for shared in (naming.tx_decision_subject("X"), naming.tx_check_subject("X"), naming.dlq_subject("g"),
                   naming.settings_subject("k"), naming.SETTINGS_CHANGED, naming.id_subject("ABCD0123")):
        assert not shared.startswith("hmq."), shared
    assert naming.tag_filter_subjects("o", "*") == ["hmq.o.m.>"]
    assert naming.tag_filter_subjects("o", "B || A || B") == ["hmq.o.m.*.A", "hmq.o.m.*.B"]
    for bad in ("", "A || ", " || "):
        with pytest.raises(ValueError):
            naming.tag_filter_subjects("o", bad)
    assert naming.topic_of_stream(naming.topic_stream("x_1")) == "x_1"
    assert naming.topic_of_stream("HMQ_TX") is None
    a = naming.stream_id_prefix("HMQ_T_a", "2026-01-01T00:00:00Z")
    assert len(a) == 8 and a != naming.stream_id_prefix("HMQ_T_a", "2026-01-01T00:00:01Z")
    assert a != naming.stream_id_prefix("HMQ_T_a", "2026-01-01T00:00:00Z", salt=1)


@given(st.binary(), st.one_of(st.none(), st.text()), st.lists(st.text()),
       st.dictionaries(st.text(), st.text()), st.integers(0, 2**62))
def test_records_round_trip(body, tags, keys, props, born):
    m = decode_record(encode_message(body, tags, keys, props, born))
    assert (m.kind, m.body, m.tags, m.keys, m.properties, m.born_ms) == (Kind.MESSAGE, body, tags, keys, props, born)
    h = decode_record(encode_half(body, tags, keys, props, born, group="g", instance="i-1"))
    assert (h.kind, h.body, h.producer_group, h.producer_instance) == (Kind.HALF, body, "g", "i-1")
    d = decode_record(encode_dead(body, tags, keys, props, born, msg_id="X" * 24, topic="t"))
    assert (d.kind, d.body, d.msg_id, d.topic, d.keys) == (Kind.DEAD, body, "X" * 24, "t", keys)
    assert decode_record(encode_pointer(born + 1)).half_seq == born + 1


def test_records_refuse_foreign_payloads():
    import msgpack

    for bad in (b"", b"\xc1", msgpack.packb([]), msgpack.packb({"a": 1}), msgpack.packb([9, 1]),
                msgpack.packb([3, "x"]), msgpack.packb([1, b"x"])):
        with pytest.raises(ValueError):
            decode_record(bad)
