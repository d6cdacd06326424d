"""Planning one relay batch, without I/O: which claimed rows go now, in which sends.

How this works
--------------
A relay claims rows in ``id`` order and sends them with ``Producer.send_batch``. Four
rules, all pure functions here, decide what it sends and what it records afterwards:

1. **Per key, in order.** ``hold_back(rows, unsent)`` keeps out of the batch every row
   whose ``order_key`` has an earlier row that is not sent yet and not in this batch —
   claimed by another relay (even one between two of our rows), FAILED, or committed after
   our claim. ``unsent`` lists, per key, the unsent ids up to our largest id, read from the
   table after the claim. Rows without a key are never held.
2. **One send per run of one topic.** ``send_batch`` takes one topic, so ``runs()`` cuts
   the rows into consecutive runs of the same topic, at most ``max_count`` rows and
   ``max_bytes`` of bodies each. Runs are sent in order; the first run that fails stops
   the batch, so no row overtakes an earlier row of its key.
3. **Poison rows fail alone.** ``decode_row`` refuses a row that cannot become a message
   (malformed JSON in its columns, a reserved or malformed topic). ``classify(exc)`` sorts a
   failed send: ``POISON`` (the broker refused the message itself: too large, bad name,
   bad request, no such topic) marks the row FAILED at once; ``TRANSIENT`` (the broker is
   unreachable or busy) keeps every row pending and the relay backs off; ``SUSPECT``
   (anything else) counts an attempt and marks FAILED after ``max_attempts``. A run that
   fails with a non-transient error is resent row by row, so only the guilty row fails.
4. **Blocked keys.** Once a row of a key stays unsent in a batch (failed or retried), every
   later row of that key in the same batch is held too (``BatchOutcome.blocks``).

Every message carries the property ``OUTBOX_ID`` (the row's id) and the row's keys, so a
consumer de-duplicates a row that was sent again after an unconfirmed send.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from protocol import (
    AuthError,
    HalfMQError,
    InvalidNameError,
    MessageTooLargeError,
    validate_send_topic,
)
from protocol.errors import BadRequestError, TopicNotFoundError

__all__ = [
    "OUTBOX_ID",
    "POISON",
    "TRANSIENT",
    "SUSPECT",
    "OutboxRow",
    "PoisonRowError",
    "Run",
    "BatchOutcome",
    "decode_row",
    "encode_keys",
    "encode_properties",
    "hold_back",
    "runs",
    "classify",
    "describe_error",
]

#: The message property carrying the outbox row's id (unique within one outbox table).
OUTBOX_ID = "OUTBOX_ID"

POISON = "poison"
TRANSIENT = "transient"
SUSPECT = "suspect"

_POISON_ERRORS = (InvalidNameError, MessageTooLargeError, BadRequestError, TopicNotFoundError)
#: Longest error text stored in ``last_error``.
MAX_ERROR_TEXT = 500


#: Topics already found valid (a relay sees the same few topics over and over).
_VALID_TOPICS: set[str] = set()


class PoisonRowError(ValueError):
    """A row that can never become a message (its columns are malformed)."""


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """One claimed row, decoded: what ``send_batch`` needs, plus its id and order key."""

    id: int
    topic: str
    order_key: str | None
    body: bytes
    tags: str | None
    keys: tuple[str, ...]
    properties: dict[str, str]
    attempts: int = 0

    def item(self, *, message_group: bool = False) -> dict[str, Any]:
        """The row as a ``send_batch`` item (properties include ``OUTBOX_ID``); with
        ``message_group``, its order key is the message's message group."""
        item = {"body": self.body, "tags": self.tags, "keys": list(self.keys),
                "properties": {**self.properties, OUTBOX_ID: str(self.id)}}
        if message_group and self.order_key is not None:
            item["message_group"] = self.order_key
        return item


def encode_keys(keys: str | Iterable[str] | None) -> str:
    """``keys`` as stored in ``msg_keys`` (a JSON list); ``TypeError`` for non-strings."""
    if keys is None:
        return "[]"
    listed = [keys] if isinstance(keys, str) else list(keys)
    if not all(isinstance(k, str) and k for k in listed):
        raise TypeError("message keys must be non-empty strings")
    return json.dumps(listed, ensure_ascii=False)


def encode_properties(properties: Mapping[str, str] | None) -> str:
    """``properties`` as stored (a JSON object); ``TypeError`` unless it maps str to str,
    ``ValueError`` if it sets ``OUTBOX_ID`` (the relay sets that one)."""
    if not properties:
        return "{}"
    props = dict(properties)
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in props.items()):
        raise TypeError("message properties must map str to str")
    if OUTBOX_ID in props:
        raise ValueError(f"the property {OUTBOX_ID} is set by the outbox relay")
    return json.dumps(props, ensure_ascii=False)


