"""The ``Message`` a consumer receives, and ``SendResult`` a producer gets back.

On the wire a message is a flat msgpack array (``Message.to_wire`` / ``Message.from_wire``)
in the field order below; bodies stay ``bytes`` and are never decoded by the broker. A
message of a FIFO message group, or one that was scheduled, carries a twelfth element: a
map with ``"g"`` (its message group) and/or ``"at"`` (the time it was due, epoch ms).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Message", "SendResult", "WIRE_FIELDS"]

WIRE_FIELDS = (
    "msg_id",
    "topic",
    "body",
    "tags",
    "keys",
    "properties",
    "born_timestamp",
    "store_timestamp",
    "queue_id",
    "queue_offset",
    "reconsume_times",
)

#: The optional twelfth wire element's keys, and the fields they fill.
_EXTRAS = (("g", "message_group"), ("at", "deliver_at"))


@dataclass(frozen=True, slots=True)
class Message:
    """A stored message as delivered to a consumer (SPEC §3)."""

    msg_id: str
    topic: str
    body: bytes
    tags: str | None = None
    keys: tuple[str, ...] = ()
    properties: dict[str, str] = field(default_factory=dict)
    born_timestamp: int = 0
    store_timestamp: int = 0
    queue_id: int = 0
    queue_offset: int = 0
    reconsume_times: int = 0
    #: FIFO: the message group it was sent with (delivered in order within it)
    message_group: str | None = None
    #: a scheduled message: when it was due (epoch milliseconds)
    deliver_at: int | None = None

    def to_wire(self) -> list[Any]:
        """Return the flat list that ``from_wire`` accepts."""
        extras = {k: getattr(self, name) for k, name in _EXTRAS if getattr(self, name) is not None}
        return [
            self.msg_id,
            self.topic,
            self.body,
            self.tags,
            list(self.keys),
            self.properties,
            self.born_timestamp,
            self.store_timestamp,
            self.queue_id,
            self.queue_offset,
            self.reconsume_times,
            *([extras] if extras else []),
        ]

    @classmethod
    def from_wire(cls, w: list[Any]) -> Message:
        """Build a ``Message`` from its wire list; raises ``ValueError`` on a malformed one."""
        n = len(WIRE_FIELDS)
        if not isinstance(w, (list, tuple)) or not n <= len(w) <= n + 1:
            raise ValueError("malformed message")
        group = at = None
        if len(w) > n:
            extras = w[n]
            if not isinstance(extras, dict):
                raise ValueError("malformed message extras")
            group, at = extras.get("g"), extras.get("at")
        keys, props = w[4], w[5]
        keys = tuple(keys) if keys else ()
        props = props if type(props) is dict else dict(props or {})  # (a decoded map is fresh)
        if cls is not Message:
            return cls(w[0], w[1], w[2], w[3], keys, props, w[6], w[7], w[8], w[9], w[10], group, at)
        return _new_message(w, keys, props, group, at)

    @property
    def text(self) -> str:
        """The body decoded as UTF-8 (replacement characters for invalid bytes)."""
        return self.body.decode("utf-8", "replace")


@dataclass(frozen=True, slots=True)
class SendResult:
    """Where a sent message was stored. ``state`` is set by ``send_in_transaction`` only."""

    msg_id: str
    queue_id: int
    queue_offset: int
    topic: str = ""
    state: Any = None


# -- fast construction ------------------------------------------------------------------
# A frozen dataclass's __init__ sets each field through object.__setattr__ (13 calls for a
# Message): 2.5-3.6 us per delivered message, the largest single cost of a consumer's
# message. The SDKs build these objects straight through the slots' descriptors instead
# (the same object, about half the time); the public constructors are unchanged.

_object_new = object.__new__
_MESSAGE_SETTERS = tuple(getattr(Message, f).__set__ for f in (*WIRE_FIELDS, "message_group", "deliver_at"))


class UnfrozenSendResult:
    """A ``SendResult``'s layout without the frozen dataclass around it: the producer fills
    the five slots with plain stores and then assigns ``__class__ = SendResult`` (the same
    slots in the same order, so Python allows it), which gives the very object the public
    constructor would, in half the time of five descriptor ``__set__`` calls."""

    __slots__ = SendResult.__slots__  # type: ignore[attr-defined]

    msg_id: str
    queue_id: int
    queue_offset: int
    topic: str
    state: Any

class UnfrozenMessage:
    """A ``Message``'s layout without the frozen dataclass around it, for the same trick as
    ``UnfrozenSendResult``: fill all thirteen slots with plain stores, then assign
    ``__class__ = Message`` (about a tenth of the public constructor's time)."""

    __slots__ = Message.__slots__  # type: ignore[attr-defined]

    msg_id: str
    topic: str
    body: bytes
    tags: str | None
    keys: tuple[str, ...]
    properties: dict[str, str]
    born_timestamp: int
    store_timestamp: int
    queue_id: int
    queue_offset: int
    reconsume_times: int
    message_group: str | None
    deliver_at: int | None


def _new_message(w: list[Any], keys: tuple[str, ...], props: dict[str, str], group: str | None,
                 at: int | None, *, _new: Any = _object_new, _cls: type = Message,
                 _s: tuple[Any, ...] = _MESSAGE_SETTERS) -> Message:
    m = _new(_cls)
    _s[0](m, w[0])
    _s[1](m, w[1])
    _s[2](m, w[2])
    _s[3](m, w[3])
    _s[4](m, keys)
    _s[5](m, props)
    _s[6](m, w[6])
    _s[7](m, w[7])
    _s[8](m, w[8])
    _s[9](m, w[9])
    _s[10](m, w[10])
    _s[11](m, group)
    _s[12](m, at)
    return m  # type: ignore[no-any-return]

