"""Wire frames: a 4-byte big-endian length, then a msgpack array ``[op, rid, payload]``.

How this works
--------------
``encode_frame(op, rid, payload)`` returns the bytes of one frame. ``FrameDecoder`` is fed
bytes as they arrive (``feed``) and returns every whole frame they complete, as
``(op, rid, payload)`` tuples. It never buffers more than one frame: the length prefix is
checked against ``max_frame_size`` *before* any payload is kept, so a peer announcing a
huge frame is refused at once with ``FrameTooLargeError``. Anything that is not a
well-formed ``[int, int, any]`` array raises ``ProtocolError``; after an error the decoder
is unusable and the connection should be closed. The whole frames that the same ``feed``
call completed *before* the bad one are not lost: the error carries them (``exc.frames``),
so the caller handles them first -- what a peer sent before its mistake does not depend on
how TCP happened to cut the bytes.

The broker's decoder (``max_items`` given) also bounds the work one frame can cost, since
decoding runs on the event loop every client shares and the size limit alone does not
bound it (4 MiB of empty arrays are 4 million lists: seconds of decoding). In a frame over
``BOUNDED_FRAME_SIZE`` bytes no list or map may hold more than ``max_items`` entries
(msgpack refuses the header before building anything) and msgpack extension types, which
no request uses, are refused (each would cost a Python call); a frame over
``COUNTED_FRAME_SIZE`` bytes may also hold at most ``max_items`` lists and maps in all
(counted as they are built, a Python call each). What is left is bounded by the bytes
(measured): 31-81 ms for the worst 4 MiB of scalars, 6.4 ms for the worst frame small
enough to be decoded without the bounds (32 KiB of extension types; the bounds' keyword
arguments would cost a lone SEND about 1 % more).

``rid`` is the request id chosen by the side that sends a request; the peer answers with
``Op.REPLY`` or ``Op.ERROR`` and the same rid. Each side numbers its own requests, so the
broker can send requests (check-backs) on a client's connection. ``rid == 0`` means "no
reply wanted" (deliveries, fire-and-forget acks).

No I/O here: the broker and the SDKs own their sockets.
"""

from __future__ import annotations

import functools
import re
import struct
from collections.abc import Callable, Sequence
from typing import Any

import msgpack

from protocol.errors import BadRequestError, MessageTooLargeError

__all__ = [
    "PROTOCOL_VERSION",
    "HEADER",
    "DEFAULT_MAX_FRAME_SIZE",
    "FRAME_OVERHEAD",
    "BOUNDED_FRAME_SIZE",
    "COUNTED_FRAME_SIZE",
    "MAX_CLIENT_ID",
    "MAX_FRAME_ITEMS",
    "MAX_SEND_MESSAGES",
    "ProtocolError",
    "FrameTooLargeError",
    "encode_frame",
    "FrameDecoder",
    "undecodable_reason",
]

PROTOCOL_VERSION = 1
HEADER = struct.Struct(">I")
#: Room for the envelope and message metadata around the largest allowed body.
FRAME_OVERHEAD = 64 * 1024
#: Most messages one SEND may hold (the broker refuses more with ``LimitExceededError``;
#: ``Producer.send_batch`` refuses a longer batch itself): a frame under the size limit could
#: otherwise hold ~600,000 empty messages, seconds of the broker's event loop in one go.
MAX_SEND_MESSAGES = 10_000
#: The broker's ``max_items``: the longest list or map a client's frame may hold, and the
#: most lists and maps a frame over ``COUNTED_FRAME_SIZE`` may hold in all. A SEND of the
#: most messages with every field a list or map holds 40,003.
MAX_FRAME_ITEMS = 65_536
#: Frames longer than this (bytes) are decoded with the bounds on lists, maps and extension
#: types; a shorter one cannot hold enough to matter.
BOUNDED_FRAME_SIZE = 32 * 1024
#: Frames longer than this (bytes) are decoded counting their lists and maps.
COUNTED_FRAME_SIZE = 256 * 1024
#: Longest client id of a HELLO, in characters (the broker refuses longer; the SDK too).
MAX_CLIENT_ID = 256
DEFAULT_MAX_FRAME_SIZE = 4 * 1024 * 1024 + FRAME_OVERHEAD

