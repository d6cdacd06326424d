"""The broker's decoder bounds what one frame can cost before any check runs: in a frame
over ``BOUNDED_FRAME_SIZE`` bytes, lists and maps of at most ``MAX_FRAME_ITEMS`` entries and
no extension types; over ``COUNTED_FRAME_SIZE``, at most ``MAX_FRAME_ITEMS`` lists and maps
in all. 4 MiB of empty arrays under the frame size limit were 4 million lists: seconds of
the event loop. An SDK's decoder (no ``max_items``) decodes what its broker sends as before."""

from __future__ import annotations

import struct

import msgpack
import pytest

from protocol import (
    MAX_FRAME_ITEMS,
    MAX_SEND_MESSAGES,
    FrameDecoder,
    Op,
    ProtocolError,
    encode_frame,
)
from protocol.frames import BOUNDED_FRAME_SIZE, COUNTED_FRAME_SIZE

LIMIT = 8 << 20


def _frame(obj: object) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


def _refusal(obj: object) -> str:
    with pytest.raises(ProtocolError) as info:
        FrameDecoder(LIMIT, MAX_FRAME_ITEMS).feed(_frame(obj))
    return str(info.value)


def test_a_list_or_map_longer_than_the_bound_is_refused_by_its_header():
    assert MAX_FRAME_ITEMS >= 4 * MAX_SEND_MESSAGES + 3  # a SEND of the most messages, every field a container
    text = _refusal([Op.SEND, 1, [None] * (MAX_FRAME_ITEMS + 1)])
    assert text == f"undecodable frame: a list of {MAX_FRAME_ITEMS + 1} entries (at most {MAX_FRAME_ITEMS} in one frame)"
    text = _refusal([Op.SEND, 1, {str(i): 0 for i in range(MAX_FRAME_ITEMS + 1)}])
    assert text == f"undecodable frame: a map of {MAX_FRAME_ITEMS + 1} entries (at most {MAX_FRAME_ITEMS} in one frame)"
    # 4 MiB of empty arrays in one list: refused from the list's header, nothing built
    assert "a list of 4000000 entries" in _refusal([Op.SEND, 1, [[]] * 4_000_000])


def test_a_large_frame_of_too_many_lists_and_maps_is_refused():
    # each list within the bound, 4 MB in all: 4 million empty lists
    many = [Op.SEND, 1, [[[]] * 10_000] * 400]
    assert len(_frame(many)) > COUNTED_FRAME_SIZE
    assert _refusal(many) == f"undecodable frame: more than {MAX_FRAME_ITEMS} lists and maps in one frame"
    maps = [Op.SEND, 1, [[{}] * 10_000] * 400]
    assert "lists and maps in one frame" in _refusal(maps)


def test_the_largest_send_of_real_messages_is_decoded_whole():
    """10,000 messages with every field a list or a map (keys, properties, options): 40,003
    lists and maps in a frame counted because it is over ``COUNTED_FRAME_SIZE``."""
    message = [b"x" * 100, "tag", ["k1", "k2"], {"p": "v"}, 1, {"group": "g"}]
    payload = {"topic": "t", "msgs": [message] * MAX_SEND_MESSAGES}
    data = encode_frame(Op.SEND, 7, payload)
    assert len(data) > COUNTED_FRAME_SIZE
    [(op, rid, got)] = FrameDecoder(LIMIT, MAX_FRAME_ITEMS).feed(data)
    assert (op, rid) == (Op.SEND, 7) and len(got["msgs"]) == MAX_SEND_MESSAGES and got["msgs"][-1] == message
    # the count starts again with each frame: two such frames in one read are both decoded
    assert len(FrameDecoder(LIMIT, MAX_FRAME_ITEMS).feed(data + data)) == 2


def test_extension_types_are_refused_and_timestamps_are_numbers():
    many = [Op.SEND, 1, [msgpack.ExtType(5, b"")] * 20_000]  # 60 KB: 20,000 Python calls
    assert len(_frame(many)) > BOUNDED_FRAME_SIZE
    assert _refusal(many) == "undecodable frame: a msgpack extension type (no request holds one)"
    padded = [Op.PING, 1, [msgpack.Timestamp(2, 5), b"." * BOUNDED_FRAME_SIZE]]
    [(_, _, got)] = FrameDecoder(LIMIT, MAX_FRAME_ITEMS).feed(_frame(padded))
    assert got[0] == 2_000_000_005  # nanoseconds: no object per timestamp, never mistaken for anything else


def test_small_frames_are_decoded_without_the_bounds():
    """Under ``BOUNDED_FRAME_SIZE`` a frame cannot hold enough to matter (6.4 ms at worst,
    measured), and a lone SEND does not pay the bounds' cost: decoded as before."""
    small = [Op.PING, 1, [msgpack.ExtType(5, b"")] * 100]
    assert len(_frame(small)) <= BOUNDED_FRAME_SIZE
    [(_, _, got)] = FrameDecoder(LIMIT, MAX_FRAME_ITEMS).feed(_frame(small))
    assert got[0] == msgpack.ExtType(5, b"")


def test_a_decoder_without_bounds_decodes_what_a_broker_may_send():
    big = [Op.DELIVER, 0, {"d": [[i, b""] for i in range(MAX_FRAME_ITEMS + 10)]}]
    [(op, _, got)] = FrameDecoder(LIMIT).feed(_frame(big))
    assert op == Op.DELIVER and len(got["d"]) == MAX_FRAME_ITEMS + 10
