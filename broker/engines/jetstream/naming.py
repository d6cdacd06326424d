"""Names in the engine: streams, subjects, tag tokens and message ids (pure, no I/O).

How this works
--------------
Every topic ``T`` is one JetStream stream ``HMQ_T_<T>`` (topic names are already valid
stream names and subject tokens). Its subjects::

    hmq.<T>.m.<queue>.<tagtoken>     visible messages: normal sends and commit pointers
    hmq.<T>.h.<queue>                half messages (invisible: no group consumes them)
    hmq.<T>.r.<group>.<queue>        DLQ messages sent back to one group only
    hmq.<T>.p.<queue>                scheduled messages, parked until due (invisible)
    hmq.<T>.s.<seq>                  the engine schedule of parked message / half <seq>
    hmq.<T>.x.<seq>                  parked message <seq> was recalled (an empty marker)

Shared streams: ``HMQ_TX`` (``hmqs.tx.d.<msg_id>`` the one decision of a transaction,
``hmqs.tx.c.<msg_id>`` its check count), ``HMQ_DLQ`` (``hmqs.dlq.<group>``), and
``HMQ_IDS`` (``hmqs.ids.<prefix>``: which stream a message-id prefix names),
``HMQ_SETTINGS`` (``hmqs.set.<key>``) and ``HMQ_GROUPS`` (``hmqs.grp.<group>``: every
consumer group that ever had a consumer, counted for ``--max-groups``); check-backs travel
on core subjects ``hmqs.cb.*``.
Everything that is not a topic's starts with ``hmqs.``, never ``hmq.``: a topic may be
called ``tx``, ``dlq`` or ``cb``, and its stream's ``hmq.<T>.>`` must not overlap them.

A tag becomes one subject token by a reversible escaping: ``A-Z a-z 0-9 -`` stay, every
other byte of its UTF-8 form (``_`` included) becomes ``_`` + two upper-case hex digits;
no tag is ``_`` and the empty tag is ``__`` (neither can come out of the escaping, so the
mapping is one-to-one). Why not base64 or a hash: the escaped form stays readable in
``nats stream view`` and a filter subject is built without a lookup.

A message id keeps the native reply shape (SPEC §3, docs/protocol.md): an 8-hex-digit
prefix naming the stream, then the stream sequence of the record that holds the body (for
a transaction: the half message) as 16 hex digits. The prefix is 32 bits of BLAKE2b over
the stream's name and creation time (so a topic deleted and created again gets new ids),
salted with a counter when two streams collide; ``HMQ_IDS`` records the mapping (see
``streams.StreamIds``). An id is thus known from the PubAck alone, unique across the
cluster, and "message by id" is one direct get.
"""

from __future__ import annotations

import hashlib
import re

__all__ = [
    "DLQ_STREAM",
    "GROUPS_STREAM",
    "GROUPS_SUBJECTS",
    "IDS_STREAM",
    "SETTINGS_CHANGED",
    "SETTINGS_SUBJECTS",
    "SETTINGS_STREAM",
    "TOPIC_SUBJECTS",
    "TX_STREAM",
    "TXCHECK_CONSUMER",
    "decode_msg_id",
    "decode_tag",
    "dlq_subject",
    "fifo_consumer_name",
    "group_subject",
    "encode_msg_id",
    "encode_tag",
    "group_consumer_name",
    "half_subject",
    "id_subject",
    "message_subject",
    "parked_subject",
    "parse_topic_subject",
    "resend_subject",
    "recall_subject",
    "schedule_subject",
    "settings_subject",
    "stream_id_prefix",
    "tag_filter_subjects",
    "topic_of_stream",
    "topic_stream",
    "token",
    "transactional_subject",
    "tx_check_subject",
    "tx_decision_subject",
    "untoken",
]

