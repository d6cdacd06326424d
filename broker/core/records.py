"""The broker's log records: their types, header layouts, message ids and wire form.

How this works
--------------
Everything the embedded engine writes to the log is one of the record types below. A
message record's header is a msgpack *array* (cheaper than a map to build, encode and
decode, and built once per message on the hot path); the other records have small maps.

- ``RT_MSG``: a normal message, header ``[topic, tags, keys, properties, born, epoch]``,
  the body as the record body. Indexed in its topic's queue.
- ``RT_HALF``: a half message, the same header plus ``[producer group, producer id,
  queue]``; indexed in ``%HALF%`` only, so no consumer sees it. The half messages of one
  SEND may be one bundle (see ``storage.framing``) whose members share the queue.
- Either header may carry, at ``H_EXT`` (a plain message's header is padded with nils to
  reach it), a map of extras: ``"g"`` the FIFO message group, ``"at"`` the epoch ms a
  scheduled message is due, ``"d"`` the delay in ms of a half message (counted from its
  commit). Messages without extras keep the short header.
- ``RT_TX_OP``: a transaction outcome ``{id, s: "C"|"R"|"A", hp: half position, b: who
  decided ("p" producer, "c" check-back, "o" operator), n: check-backs by then}``, or the
  outcomes of one END_TX ``{ops: [[id, s, hp, b, n], ...]}`` (read both with ``tx_ops``);
  indexed in ``%OP%``. It follows the ``RT_COMMIT_REF`` records of its commits in the log,
  so a recorded commit always has its reference (a torn write keeps a prefix of a batch).
- ``RT_COMMIT_REF``: carries the index entry that makes a stored message visible: the
  entry in the topic's queue points at the stored record (``ref_pos``), so the body is
  never written twice. Header ``{ids: [...]}`` for the committed half messages of one queue
  (one entry each: a references record, see ``storage.framing``; ``{id}`` with one entry before
  that), ``{rel: pos}`` for a released scheduled message.
- ``RT_SCHEDULE`` / ``RT_RELEASE`` / ``RT_RECALL``: the schedule of delayed messages,
  indexed in ``%SCHED%`` (see ``broker.core.schedule``): the messages due in one second
  (a scheduled message itself is an ``RT_MSG`` record that no topic queue indexes until
  it is released), the messages released at once (followed by their ``RT_COMMIT_REF``
  records), a recall ``{r: pos, t: topic}``.
- ``RT_RETRY`` / ``RT_DLQ``: a failed delivery waiting for its retry, or dead-lettered
  (see ``broker.core.delivery``); a DLQ entry points at the original message record.
- ``RT_ACK``: acknowledgements of one consumer group ``{g, a: [[topic, queue, offset],
  ...]}``, indexed in ``%ACK%``: written with the log's group commit, so an ack the broker
  confirmed survives a crash (see ``broker.engines.embedded.delivering``).
- ``RT_TRACE``: with ``--trace``, the delivery events of one loop iteration ``{e: [...]}``
  (who sent a message, each delivery attempt and its outcome), indexed in ``%TRACE%``
  (see ``broker.engines.embedded.tracing``).

A message id is the store epoch and the log position of the record that holds the body,
in hex (``make_msg_id``): known as soon as the record is stored, the same for a half
message and its delivery (T9), and "message by id" is one read, no index.
"""

from __future__ import annotations

import zlib
from typing import Any

from storage import Record

__all__ = [
    "RT_MSG",
    "RT_HALF",
    "RT_TX_OP",
    "RT_RETRY",
    "RT_DLQ",
    "RT_COMMIT_REF",
    "RT_ACK",
    "RT_SCHEDULE",
    "RT_RELEASE",
    "RT_RECALL",
    "RT_TRACE",
    "TRACE_TOPIC",
    "RETRY_PREFIX",
    "SCHED_TOPIC",
    "HALF_TOPIC",
    "OP_TOPIC",
    "ACK_TOPIC",
    "H_TOPIC",
    "H_TAGS",
    "H_KEYS",
    "H_PROPS",
    "H_BORN",
    "H_EPOCH",
    "H_PGROUP",
    "H_PCLIENT",
    "H_QUEUE",
    "H_EXT",
    "build_wire",
    "message_header",
    "make_msg_id",
    "parse_msg_id",
    "parse_tags",
    "record_msg_id",
    "retry_topic",
    "tag_hash",
    "header_ext",
    "tx_op_header",
    "tx_ops",
    "wire_json",
]

RT_MSG = 1  # a normal message: header [topic, tags, keys, properties, born, epoch] ; body
RT_HALF = 2  # a half message: the same + [producer group, producer id, queue]
RT_TX_OP = 3  # a transaction outcome: id, s ("C" | "R" | "A"), hp (half pos), b (by), n (checks)
RT_RETRY = 4  # a retry: id, rp (message pos), rt (reconsume times), ot, oq, oo, g
RT_DLQ = 5  # a dead letter: id, rp, g, ot, oq, oo, rt ; indexed by ref into %DLQ%<group>
RT_COMMIT_REF = 6  # carrier of the index entry that makes a committed half message visible
RT_ACK = 7  # acks of one group: g, a ([[topic, queue, offset], ...]) ; indexed in %ACK%
RT_SCHEDULE = 8  # messages due in one second: s, p (previous record of its slot), e ; in %SCHED%
RT_RELEASE = 9  # scheduled messages released: r ([[pos, topic], ...]) ; in %SCHED%
RT_RECALL = 10  # a scheduled message recalled: r (pos), t (topic) ; in %SCHED%
RT_TRACE = 11  # --trace: delivery events of one loop iteration: e ([[kind, ...], ...]) ; in %TRACE%