_pack_len = HEADER.pack
_unpack_len = HEADER.unpack_from
_packb = msgpack.Packer(use_bin_type=True).pack


class ProtocolError(BadRequestError):
    """Bytes that are not a well-formed frame.

    ``frames``: the whole frames decoded before the bad one in the same ``feed`` call.
    """

    frames: Sequence[tuple[int, int, Any]] = ()


class FrameTooLargeError(MessageTooLargeError):
    """A frame whose announced length exceeds the limit.

    ``frames``: the whole frames decoded before the bad one in the same ``feed`` call.
    """

    frames: Sequence[tuple[int, int, Any]] = ()


def undecodable_reason(exc: Exception) -> str:
    """What was wrong with a frame's bytes, from the exception ``msgpack.unpackb`` raised:
    a phrase for the client's error message (msgpack's own text is often empty). Quotes
    none of the client's bytes."""
    if isinstance(exc, msgpack.StackError):
        return "arrays or maps nested too deep (msgpack decodes at most 1024 levels)"
    if isinstance(exc, msgpack.FormatError):
        return "not valid msgpack (a byte that starts no msgpack type, such as 0xc1)"
    if isinstance(exc, msgpack.ExtraData):
        return "bytes left after the msgpack value (the length prefix counts more bytes than the value has)"
    if isinstance(exc, UnicodeDecodeError):
        return f"a string is not valid UTF-8 ({exc.reason} at byte {exc.start} of the string)"
    if isinstance(exc, _TooManyContainers):
        return f"more than {exc.args[0]} lists and maps in one frame"
    if isinstance(exc, _ExtensionType):
        return "a msgpack extension type (no request holds one)"
    if isinstance(exc, TypeError) and "unhashable" in str(exc):
        return "a map key is an array or a map (keys must be strings, numbers, booleans or nil)"
    text = str(exc)
    found = _LENGTH_OVER.search(text)
    if found is not None:
        kind = "list" if found["kind"] == "array" else "map"
        return f"a {kind} of {found['n']} entries (at most {found['max']} in one frame)"
    if "incomplete input" in text:
        return "the msgpack value is cut short (it needs more bytes than the length prefix counts)"
    return f"not valid msgpack ({text or type(exc).__name__})"


class _TooManyContainers(ValueError):
    """More lists and maps in one frame than its decoder's ``max_items``."""


class _ExtensionType(ValueError):
    """A msgpack extension type in a frame the broker decodes."""


#: msgpack's own words for a list or map longer than ``max_array_len``/``max_map_len``.
_LENGTH_OVER = re.compile(r"(?P<n>\d+) exceeds max_(?P<kind>array|map)_len\((?P<max>\d+)\)")


def _no_extension(code: int, data: bytes) -> Any:
    raise _ExtensionType()


def _bounded_unpackb(max_items: int) -> Callable[..., Any]:
    """``unpackb`` with the broker's bounds (see the module's docstring): lists and maps of
    at most ``max_items`` entries, no extension types. Timestamps (msgpack's one built-in
    extension, decoded without ``ext_hook``) come out as integers of nanoseconds, the
    cheapest form, which no check takes for anything but a number."""
    return functools.partial(msgpack.unpackb, raw=False, strict_map_key=False, max_array_len=max_items,
                             max_map_len=max_items, ext_hook=_no_extension, timestamp=2)


def _counted_unpackb(data: Any, bounded: Callable[..., Any], max_items: int) -> Any:
    """``bounded`` (a ``_bounded_unpackb``) that also refuses a frame of more than
    ``max_items`` lists and maps in all, counted as msgpack builds them (one Python call
    each)."""
    left = max_items

    def count(obj: Any) -> Any:
        nonlocal left
        left -= 1
        if left < 0:
            raise _TooManyContainers(max_items)
        return obj

    return bounded(data, list_hook=count, object_hook=count)


