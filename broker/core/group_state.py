"""The data of one consumer group's delivery state, shared by the parts of ``GroupDelivery``.

How this works
--------------
:class:`broker.core.delivery.GroupDelivery` is one class assembled from two parts:
delivering (``broker.core.delivery``: members, cursors, ``poll``) and the outcomes of
deliveries (``broker.core.outcomes``: acks, nacks, expiries, retry and dead-letter
records). What both work on is here: the storage interface the core reads through
(``QueueReader``), a group's progress on one queue (``QueueCursor``), a member
(``Member``), a record the shell must append (``PendingRecord``), and ``GroupState``,
which declares the group's attributes once, with one type each, for every part to be
checked against. Declarations only: ``GroupDelivery.__init__`` sets the values.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from broker.core.leases import Delivery, LeaseTable
from storage import IndexEntry, NewRecord, Record

if TYPE_CHECKING:
    from broker.core.fifo import FifoOrder

__all__ = [
    "DEFAULT_MAX_RECONSUME",
    "EXPIRED_LEVEL",
    "GroupState",
    "Member",
    "MessageBuilder",
    "PendingRecord",
    "QueueCursor",
    "QueueReader",
]

#: The retry queue of expired leases (and nacks): redelivered as soon as they are stored.
EXPIRED_LEVEL = 255
#: Redeliveries allowed when neither the group nor a subscription says.
DEFAULT_MAX_RECONSUME = 16


class QueueReader(Protocol):
    """What the core needs from storage."""

    def read_queue(self, topic: str, queue_id: int, offset: int, max_count: int) -> list[tuple[int, IndexEntry]]: ...

    def queue_end(self, topic: str, queue_id: int) -> int: ...

    def queue_start(self, topic: str, queue_id: int) -> int: ...

    def read(self, pos: int) -> Record: ...

    def read_queue_records(self, topic: str, queue_id: int, offset: int, max_count: int) -> list[tuple[int, Record]]: ...


@dataclass(slots=True)
class QueueCursor:
    """Progress of a group on one queue."""

    next_offset: int
    inflight: set[int] = field(default_factory=set)
    skip: set[int] = field(default_factory=set)  # done before a restart, or retried (see recovery)

    @property
    def committed(self) -> int:
        """Everything below this offset is done for the group."""
        return min(self.inflight) if self.inflight else self.next_offset


@dataclass(slots=True)
class Member:
    """A subscribed consumer connection, or one pull request (``receiver``)."""

    member_id: str
    topic: str
    tags: frozenset[str] | None
    prefetch: int
    max_reconsume_times: int
    leases: dict[int, Delivery] = field(default_factory=dict)
    active: bool = True
    #: bytes of records that may still be leased to it in the current poll (set by the
    #: shell from the connection's unsent output: 0 while the client does not read)
    budget: int = 1 << 62
    receiver: bool = False
    invisible: float = 0.0  # a receiver's lease duration


@dataclass(slots=True)
class PendingRecord:
    """A record the shell must append; when durable, call ``durable(pending)``."""

    record: NewRecord
    qkey: tuple[str, int]
    offset: int
    dead_letter: bool
    mgroup: str | None = None


# A function that turns (record read, delivery metadata) into a wire message list.
MessageBuilder = Callable[[Record, str, int, int, int, str | None], list[Any]]


class GroupState:
    """Types of a group's delivery attributes (see the module docstring)."""

    group: str
    reader: QueueReader
    retry_delays: tuple[float, ...]
    retry_topic: str
    max_reconsume_times: int | None
    fifo: FifoOrder | None
    cursors: dict[tuple[str, int], QueueCursor]
    members: dict[str, Member]
    leases: LeaseTable
    stats: dict[str, int]
    #: offsets done since the last ``take_acked`` (the shell logs them durably)
    acked: list[list[Any]]
