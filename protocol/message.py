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
        if len(w) == n:
            return cls(w[0], w[1], w[2], w[3], tuple(w[4] or ()), dict(w[5] or {}), w[6], w[7], w[8], w[9], w[10])
        extras = w[n]
        if not isinstance(extras, dict):
            raise ValueError("malformed message extras")
        return cls(w[0], w[1], w[2], w[3], tuple(w[4] or ()), dict(w[5] or {}), w[6], w[7], w[8], w[9], w[10],
                   extras.get("g"), extras.get("at"))

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