def encode_frame(op: int, rid: int, payload: Any) -> bytes:
    """Return one frame: length prefix + msgpack ``[op, rid, payload]``."""
    body = _packb([op, rid, payload])
    return _pack_len(len(body)) + body


class FrameDecoder:
    """Incremental decoder: ``feed(data)`` returns the whole frames completed so far."""

    __slots__ = ("max_frame_size", "max_items", "_bounded", "_buf", "_need")

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE, max_items: int | None = None) -> None:
        """``max_items``: the bounds on a frame's lists and maps (the module's docstring);
        None (an SDK decoding its broker's frames) for none."""
        self.max_frame_size = max_frame_size
        self.max_items = max_items
        self._bounded: Callable[..., Any] | None = None if max_items is None else _bounded_unpackb(max_items)
        self._buf = bytearray()
        self._need = -1  # payload length of the frame being read, -1 while reading the header

    def feed(self, data: bytes | bytearray | memoryview) -> list[tuple[int, int, Any]]:
        """Add ``data``; return the frames it completes, as ``(op, rid, payload)``. Keeps no
        reference to ``data`` (a view into a buffer that is reused after the call is fine).

        Raises ``ProtocolError`` (malformed) or ``FrameTooLargeError`` (announced length over
        ``max_frame_size``); the error's ``frames`` holds the frames completed before it.
        """
        if self._buf:
            self._buf += data
            src: bytes | bytearray | memoryview = self._buf
        else:
            src = data  # the common case: decode straight from the received bytes, no copy
        frames: list[tuple[int, int, Any]] = []
        pos = 0
        end = len(src)
        max_size = self.max_frame_size
        need = self._need
        unpackb = msgpack.unpackb
        bounded = self._bounded
        max_items = self.max_items or 0
        # frames longer than these get the bounds, and the count (none without max_items)
        bounded_above = BOUNDED_FRAME_SIZE if max_items else max_size
        counted_above = COUNTED_FRAME_SIZE if max_items else max_size
        with memoryview(src) as view:
            try:
                while True:
                    if need < 0:
                        if end - pos < 4:
                            break
                        (need,) = _unpack_len(view, pos)
                        if need > max_size:
                            raise FrameTooLargeError(
                                f"frame of {need} bytes exceeds the limit of {max_size} bytes"
                            )
                        if need == 0:
                            raise ProtocolError("empty frame")
                        pos += 4
                    if end - pos < need:
                        break
                    try:
                        if need <= bounded_above:
                            obj = unpackb(view[pos : pos + need], raw=False, strict_map_key=False)
                        elif need <= counted_above:
                            obj = bounded(view[pos : pos + need])  # type: ignore[misc]
                        else:
                            obj = _counted_unpackb(view[pos : pos + need], bounded, max_items)  # type: ignore[arg-type]
                    except Exception as exc:  # msgpack raises several types for garbage
                        raise ProtocolError(f"undecodable frame: {undecodable_reason(exc)}") from None
                    pos += need
                    need = -1
                    if (
                        type(obj) is not list
                        or len(obj) != 3
                        or type(obj[0]) is not int
                        or type(obj[1]) is not int
                    ):
                        raise ProtocolError("a frame must be a msgpack array [op, rid, payload]")
                    frames.append((obj[0], obj[1], obj[2]))
            except (ProtocolError, FrameTooLargeError) as exc:
                exc.frames = frames  # handled by the caller before it closes the connection
                self._buf = bytearray()
                raise
            rest = view[pos:end].tobytes() if 0 < pos < end else b""
        self._need = need
        # at most one partial frame is kept, and never more than its announced size
        if pos == 0:
            if src is not self._buf:
                self._buf = bytearray(src)  # nothing complete yet: keep it all (no re-copy later)
        else:
            self._buf = bytearray(rest)
        return frames