def decode_row(raw: Sequence[Any]) -> OutboxRow:
    """Decode ``(id, topic, order_key, body, tags, msg_keys, properties, attempts)`` as read
    from the table (``table.ROW_COLUMNS``).

    Raises ``PoisonRowError`` (with the reason) if the row cannot become a message.
    """
    row_id, topic, order_key, body, tags, msg_keys, properties, attempts = raw
    if topic not in _VALID_TOPICS:
        try:
            validate_send_topic(topic)
        except InvalidNameError as exc:
            raise PoisonRowError(str(exc)) from None
        if len(_VALID_TOPICS) < 10_000:
            _VALID_TOPICS.add(topic)
    try:
        keys = json.loads(msg_keys)
        props = {} if properties == "{}" else json.loads(properties)
    except (TypeError, ValueError) as exc:
        raise PoisonRowError(f"malformed msg_keys or properties column: {exc}") from None
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise PoisonRowError(f"msg_keys must be a JSON list of strings, not {msg_keys!r}"[:200])
    if not isinstance(props, dict) or not all(isinstance(v, str) for v in props.values()):
        raise PoisonRowError(f"properties must be a JSON object of strings, not {properties!r}"[:200])
    if tags is not None and not isinstance(tags, str):
        raise PoisonRowError("tags must be text")
    return OutboxRow(int(row_id), topic, order_key, bytes(body), tags, tuple(keys), props,
                     int(attempts))


def hold_back(rows: Sequence[OutboxRow], unsent: Mapping[str, Iterable[int]]
              ) -> tuple[list[OutboxRow], list[OutboxRow]]:
    """Split claimed ``rows`` (ascending ids) into ``(ready, held)``.

    ``unsent[key]``: ids of that key that are not sent (pending or FAILED) and smaller than
    the largest claimed id — ``rows``' own ids among them. A row is held when an unsent id
    of its key that is *not* in ``rows`` comes before it: that earlier row is elsewhere
    (claimed by another relay, FAILED, or committed after our claim), so this one waits.
    """
    mine = {row.id for row in rows}
    gap: dict[str, int] = {}
    for key, ids in unsent.items():
        others = [i for i in ids if i not in mine]
        if others:
            gap[key] = min(others)
    ready, held = [], []
    for row in rows:
        order_key = row.order_key
        if order_key is not None and order_key in gap and gap[order_key] < row.id:
            held.append(row)
        else:
            ready.append(row)
    return ready, held


@dataclass(slots=True)
class Run:
    """Consecutive rows of one topic, sent with one ``send_batch``."""

    topic: str
    rows: list[OutboxRow] = field(default_factory=list)
    size: int = 0


def runs(rows: Iterable[OutboxRow], *, max_count: int, max_bytes: int) -> list[Run]:
    """Cut ``rows`` into runs of one topic, each at most ``max_count`` rows and ``max_bytes``
    of bodies (a single larger row is a run of its own)."""
    out: list[Run] = []
    current: Run | None = None
    for row in rows:
        size = len(row.body)
        if (current is None or current.topic != row.topic or len(current.rows) >= max_count
                or (current.rows and current.size + size > max_bytes)):
            current = Run(row.topic)
            out.append(current)
        current.rows.append(row)
        current.size += size
    return out


def classify(exc: BaseException) -> str:
    """``POISON``, ``TRANSIENT`` or ``SUSPECT`` for an exception raised by a send (rule 3)."""
    if isinstance(exc, _POISON_ERRORS) or isinstance(exc, TypeError | ValueError):
        return POISON
    if isinstance(exc, HalfMQError) and (exc.retriable or isinstance(exc, AuthError)):
        return TRANSIENT  # nothing wrong with the rows: the broker, or our access to it
    if isinstance(exc, OSError | TimeoutError):
        return TRANSIENT
    return SUSPECT


def describe_error(exc: BaseException) -> str:
    """``"ClassName: message"``, cut to the length stored in ``last_error``."""
    return f"{type(exc).__name__}: {exc}"[:MAX_ERROR_TEXT]


@dataclass
class BatchOutcome:
    """What a batch did to each row, recorded in one transaction at its end.

    ``sent``: id → msg_id; ``failed``: id → error (becomes FAILED); ``retry``: id → error
    (stays pending, attempt counted); ``untouched``: ids claimed but not sent (held, or
    after a transient failure). ``blocks(row)`` says whether a row must wait because an
    earlier row of its key stayed unsent in this batch.
    """

    sent: dict[int, str] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)
    retry: dict[int, str] = field(default_factory=dict)
    untouched: list[int] = field(default_factory=list)
    blocked_keys: set[str] = field(default_factory=set)

    def blocks(self, row: OutboxRow) -> bool:
        return row.order_key is not None and row.order_key in self.blocked_keys

    def leave(self, row: OutboxRow) -> None:
        """``row`` is not sent in this batch: later rows of its key wait too."""
        self.untouched.append(row.id)
        if row.order_key is not None:
            self.blocked_keys.add(row.order_key)

    def fail(self, row: OutboxRow, error: str, *, final: bool) -> None:
        """``row`` failed: FAILED now if ``final``, else an attempt is counted."""
        (self.failed if final else self.retry)[row.id] = error
        if row.order_key is not None:
            self.blocked_keys.add(row.order_key)
