"""What a stream record's payload holds (pure, no I/O).

How this works
--------------
Every record is one msgpack array whose first element says its kind; the body stays
``bytes`` (msgpack ``bin``) and is never decoded. Headers carry only what the engine
itself reads (``Nats-Msg-Id``, expected sequences): user keys and properties may hold any
unicode, which NATS headers cannot.

- ``MESSAGE`` ``[1, body, tags, keys, properties, born_ms(, ext)]`` on ``m`` / ``r`` /
  ``p`` (a scheduled message, parked until due);
- ``HALF`` ``[2, body, tags, keys, properties, born_ms, group, instance(, ext)]`` on ``h``;
- ``POINTER`` ``[3, half_seq(, due_ms)]`` on ``m`` (a committed transaction or a due
  scheduled message) and ``s`` (a schedule not yet due);
- ``DEAD`` ``[4, body, tags, keys, properties, born_ms, msg_id, topic]`` on ``dlq`` / ``r``.

``ext`` (optional, a map; absent when empty): ``"g"`` the message group, ``"at"`` the due
time of a scheduled message (epoch ms), ``"d"`` the delay (ms) of a half message counted
from its commit. A pointer with ``due_ms`` was made visible by the engine's scheduler
(``scheduling``): it points at a parked message (``p``) or at a delayed half (``h``).

Why msgpack and not headers or JSON: it is the native protocol's encoding already, one C
call each way, and bodies stay binary. A ``DEAD`` record keeps the original ``msg_id``
because SPEC C4 promises the dead letter the same id.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import msgpack  # type: ignore[import-untyped]

__all__ = ["Kind", "Record", "decode_record", "encode_dead", "encode_half", "encode_message",
           "encode_pointer"]


class Kind(IntEnum):
    """The kind of a stored record (first element of its array)."""

    MESSAGE = 1
    HALF = 2
    POINTER = 3
    DEAD = 4


@dataclass(frozen=True, slots=True)
class Record:
    """A decoded record; fields a kind does not carry keep their defaults."""

    kind: Kind
    body: bytes = b""
    tags: str | None = None
    keys: list[str] = field(default_factory=list)
    properties: dict[str, str] = field(default_factory=dict)
    born_ms: int = 0
    producer_group: str | None = None
    producer_instance: str | None = None
    half_seq: int = 0
    msg_id: str | None = None
    topic: str | None = None
    ext: dict[str, Any] = field(default_factory=dict)  # "g", "at", "d" (see the module docstring)
    due_ms: int | None = None  # a pointer made visible by the scheduler: when it was due

    @property
    def message_group(self) -> str | None:
        """The message group it was sent with, or None."""
        return self.ext.get("g")


_packb = msgpack.packb


def encode_message(body: bytes, tags: str | None, keys: list[str], properties: dict[str, str],
                   born_ms: int, ext: dict[str, Any] | None = None) -> bytes:
    """Payload of a message (``ext``: its message group / due time, if any)."""
    if ext:
        return _packb([1, body, tags, keys, properties, born_ms, ext])
    return _packb([1, body, tags, keys, properties, born_ms])


def encode_half(body: bytes, tags: str | None, keys: list[str], properties: dict[str, str],
                born_ms: int, *, group: str | None, instance: str | None,
                ext: dict[str, Any] | None = None) -> bytes:
    """Payload of a half message: the message plus who sent it (for check-backs)."""
    if ext:
        return _packb([2, body, tags, keys, properties, born_ms, group, instance, ext])
    return _packb([2, body, tags, keys, properties, born_ms, group, instance])


def encode_pointer(half_seq: int, due_ms: int | None = None) -> bytes:
    """Payload of a pointer: the stream sequence of the committed half (or parked message),
    and when it was due if the scheduler makes it visible."""
    if due_ms is not None:
        return _packb([3, half_seq, due_ms])
    return _packb([3, half_seq])


def encode_dead(body: bytes, tags: str | None, keys: list[str], properties: dict[str, str],
                born_ms: int, *, msg_id: str, topic: str) -> bytes:
    """Payload of a dead letter (or of its resend): the message, its id and origin topic."""
    return _packb([4, body, tags, keys, properties, born_ms, msg_id, topic])


def decode_record(payload: bytes) -> Record:
    """Decode a payload; raises ``ValueError`` for anything these encoders did not write."""
    try:
        a: Any = msgpack.unpackb(payload)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ValueError(f"undecodable record: {exc}") from None
    if not isinstance(a, list) or not a:
        raise ValueError("record is not a non-empty array")
    kind = a[0]
    try:
        if kind == 1 and len(a) == 6:
            return Record(Kind.MESSAGE, a[1], a[2], a[3], a[4], a[5])
        if kind == 1 and len(a) == 7 and isinstance(a[6], dict):
            return Record(Kind.MESSAGE, a[1], a[2], a[3], a[4], a[5], ext=a[6])
        if kind == 2 and len(a) == 8:
            return Record(Kind.HALF, a[1], a[2], a[3], a[4], a[5], a[6], a[7])
        if kind == 2 and len(a) == 9 and isinstance(a[8], dict):
            return Record(Kind.HALF, a[1], a[2], a[3], a[4], a[5], a[6], a[7], ext=a[8])
        if kind == 3 and len(a) == 2 and isinstance(a[1], int):
            return Record(Kind.POINTER, half_seq=a[1])
        if kind == 3 and len(a) == 3 and isinstance(a[1], int) and isinstance(a[2], int):
            return Record(Kind.POINTER, half_seq=a[1], due_ms=a[2])
        if kind == 4 and len(a) == 8:
            return Record(Kind.DEAD, a[1], a[2], a[3], a[4], a[5], msg_id=a[6], topic=a[7])
    except (TypeError, ValueError):
        pass
    raise ValueError(f"unknown record shape (kind {kind!r}, {len(a)} fields)")