TX_STREAM = "HMQ_TX"
DLQ_STREAM = "HMQ_DLQ"
IDS_STREAM = "HMQ_IDS"
SETTINGS_STREAM = "HMQ_SETTINGS"
GROUPS_STREAM = "HMQ_GROUPS"
#: the subjects of GROUPS_STREAM, one per consumer group
GROUPS_SUBJECTS = "hmqs.grp.*"
#: the subjects of SETTINGS_STREAM, one per key
SETTINGS_SUBJECTS = "hmqs.set.*"
#: core subject (in no stream) on which a deleted setting's key token is announced
SETTINGS_CHANGED = "hmqs.setdel"
TXCHECK_CONSUMER = "TXCHECK"
#: a filter that every topic stream's subjects match, and no shared stream's
TOPIC_SUBJECTS = "hmq.>"
_TOPIC_STREAM_PREFIX = "HMQ_T_"

_PLAIN = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-")
_ESCAPED_RE = re.compile(r"(?:[A-Za-z0-9-]|_[0-9A-F]{2})+")
_NO_TAG = "_"
_EMPTY_TAG = "__"
_MSG_ID_RE = re.compile(r"[0-9A-F]{24}")


def token(text: str) -> str:
    """Escape any string into one non-empty subject token (reversible by ``untoken``)."""
    if text == "":
        return _EMPTY_TAG
    raw = text.encode("utf-8")
    if all(b in _PLAIN for b in raw):
        return text
    return "".join(chr(b) if b in _PLAIN else f"_{b:02X}" for b in raw)


def untoken(tok: str) -> str:
    """Undo ``token``; raises ``ValueError`` for a token ``token`` cannot produce."""
    if tok == _EMPTY_TAG:
        return ""
    if not _ESCAPED_RE.fullmatch(tok):
        raise ValueError(f"not an escaped token: {tok!r}")
    if "_" not in tok:
        return tok
    out = bytearray()
    i = 0
    while i < len(tok):
        if tok[i] == "_":
            out.append(int(tok[i + 1:i + 3], 16))
            i += 3
        else:
            out.append(ord(tok[i]))
            i += 1
    return out.decode("utf-8")


def encode_tag(tag: str | None) -> str:
    """The subject token of a message's tag (``None``: no tag)."""
    return _NO_TAG if tag is None else token(tag)


def decode_tag(tok: str) -> str | None:
    """Undo ``encode_tag``; raises ``ValueError`` on a token it cannot produce."""
    return None if tok == _NO_TAG else untoken(tok)


def topic_stream(topic: str) -> str:
    """The stream holding topic ``topic``."""
    return _TOPIC_STREAM_PREFIX + topic


def topic_of_stream(stream: str) -> str | None:
    """The topic a stream holds, or None for a stream that is not a topic's."""
    return stream[len(_TOPIC_STREAM_PREFIX):] if stream.startswith(_TOPIC_STREAM_PREFIX) else None


def message_subject(topic: str, queue: int, tag: str | None) -> str:
    """Subject of a visible message (a normal send or a commit pointer)."""
    return f"hmq.{topic}.m.{queue}.{encode_tag(tag)}"


def half_subject(topic: str, queue: int) -> str:
    """Subject of a half message."""
    return f"hmq.{topic}.h.{queue}"


def parked_subject(topic: str, queue: int) -> str:
    """Subject of a scheduled message until it is due (no group consumes it)."""
    return f"hmq.{topic}.p.{queue}"


def schedule_subject(topic: str, seq: int) -> str:
    """Subject holding the engine schedule that makes record ``seq`` visible when due."""
    return f"hmq.{topic}.s.{seq}"


def recall_subject(topic: str, seq: int) -> str:
    """Subject of the marker saying that parked message ``seq`` was recalled."""
    return f"hmq.{topic}.x.{seq}"


def resend_subject(topic: str, group: str, queue: int) -> str:
    """Subject of a dead letter sent back to ``group`` only."""
    return f"hmq.{topic}.r.{group}.{queue}"


