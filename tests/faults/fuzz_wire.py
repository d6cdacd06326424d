"""What the socket fuzzer sends: a msgpack writer that can also write wrong bytes, and the
Hypothesis strategies of requests, malformed frames and whole client sessions.

How this works
--------------
A drawn ``Session`` holds *templates*: payloads in which topic and group names, and the
ids of transactions, are placeholders (``Name``, ``TxId``). The driver resolves them at
run time (a fresh name is one no request has used before; a pool name is one of a few
shared ones), encodes each request with ``pack`` and decodes the bytes again with the
project's ``FrameDecoder``: what that decoder refuses is a malformed frame for the broker
too, and what it returns is exactly the payload the broker sees (which is what the model
in ``fuzz_model`` judges). ``pack`` writes what ``msgpack`` cannot: strings that are not
UTF-8 (``RawStr``), verbatim bytes (``Raw``), wide encodings of small values (``Wide``),
32-bit floats (``F32``) and nesting deeper than Python's recursion limit (``Deep``).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

import msgpack
from hypothesis import strategies as st

from protocol import Op

__all__ = [
    "Raw", "RawStr", "Wide", "F32", "Deep", "Name", "DlqOf", "TxId", "UnknownTxId",
    "Request", "Tail", "Session", "pack", "frame_bytes", "sessions", "MAX_MESSAGE_SIZE",
    "RID_KINDS", "garbage",
]

#: The broker under fuzz runs with ``--max-message-size`` this small, so that oversized
#: bodies and frames are cheap to send (its frame limit is this + 64 KiB).
MAX_MESSAGE_SIZE = 64 * 1024


# -- values that only pack() can write ----------------------------------------------------

@dataclass(frozen=True)
class Raw:
    """Bytes written verbatim where a value is expected (invalid or truncated msgpack)."""

    data: bytes


@dataclass(frozen=True)
class RawStr:
    """A msgpack ``str`` whose bytes need not be UTF-8."""

    data: bytes


@dataclass(frozen=True)
class Wide:
    """A value written with the widest header of its type (valid, but not canonical)."""

    value: Any


@dataclass(frozen=True)
class F32:
    """A float written as msgpack float 32."""

    value: float


@dataclass(frozen=True)
class Deep:
    """``depth`` nested one-element arrays around nil (written without recursion)."""

    depth: int


# -- placeholders resolved by the driver --------------------------------------------------

@dataclass(frozen=True)
class Name:
    """A topic or group name: ``pool`` (shared, may exist), ``fresh`` (never used before),
    ``tx`` (the group owning the prepared transactions)."""

    kind: str  # "topic" | "group"
    source: str  # "pool" | "fresh" | "tx"
    index: int = 0


@dataclass(frozen=True)
class DlqOf:
    """The dead-letter topic of a group: ``%DLQ%`` + the resolved group name."""

    group: Any


@dataclass(frozen=True)
class TxId:
    """The id of one of the prepared half messages made before the fuzz starts."""

    index: int


@dataclass(frozen=True)
class UnknownTxId:
    """A well-formed message id that no message has (epoch FFFFFFFF is never used)."""

    pos: int


# -- what a session sends -------------------------------------------------------------

RID_KINDS = ("next", "zero", "negative", "huge", "lowest")


@dataclass(frozen=True)
class Request:
    """One frame ``[op, rid, payload]``; ``rid_kind`` is mapped to a value unique in its session."""

    op: int
    rid_kind: str
    payload: Any


@dataclass(frozen=True)
class Tail:
    """Bytes that end a session: a malformed frame (``kind`` says which) or a partial one."""

    kind: str
    data: Any  # bytes, or a Request whose encoding is cut (kind "partial")


@dataclass(frozen=True)
class Session:
    """One TCP connection: ``requests`` pipelined, then maybe a ``tail``.

    ``mode``: ``reading`` (reads every answer), ``abrupt`` (closes, sometimes with a reset,
    as soon as the bytes are written) or ``never_read`` (never reads its socket and is
    closed later). ``cuts``: where the bytes are split into separate writes, as fractions
    of the stream (``bytewise``: one write per byte).
    """

    mode: str
    requests: tuple[Request, ...]
    tail: Tail | None = None
    cuts: tuple[float, ...] = ()
    bytewise: bool = False
    reset: bool = False
    linger: bool = False
    notes: tuple[str, ...] = field(default=())


# -- the writer -----------------------------------------------------------------------

def _pack_len(out: bytearray, n: int, fix: int | None, fix_max: int, w8: int | None, w16: int, w32: int) -> None:
    if fix is not None and n <= fix_max:
        out.append(fix | n)
    elif w8 is not None and n < 256:
        out += bytes((w8, n))
    elif n < 65536:
        out += bytes((w16,)) + struct.pack(">H", n)
    else:
        out += bytes((w32,)) + struct.pack(">I", n)


def pack(value: Any, out: bytearray | None = None) -> bytearray:
    """Append the msgpack encoding of ``value`` (plain values and the wrappers above) to ``out``."""
    if out is None:
        out = bytearray()
    if isinstance(value, Raw):
        out += value.data
    elif isinstance(value, RawStr):
        _pack_len(out, len(value.data), 0xA0, 31, 0xD9, 0xDA, 0xDB)
        out += value.data
    elif isinstance(value, Deep):
        out += b"\x91" * value.depth + b"\xc0"
    elif isinstance(value, F32):
        out += b"\xca" + struct.pack(">f", value.value)
    elif isinstance(value, Wide):
        v = value.value
        if type(v) is int:
            out += (b"\xd3" + struct.pack(">q", v)) if v < 0 else (b"\xcf" + struct.pack(">Q", v))
        elif isinstance(v, str):
            data = v.encode()
            out += b"\xdb" + struct.pack(">I", len(data)) + data
        elif isinstance(v, bytes):
            out += b"\xc6" + struct.pack(">I", len(v)) + v
        elif isinstance(v, list | tuple):
            out += b"\xdd" + struct.pack(">I", len(v))
            for item in v:
                pack(item, out)
        elif isinstance(v, dict):
            out += b"\xdf" + struct.pack(">I", len(v))
            for k, item in v.items():
                pack(k, out)
                pack(item, out)
        else:
            pack(v, out)
    elif isinstance(value, list | tuple):
        _pack_len(out, len(value), 0x90, 15, None, 0xDC, 0xDD)
        for item in value:
            pack(item, out)
    elif isinstance(value, dict):
        _pack_len(out, len(value), 0x80, 15, None, 0xDE, 0xDF)
        for k, item in value.items():
            pack(k, out)
            pack(item, out)
    else:  # None, bool, int, float, str, bytes, ExtType
        out += msgpack.packb(value, use_bin_type=True)
    return out


def frame_bytes(op: Any, rid: Any, payload: Any) -> bytes:
    """A whole frame: 4-byte length, then ``[op, rid, payload]`` written by ``pack``."""
    body = pack([op, rid, payload])
    return struct.pack(">I", len(body)) + bytes(body)


# -- strategies: values ---------------------------------------------------------------

INT_EXTREMES = [0, 1, -1, 2**31 - 1, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, -(2**31), -(2**63)]
BAD_NAMES = ["", "a" * 128, "bad name", "é", "a/b", "..", "\x00", "t\n", "%DLQ%", "%DLQ%bad name",
             "%HALF%", "%OP%", "%RETRY%fzg0", "%x", " fz", "fz*", "ＡＢ"]

ints = st.one_of(st.sampled_from(INT_EXTREMES), st.integers(-(2**63), 2**64 - 1))
floats = st.one_of(st.sampled_from([float("inf"), float("-inf"), float("nan"), 1e300, -0.0, 0.5, 2.5]),
                   st.floats(allow_nan=True, allow_infinity=True))
texts = st.one_of(st.text(max_size=24), st.sampled_from(BAD_NAMES), st.text(min_size=200, max_size=400))
binaries = st.binary(max_size=48)
exts = st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=8))
keys = st.one_of(st.none(), st.booleans(), ints, st.text(max_size=12), st.binary(max_size=8))
scalars = st.one_of(st.none(), st.booleans(), ints, floats, texts, binaries, exts,
                    st.floats(width=32).map(F32), ints.map(Wide), st.text(max_size=8).map(Wide))

#: Any decodable value: scalars, small containers, deep nesting (around Python's recursion
#: limit: 900-1000 levels are decodable, past about 1020 msgpack refuses), long lists.
garbage = st.one_of(
    st.recursive(scalars, lambda inner: st.lists(inner, max_size=5)
                 | st.dictionaries(keys, inner, max_size=5), max_leaves=12),
    st.sampled_from([3, 100, 899, 950, 990, 1000, 1010]).map(Deep),
    st.integers(100, 3000).map(lambda n: [None] * n),
    st.integers(100, 3000).map(lambda n: {i: i for i in range(n)}),
)


def _or_garbage(valid: st.SearchStrategy, p_valid: float = 0.85) -> st.SearchStrategy:
    """Mostly ``valid``, sometimes anything at all."""
    weight = int(p_valid * 20)
    return st.one_of(*([valid] * weight), *([garbage] * (20 - weight)))


topics = st.one_of(
    st.builds(Name, st.just("topic"), st.just("pool"), st.integers(0, 3)),
    st.builds(Name, st.just("topic"), st.just("pool"), st.integers(0, 3)),
    st.builds(Name, st.just("topic"), st.just("fresh")),
    st.sampled_from(BAD_NAMES),
    garbage,
)
groups = st.one_of(
    st.builds(Name, st.just("group"), st.just("pool"), st.integers(0, 2)),
    st.builds(Name, st.just("group"), st.just("pool"), st.integers(0, 2)),
    st.builds(Name, st.just("group"), st.just("fresh")),
    st.builds(Name, st.just("group"), st.just("tx")),
    st.sampled_from(BAD_NAMES),
    garbage,
)
tags = st.one_of(st.none(), st.sampled_from(["TagA", "TagB", "", "A || B", "*", "||"]), texts)
bodies = st.one_of(
    st.binary(max_size=64), st.binary(max_size=64), st.binary(max_size=2000),
    st.sampled_from([MAX_MESSAGE_SIZE, MAX_MESSAGE_SIZE + 1]).map(lambda n: b"\xab" * n),
    texts,
)
message_keys = st.lists(st.text(max_size=10), max_size=3)
properties = st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3)
borns = st.one_of(st.integers(0, 2**41), ints)
good_message = st.tuples(bodies, tags, message_keys, properties, borns).map(list)
#: The sixth element of a message: its options (a FIFO message group; delay / at).
options = st.one_of(
    st.fixed_dictionaries({"group": st.one_of(st.sampled_from(["order-1", "order-2"]), st.text(max_size=300))}),
    st.fixed_dictionaries({}, optional={"group": garbage, "delay": st.integers(-10, 10**6), "at": ints,
                                        "x": garbage}),
    garbage,
)
messages = st.one_of(
    good_message, good_message, good_message,
    st.tuples(good_message, options).map(lambda mo: [*mo[0], mo[1]]),
    st.lists(_or_garbage(good_message, 0.0), max_size=7),  # wrong length or types
    garbage,
)
msgs_lists = st.one_of(
    st.lists(messages, min_size=1, max_size=4),
    st.lists(messages, min_size=1, max_size=4),
    st.just([]),
    st.sampled_from([1000, 5000, 15000]).map(lambda n: [[b"", None, [], {}, 0]] * n),
)


def _msg_id() -> st.SearchStrategy:
    return st.one_of(st.builds(TxId, st.integers(0, 199)), st.builds(TxId, st.integers(0, 199)),
                     st.builds(UnknownTxId, st.integers(0, 2**40)), texts, garbage)


outcomes = st.one_of(st.sampled_from(["COMMIT", "ROLLBACK"]), st.sampled_from(["COMMIT", "ROLLBACK"]),
                     st.sampled_from(["commit", "UNKNOWN", "COMMITTED", ""]), garbage)


# -- strategies: payloads per op --------------------------------------------------------

def hello_payload(*, valid_only: bool = False) -> st.SearchStrategy:
    """A HELLO payload (``valid_only``: one the broker must accept as a first frame)."""
    if valid_only:
        return st.fixed_dictionaries({
            "version": st.just(1),
            "client_id": st.text(min_size=1, max_size=40),
            "role": st.sampled_from(["producer", "consumer"]),
            "group": st.one_of(st.none(), st.builds(Name, st.just("group"), st.just("pool"), st.integers(0, 2)),
                               st.builds(Name, st.just("group"), st.just("tx"))),
        })
    return st.fixed_dictionaries({
        "version": _or_garbage(st.just(1), 0.9),
        "client_id": _or_garbage(st.one_of(st.text(min_size=1, max_size=40), st.text(min_size=250, max_size=300)), 0.9),
        "role": _or_garbage(st.sampled_from(["producer", "consumer"]), 0.9),
        "group": st.one_of(st.none(), groups),
    })


def _payload(op: int) -> st.SearchStrategy:
    if op == Op.HELLO:
        return hello_payload()
    if op == Op.SEND:
        return st.fixed_dictionaries({"topic": topics, "msgs": msgs_lists},
                                     optional={"half": _or_garbage(st.booleans(), 0.8)})
    if op == Op.END_TX:
        single = st.fixed_dictionaries({"msg_id": _msg_id(), "outcome": outcomes})
        item = st.one_of(st.tuples(_msg_id(), outcomes).map(list), garbage)
        many = st.fixed_dictionaries({"items": st.one_of(st.lists(item, min_size=1, max_size=6),
                                                         st.just([]), garbage)})
        return st.one_of(single, single, many)
    if op == Op.SUBSCRIBE:
        return st.fixed_dictionaries(
            {"group": groups, "topic": st.one_of(topics, topics, groups.map(DlqOf))},
            optional={
                "tags": tags,
                "start": _or_garbage(st.sampled_from(["earliest", "latest"]), 0.8),
                "prefetch": _or_garbage(st.one_of(st.integers(1, 64), st.integers(-3, 0),
                                                  st.sampled_from([65, 10**6, 2**63 - 1, 2**64 - 1])), 0.8),
                "max_reconsume_times": _or_garbage(st.one_of(st.integers(0, 20), st.integers(-3, -1),
                                                             st.sampled_from([2**63 - 1])), 0.8),
                "fifo": _or_garbage(st.booleans(), 0.8),
            },
        )
    if op == Op.RECEIVE:
        return st.fixed_dictionaries(
            {"group": groups, "topic": st.one_of(topics, topics, groups.map(DlqOf))},
            optional={
                "tags": tags,
                "max": _or_garbage(st.one_of(st.integers(1, 64), st.integers(-1, 0), st.sampled_from([4096, 4097])), 0.8),
                "invisible_ms": _or_garbage(st.one_of(st.integers(100, 5000), st.sampled_from([99, 12 * 3600 * 1000 + 1])),
                                            0.8),
                "wait_ms": _or_garbage(st.one_of(st.integers(0, 200), st.sampled_from([-1, 60_001])), 0.8),
            },
        )
    if op == Op.SETTLE:
        handle = st.one_of(st.text(max_size=30), st.sampled_from(["x.1.0", "0123abcd.1.1", "a.b.c", "..", "a.１.0"]),
                           garbage)
        item = st.one_of(st.tuples(handle, st.sampled_from(["ack", "nack", "cid", "x"]), ints).map(list), garbage)
        return st.fixed_dictionaries({"group": groups, "s": st.one_of(st.lists(item, min_size=1, max_size=5),
                                                                      st.just([]), garbage)})
    if op == Op.RECALL:
        return st.fixed_dictionaries({"msg_id": _msg_id()})
    if op == Op.ACK:
        token = st.one_of(st.integers(0, 50), ints)
        item = st.one_of(st.tuples(token, st.booleans()).map(list), st.tuples(token, st.booleans()).map(list),
                         garbage)
        return st.fixed_dictionaries({"a": st.one_of(st.lists(item, max_size=6), garbage,
                                                     st.integers(1000, 10000).map(lambda n: [[1, True]] * n))})
    if op in (Op.UNSUBSCRIBE, Op.PING):
        return _or_garbage(st.just({}), 0.8)
    if op == Op.ERROR:
        return _or_garbage(st.fixed_dictionaries({"code": _or_garbage(st.integers(1, 9)), "message": texts}), 0.6)
    return garbage  # REPLY, DELIVER, CHECK and unknown operations


MUTATIONS = st.sampled_from(["drop", "extra", "replace"] * 6 + ["bad-utf8"])
#: Bytes that are not UTF-8: a string holding them makes the whole frame undecodable.
NOT_UTF8 = [b"\xff", b"\xc3\x28", b"a\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\xc0\xaf"]


@st.composite
def mutated(draw: st.DrawFn, payload: st.SearchStrategy) -> Any:
    """A payload with 0-3 fields dropped, added or replaced by garbage, or none at all."""
    value = draw(payload)
    if type(value) is not dict or draw(st.integers(0, 9)) < 5:
        return value
    value = dict(value)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(MUTATIONS)
        if kind == "bad-utf8" and value:
            value[draw(st.sampled_from(sorted(value, key=repr)))] = RawStr(draw(st.sampled_from(NOT_UTF8)))
        elif kind == "extra" or not value:
            value[draw(st.one_of(st.text(max_size=10), keys))] = draw(garbage)
        elif kind == "drop":
            del value[draw(st.sampled_from(sorted(value, key=repr)))]
        else:
            value[draw(st.sampled_from(sorted(value, key=repr)))] = draw(garbage)
    return value


OPS = [op for op in Op] + [0, 12, 19, 23, 99, 255, 2**64 - 1, -1]
op_codes = st.one_of(
    st.sampled_from([Op.SEND, Op.SEND, Op.SUBSCRIBE, Op.ACK, Op.END_TX, Op.HELLO, Op.PING, Op.UNSUBSCRIBE,
                     Op.RECEIVE, Op.SETTLE]),
    st.sampled_from(OPS),
)
rid_kinds = st.sampled_from(["next"] * 6 + ["zero"] * 2 + ["negative", "huge", "lowest"])


@st.composite
def requests(draw: st.DrawFn) -> Request:
    """Any request frame of any op (mostly documented ones), payload valid or mutated."""
    op = draw(op_codes)
    payload = draw(mutated(_payload(op) if op in list(Op) else garbage))
    if draw(st.integers(0, 30)) == 0:
        payload = draw(garbage)  # the whole payload replaced
    return Request(int(op), draw(rid_kinds), payload)


# -- strategies: malformed frames -------------------------------------------------------

def _framed(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


tails = st.one_of(
    st.just(Tail("zero-length", b"\x00\x00\x00\x00")),
    st.builds(lambda n, extra: Tail("oversized", struct.pack(">I", n) + extra),
              st.integers(MAX_MESSAGE_SIZE + 64 * 1024 + 1, 2**32 - 1), st.binary(max_size=16)),
    st.builds(lambda v: Tail("not-an-array", _framed(bytes(pack(v)))),
              st.one_of(st.dictionaries(st.text(max_size=4), scalars, max_size=3), scalars)),
    st.builds(lambda n: Tail("wrong-arity", _framed(bytes(pack([Op.PING, 1, {}, None][:n])))),
              st.sampled_from([0, 1, 2, 4])),
    st.builds(lambda op, rid: Tail("non-int-header", _framed(bytes(pack([op, rid, {}])))),
              st.one_of(st.booleans(), st.text(max_size=3), st.floats(), st.none(), st.just(9)),
              st.one_of(st.booleans(), st.text(max_size=3), st.floats(), st.none())),
    st.builds(lambda b: Tail("invalid-utf8", _framed(bytes(pack([Op.HELLO, 1, {"client_id": RawStr(b)}])))),
              st.sampled_from(NOT_UTF8)),
    st.builds(lambda b: Tail("undecodable", _framed(b)),
              st.sampled_from([b"\xc1", b"\x93\x01\x01", b"\x93\x01\x01\xdb\xff\xff\xff\xff",
                               b"\x93\x01\x01\x80\x00", b"\xd6\xff\x00"])),
    st.builds(lambda b: Tail("garbage", b), st.binary(min_size=1, max_size=64)),
    st.builds(lambda d: Tail("too-deep", _framed(b"\x93\x09\x01" + bytes(pack(Deep(d))))),
              st.sampled_from([1030, 5000, 60000])),
)


# -- strategies: sessions ----------------------------------------------------------------

@st.composite
def sessions(draw: st.DrawFn) -> Session:
    """One connection's worth of traffic (see ``Session``)."""
    mode = draw(st.sampled_from(["reading"] * 6 + ["abrupt", "never_read"]))
    reqs = draw(st.lists(requests(), max_size=8))
    if draw(st.integers(0, 9)) < 8:  # most sessions start with a valid handshake, to get further
        reqs = [Request(Op.HELLO, "next", draw(hello_payload(valid_only=True))), *reqs]
    tail = None
    if draw(st.integers(0, 3)) == 0:
        tail = draw(tails)
    elif mode != "reading" and draw(st.booleans()):
        tail = Tail("partial", draw(requests()))
    cuts = tuple(sorted(draw(st.lists(st.floats(0, 1), max_size=4))))
    return Session(mode=mode, requests=tuple(reqs), tail=tail, cuts=cuts,
                   bytewise=draw(st.integers(0, 15)) == 0, reset=draw(st.booleans()),
                   linger=mode == "never_read" and draw(st.booleans()))