RETRY_PREFIX = "%RETRY%"
HALF_TOPIC = "%HALF%"
OP_TOPIC = "%OP%"
ACK_TOPIC = "%ACK%"
SCHED_TOPIC = "%SCHED%"
TRACE_TOPIC = "%TRACE%"

# Positions in the header of a message record.
H_TOPIC, H_TAGS, H_KEYS, H_PROPS, H_BORN, H_EPOCH, H_PGROUP, H_PCLIENT, H_QUEUE, H_EXT = range(10)


def message_header(topic: str, tags: str | None, keys: list[str], props: dict[str, str], born: int,
                   epoch: int, ext: dict[str, Any] | None = None) -> list[Any]:
    """The header of an ``RT_MSG`` record (extras, if any, at ``H_EXT``)."""
    if not ext:
        return [topic, tags, keys, props, born, epoch]
    return [topic, tags, keys, props, born, epoch, None, None, None, ext]


def header_ext(header: list[Any]) -> dict[str, Any] | None:
    """The extras of a message record's header, or None."""
    return header[H_EXT] if len(header) > H_EXT else None


def tx_op_header(ops: list[list[Any]]) -> dict[str, Any]:
    """The header of an ``RT_TX_OP`` record holding ``ops`` (``[id, s, hp, b, n]`` each)."""
    if len(ops) == 1:
        return dict(zip(_OP_KEYS, ops[0], strict=True))
    return {"ops": ops}


def tx_ops(header: dict[str, Any]) -> list[tuple[str, str, int | None, str, int | None]]:
    """The outcomes an ``RT_TX_OP`` record holds, ``(id, s, hp, b, n)`` each, in order."""
    ops = header.get("ops")
    if ops is None:
        return [(header["id"], header["s"], header.get("hp"), header.get("b", ""), header.get("n"))]
    return [tuple(op) for op in ops]


_OP_KEYS = ("id", "s", "hp", "b", "n")


def retry_topic(group: str) -> str:
    """The retry topic of a group: ``%RETRY%<group>``."""
    return RETRY_PREFIX + group


def tag_hash(tag: str | None) -> int:
    """The 32-bit hash stored in queue-index entries for tag filtering (0: no tag)."""
    if not tag:
        return 0
    return zlib.crc32(tag.encode()) or 1


def parse_tags(expr: str | None) -> frozenset[str] | None:
    """``"*"``/empty -> None (all); ``"A || B"`` -> {"A", "B"}."""
    if expr is None:
        return None
    expr = expr.strip()
    if expr in ("", "*"):
        return None
    tags = frozenset(t.strip() for t in expr.split("||") if t.strip())
    return tags or None


def make_msg_id(epoch: int, pos: int) -> str:
    """A message id: the store epoch and the log position of the record, in hex."""
    return f"{epoch:08X}{pos:016X}"


def parse_msg_id(msg_id: str) -> int:
    """The log position encoded in a message id; ``ValueError`` if malformed."""
    if not isinstance(msg_id, str) or len(msg_id) != 24:
        raise ValueError(f"malformed message id {msg_id!r}")
    return int(msg_id[8:], 16)


def record_msg_id(rec: Record) -> str:
    """The id of the message stored in ``rec`` (an RT_MSG or RT_HALF record)."""
    return make_msg_id(rec.header[H_EPOCH], rec.pos)


#: epoch -> its 8 hex digits, the first part of every message id of that store (a store has
#: one epoch: formatting it once per message id is a measurable part of a delivery)
_EPOCH_HEX: dict[int, str] = {}


def _epoch_hex(epoch: int) -> str:
    if len(_EPOCH_HEX) >= 64:
        _EPOCH_HEX.clear()
    s = _EPOCH_HEX[epoch] = f"{epoch:08X}"
    return s


def build_wire(rec: Record, topic: str, qid: int, off: int, reconsume: int, _unused: Any = None) -> list[Any]:
    """The wire form (``protocol.Message.to_wire``) of the message in ``rec`` as delivered
    from ``topic``; a message delivered from another topic (a DLQ) carries ``ORIGIN_TOPIC``."""
    h = rec.header
    t, g, k, props, born, epoch = h if len(h) == 6 else h[:6]
    if topic != t:
        props = {**props, "ORIGIN_TOPIC": t}
    prefix = _EPOCH_HEX.get(epoch) or _epoch_hex(epoch)
    # the position's 16 hex digits: as f"{pos:016X}" (a log position is below 2**64), in
    # about 900 instructions fewer than the format
    wire = [prefix + rec.pos.to_bytes(8, "big").hex().upper(), topic, rec.body, g, k, props, born,
            rec.store_time, qid, off, reconsume]
    if len(h) > H_EXT:
        ext = h[H_EXT]
        extras = {key: ext[key] for key in ("g", "at") if key in ext}
        if extras:
            wire.append(extras)
    return wire


def wire_json(wire: list[Any]) -> dict[str, Any]:
    """A wire message as the admin API shows it (a UTF-8 body as text, others in hex)."""
    body: bytes = wire[2]
    try:
        text: str | None = body.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    return {
        "msg_id": wire[0],
        "topic": wire[1],
        "body": text,
        "body_hex": body.hex() if text is None else None,
        "body_size": len(body),
        "tags": wire[3],
        "keys": list(wire[4]),
        "properties": wire[5],
        "born_timestamp": wire[6],
        "store_timestamp": wire[7],
        "queue_id": wire[8],
        "queue_offset": wire[9],
    }
