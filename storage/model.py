"""Value types exchanged with the store (all immutable)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

__all__ = ["BundleTarget", "IndexTarget", "NewBundle", "NewRecord", "RefsTarget", "Stored", "Record", "IndexEntry"]


class IndexTarget(NamedTuple):
    """Also add a queue-index entry for this record.

    ``ref_pos``: if set, the entry points at that earlier record (its position and size)
    instead of at the new record — used to commit a half message without copying its body.
    ``ref_size``: that record's size, if the caller has it (the ``Stored.size`` of its
    append); otherwise the store reads the record back to learn it.
    A named tuple: cheap to build, and hashable by value (the store caches what it needs
    of each target it has seen).
    """

    topic: str
    queue_id: int
    tag_hash: int = 0
    ref_pos: int | None = None
    ref_size: int | None = None


class RefsTarget(NamedTuple):
    """One queue-index entry per reference, at consecutive offsets of one queue, each
    pointing at an earlier record (or bundle member): ``refs`` holds ``(ref_pos, ref_size,
    tag_hash)`` each, ``ref_size`` as that record's index entry has it (with ``MEMBER_BIT``
    for a member). The record's body is the table of references, which the store writes
    (a :class:`NewRecord` with this target has an empty body): many commits of half
    messages in one record, one encoding, one CRC.
    """

    topic: str
    queue_id: int
    refs: list[tuple[int, int, int]]


class NewRecord(NamedTuple):
    """A record to append: opaque ``rtype`` (0-255), msgpack-able ``header`` (a map or an
    array), raw ``body``.

    A named tuple rather than a frozen dataclass: one is built per message on the hot
    path, and a tuple is built in a third of the time.
    """

    rtype: int
    header: dict | list
    body: bytes = b""
    index: IndexTarget | RefsTarget | None = None  # type: ignore[assignment]  # (shadows tuple.index)


class BundleTarget(NamedTuple):
    """The queue every member of a :class:`NewBundle` goes to, and each member's tag hash."""

    topic: str
    queue_id: int
    tag_hashes: list[int]


class NewBundle(NamedTuple):
    """Many messages of one queue stored as one record (one encoding, one CRC, one write).

    ``headers[k]``/``bodies[k]`` are member ``k``'s (a header as in :class:`NewRecord`).
    Each member gets its own position, queue offset (consecutive) and index entry, and
    reads back as a :class:`Record` of type ``rtype`` like any record.
    """

    rtype: int
    headers: list
    bodies: list[bytes]
    index: BundleTarget  # type: ignore[assignment]  # (shadows tuple.index)


class Stored(NamedTuple):
    """Where an appended record went. ``queue_offset`` is -1 without an index target.

    A :class:`NewBundle` gives one ``Stored`` per member (its position, size and offset);
    a record with a :class:`RefsTarget` one ``Stored`` whose offset is its first entry's.

    A named tuple: the store builds one per appended record, and a tuple is the cheapest
    immutable value to build.
    """

    pos: int
    size: int
    store_time: int
    queue_offset: int


@dataclass(frozen=True, slots=True)
class Record:
    """A record read back from the log; ``next_pos`` is where the following record starts."""

    pos: int
    size: int
    rtype: int
    store_time: int
    header: Any  # decoded msgpack: a map for a single record, an array for a bundle's
    body: bytes
    next_pos: int


@dataclass(frozen=True, slots=True)
class IndexEntry:
    """A queue-index entry: the record it points at, its tag hash and store time (ms).

    A bundle member's entry has the member's position and size (see ``storage.framing``).

    For a ``ref_pos`` entry, ``pos``/``size`` are the referenced record's and
    ``store_time`` is the time the referencing record was stored.
    """

    pos: int
    size: int
    tag_hash: int
    store_time: int