def parse_topic_subject(subject: str) -> tuple[str, str, int, str | None]:
    """Split a topic stream's subject into ``(kind, group_or_empty, queue, tag)``.

    ``kind`` is ``"m"``, ``"h"``, ``"p"`` or ``"r"``; the tag is only known for ``"m"`` subjects.
    Raises ``ValueError`` for any other subject.
    """
    parts = subject.split(".")
    if len(parts) >= 4 and parts[0] == "hmq":
        kind = parts[2]
        if kind == "m" and len(parts) == 5:
            return "m", "", int(parts[3]), decode_tag(parts[4])
        if kind in ("h", "p") and len(parts) == 4:
            return kind, "", int(parts[3]), None
        if kind == "r" and len(parts) == 5:
            return "r", parts[3], int(parts[4]), None
    raise ValueError(f"not a topic subject: {subject!r}")


def tag_filter_subjects(topic: str, tags: str) -> list[str]:
    """Filter subjects of a subscription expression: ``"*"`` or ``"A || B"`` (SPEC C6).

    Raises ``ValueError`` for an empty expression.
    """
    expr = tags.strip()
    if expr in ("*", ""):
        if expr == "":
            raise ValueError("empty tag expression")
        return [f"hmq.{topic}.m.>"]
    wanted = sorted({t.strip() for t in expr.split("||")})
    if any(t == "" for t in wanted):
        raise ValueError(f"empty tag in expression {tags!r}")
    return [f"hmq.{topic}.m.*.{encode_tag(t)}" for t in wanted]


def group_consumer_name(group: str) -> str:
    """Durable consumer name of a consumer group on a topic's stream."""
    return f"G_{group}"


def fifo_consumer_name(group: str, queue: int) -> str:
    """Durable consumer of one queue of a FIFO consumer group on a topic's stream."""
    return f"F{queue}_{group}"


def tx_decision_subject(msg_id: str) -> str:
    """Subject of the one decision of the transaction whose half is ``msg_id``."""
    return f"hmqs.tx.d.{msg_id}"


def tx_check_subject(msg_id: str) -> str:
    """Subject of the check count of the transaction whose half is ``msg_id``."""
    return f"hmqs.tx.c.{msg_id}"


def dlq_subject(group: str) -> str:
    """Subject of ``%DLQ%<group>`` in the DLQ stream."""
    return f"hmqs.dlq.{group}"


def id_subject(prefix: str) -> str:
    """Subject recording which stream a message-id prefix names."""
    return f"hmqs.ids.{prefix}"


def transactional_subject(topic: str) -> str:
    """Subject marking ``topic`` as one that holds half messages."""
    return f"hmqs.txt.{topic}"


def group_subject(group: str) -> str:
    """Subject recording that consumer group ``group`` exists (a group name is a token)."""
    return f"hmqs.grp.{group}"


def settings_subject(key: str) -> str:
    """Subject holding the engine setting ``key``."""
    return f"hmqs.set.{token(key)}"


def stream_id_prefix(stream: str, created: str, salt: int = 0) -> str:
    """The 8-hex-digit id prefix candidate number ``salt`` for a stream and its creation time."""
    digest = hashlib.blake2b(f"{stream}\0{created}\0{salt}".encode(), digest_size=4).digest()
    return digest.hex().upper()


def encode_msg_id(prefix: str, seq: int) -> str:
    """Message id of stream sequence ``seq`` in the stream whose prefix is ``prefix``."""
    return f"{prefix}{seq:016X}"


def decode_msg_id(msg_id: str) -> tuple[str, int]:
    """Split a message id into ``(prefix, sequence)``; raises ``ValueError`` if malformed."""
    if not isinstance(msg_id, str) or not _MSG_ID_RE.fullmatch(msg_id):
        raise ValueError(f"malformed message id: {msg_id!r}")
    seq = int(msg_id[8:], 16)
    if seq == 0:
        raise ValueError(f"malformed message id: {msg_id!r}")
    return msg_id[:8], seq
