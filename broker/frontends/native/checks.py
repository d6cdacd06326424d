"""What each request of the native protocol must look like: checks without I/O.

How this works
--------------
The connection (:mod:`broker.frontends.native.connection`) checks every request before
the engine sees it, so that a refused request stores nothing. The checks are here, without
the connection: they take the payload and, as arguments, the broker's limits and what
little of the connection they need (its producer group, the topic names it has seen).
Each raises ``BadRequestError`` (or ``MessageTooLargeError``, ``LimitExceededError``)
naming the first thing wrong, and returns what the engine takes. A SEND (``check_send``)
is checked whole, its messages one by one (``check_message``) with their options
(``check_send_options``); an ACK's items are all checked before any is applied
(``check_acks``); END_TX comes in a single and a list form (``check_end_tx``); SUBSCRIBE
and RECEIVE have ``check_subscribe`` and ``check_receive``.
The shapes are in docs/protocol.md (``PAYLOADS`` repeats them for error messages).

Strings a client chooses that the broker writes into its log (the HELLO's ``client_id``,
a subscription's tag expression) may hold no control character (C0, DEL, C1:
``check_text``): a newline would forge log lines, an escape sequence would reach the
operator's terminal.
A SEND holds at most ``MAX_SEND_MESSAGES`` messages, and each weighs its body plus
``SEND_MESSAGE_OVERHEAD`` bytes in the connection's ``--max-inflight-bytes``, so that a
frame of many empty messages is bounded too.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from protocol import (
    MAX_CLIENT_ID,
    MAX_SEND_MESSAGES,
    BadRequestError,
    LimitExceededError,
    MessageTooLargeError,
    Op,
)
from protocol.names import shown, validate_name, validate_send_topic, validate_subscribe_topic

if TYPE_CHECKING:
    from broker.config import BrokerConfig

__all__ = [
    "INVISIBLE_MS",
    "MAX_SEND_MESSAGES",
    "MAX_TAG_EXPRESSION",
    "PAYLOADS",
    "SEND_MESSAGE_OVERHEAD",
    "SEND_OPTIONS",
    "WAIT_MS_MAX",
    "SubscribeRequest",
    "check_acks",
    "check_client_id",
    "check_empty",
    "check_end_tx",
    "check_message",
    "check_recall",
    "check_receive",
    "check_send",
    "check_send_options",
    "check_subscribe",
    "check_tags",
    "check_text",
    "op_name",
    "payload_error",
    "too_many_messages",
]


@dataclass(slots=True)
class SubscribeRequest:
    """A checked SUBSCRIBE (see :class:`broker.engines.base.Subscription`)."""

    group: str
    topic: str
    tags: str | None
    start: str
    prefetch: int
    max_reconsume_times: int
    fifo: bool = False


#: RECEIVE bounds: invisible duration and long-poll wait, in milliseconds.
INVISIBLE_MS = (100, 12 * 3600 * 1000)
WAIT_MS_MAX = 60_000

#: Longest tag expression of a SUBSCRIBE or RECEIVE (``"A || B || ..."``), in characters:
#: room for hundreds of tags, while a client cannot make every delivery scan megabytes.
MAX_TAG_EXPRESSION = 16 * 1024
#: Bytes each message of a SEND adds to the in-flight bytes besides its body
#: (``--max-inflight-bytes``, ``--max-inflight-total``): about what the broker holds per
#: message until it is stored (its decoded row, ~270 bytes for a 16-byte body, the record
#: and the reply), so that many small messages weigh what they cost. Measured: with 256
#: here, sends of 16-byte messages held at the budget took the broker's RSS to 2.5 to 3 times
#: the budget above its baseline.
SEND_MESSAGE_OVERHEAD = 768

#: Control characters: C0, DEL and C1.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")

#: The payload of each request, as an error message names it (docs/protocol.md).
PAYLOADS: dict[int, str] = {
    Op.HELLO: 'a map {"version": 1, "client_id": str, "role": "producer" | "consumer", "group": str | nil}',
    Op.SEND: 'a map with topic (string) and msgs (list of [body, tags, keys, properties, born_ts]), '
             'and optionally half (bool)',
    Op.END_TX: 'a map {"msg_id": str, "outcome": "COMMIT" | "ROLLBACK"} or {"items": [[msg_id, outcome], ...]}',
    Op.SUBSCRIBE: 'a map with group and topic (strings), and optionally tags (string), start, prefetch, '
                  'max_reconsume_times, fifo',
    Op.ACK: 'a map {"a": [[token, ok], ...]}',
    Op.UNSUBSCRIBE: "an empty map",
    Op.PING: "an empty map",
    Op.AUTH: 'a map {"message": str}',
    Op.RECALL: 'a map {"msg_id": str}',
    Op.RECEIVE: 'a map with group and topic (strings), and optionally tags, max, invisible_ms, wait_ms',
    Op.SETTLE: 'a map {"group": str, "s": [[handle, action, ms], ...]}',
}


def payload_error(op: int, problem: str = "") -> BadRequestError:
    """``BadRequestError`` saying what the payload of ``op`` must be (and ``problem``, what
    was wrong, if known)."""
    shape = PAYLOADS.get(op)
    what = f"{op_name(op)}: payload must be {shape}" if shape else f"malformed {op_name(op)} request"
    return BadRequestError(f"{what}; {problem}" if problem else what)


def check_text(value: str, what: str) -> None:
    """Refuse a client's string that holds a control character (C0, DEL or C1: a newline, an
    escape, NUL, U+0085 NEL, U+009B CSI...): it is written into log lines."""
    m = _CONTROL.search(value)
    if m is not None:
        raise BadRequestError(f"{what} must not hold control characters (found {m.group()!r} at "
                              f"position {m.start()})")


def check_client_id(client_id: Any) -> str:
    """The client id of a HELLO: 1 to ``MAX_CLIENT_ID`` characters, no control character."""
    if not isinstance(client_id, str) or not client_id or len(client_id) > MAX_CLIENT_ID:
        raise BadRequestError(f"client_id must be a non-empty string of at most {MAX_CLIENT_ID} characters")
    check_text(client_id, "client_id")
    return client_id


def check_tags(tags: Any) -> str | None:
    """The tag expression of a SUBSCRIBE or RECEIVE (``"*"``, ``"A || B"``; nil: every
    message): at most ``MAX_TAG_EXPRESSION`` characters, no control character."""
    if tags is None or tags == "*":
        return tags  # type: ignore[no-any-return]
    if not isinstance(tags, str):
        raise BadRequestError("tags must be a string")
    if len(tags) > MAX_TAG_EXPRESSION:
        raise BadRequestError(f"tags expression of {len(tags)} characters is longer than the limit of "
                              f"{MAX_TAG_EXPRESSION}")
    check_text(tags, "tags")
    return tags


def too_many_messages(n: int) -> LimitExceededError:
    """The error for a SEND of ``n`` messages, more than ``MAX_SEND_MESSAGES``."""
    return LimitExceededError(f"a SEND holds at most {MAX_SEND_MESSAGES} messages, this one has {n}: "
                              "split it into several")


def check_message(body: Any, tags: Any, keys: Any, props: Any, born: Any, limit: int) -> None:
    """Raise a clear error for the first thing wrong with one message of a SEND."""
    if type(body) is not bytes:
        raise BadRequestError("body must be bytes")
    if len(body) > limit:
        raise MessageTooLargeError(f"body of {len(body)} bytes exceeds --max-message-size {limit}")
    if tags is not None and type(tags) is not str:
        raise BadRequestError("tags must be a string or nil")
    if type(keys) is not list:
        raise BadRequestError("keys must be a list of strings")
    for k in keys:
        if type(k) is not str:
            raise BadRequestError("keys must be a list of strings")
    if type(props) is not dict:
        raise BadRequestError("properties must map strings to strings")
    for k, v in props.items():
        if type(k) is not str or type(v) is not str:
            raise BadRequestError("properties must map strings to strings")
    if type(born) is not int:
        raise BadRequestError("born timestamp must be an integer")


#: The options a SEND message may carry (docs/protocol.md).
SEND_OPTIONS = frozenset(("group", "delay", "at"))


def check_send_options(opts: Any, *, half: bool, max_delay_ms: int, now_ms: int) -> dict[str, Any] | None:
    """The options map of one SEND message, checked whole and normalized (None if empty).

    ``delay`` (ms) of a plain message becomes ``at``, the epoch ms it is due by the
    broker's clock; a half message keeps ``delay``, counted from its commit, and may not
    name an ``at``. ``delay`` and ``at`` exclude each other; a delivery time must lie 1 ms
    to ``max_delay_ms`` ahead. Raises ``BadRequestError`` saying what is wrong.
    """
    if type(opts) is not dict:
        raise BadRequestError("message options must be a map")
    unknown = set(opts) - SEND_OPTIONS
    if unknown:
        raise BadRequestError(f"unknown message options {sorted(map(str, unknown))}; known: {sorted(SEND_OPTIONS)}")
    out: dict[str, Any] = {}
    group = opts.get("group")
    if group is not None:
        if type(group) is not str or not group or len(group) > 256:
            raise BadRequestError("the message group must be a string of 1 to 256 characters")
        out["group"] = group
    delay, at = opts.get("delay"), opts.get("at")
    if delay is not None and at is not None:
        raise BadRequestError("a message takes a delay or a delivery time (at), not both")
    if delay is not None:
        if type(delay) is not int:
            raise BadRequestError("delay must be an integer number of milliseconds")
        if not 1 <= delay <= max_delay_ms:
            raise BadRequestError(f"delay of {delay} ms is out of range: 1 ms to --max-delay ({max_delay_ms} ms)")
        if half:
            out["delay"] = delay
        else:
            out["at"] = now_ms + delay
    elif at is not None:
        if half:
            raise BadRequestError("a transactional message takes a delay (counted from its commit), "
                                  "not a delivery time")
        if type(at) is not int:
            raise BadRequestError("at must be an integer epoch time in milliseconds")
        if at <= now_ms:
            raise BadRequestError(f"delivery time {at} is not in the future (the broker's clock: {now_ms})")
        if at - now_ms > max_delay_ms:
            raise BadRequestError(f"delivery time {at} is {at - now_ms} ms ahead, beyond --max-delay "
                                  f"({max_delay_ms} ms)")
        out["at"] = at
    return out or None


def check_recall(p: Any) -> str:
    if not isinstance(p, dict) or not isinstance(p.get("msg_id"), str):
        raise BadRequestError("RECALL payload must be {\"msg_id\": str}")
    return p["msg_id"]  # type: ignore[no-any-return]


def check_acks(p: Any) -> list[Any]:
    """The items of an ACK, ``[token, ok]`` each, all checked before any is applied (a bad
    one refuses the lot). The payload's own list is returned: no copy per message."""
    items = p.get("a") if isinstance(p, dict) else None
    if type(items) is not list:
        raise BadRequestError("ACK payload must be {\"a\": [[token, ok], ...]}")
    for item in items:
        if type(item) is not list or len(item) != 2:
            raise BadRequestError(f"each ACK item must be [token: int, ok: bool], not {shown(item)}")
        token, ok = item
        if type(token) is not int or type(ok) is not bool:
            raise BadRequestError(f"each ACK item must be [token: int, ok: bool], not {shown(item)}")
    return items


def check_empty(p: Any, what: str) -> None:
    if not isinstance(p, dict):
        raise BadRequestError(f"{what} payload must be a map ({{}})")


def check_end_tx(p: Any) -> tuple[list[Any], bool]:
    """The items of an END_TX and whether it was the single form. Raises BadRequestError
    for a malformed payload; the engine answers malformed *items* of the list form one by one."""
    if not isinstance(p, dict):
        raise BadRequestError("END_TX payload must be a map")
    items = p.get("items")
    if items is None:
        msg_id, outcome = p.get("msg_id"), p.get("outcome")
        if outcome not in ("COMMIT", "ROLLBACK"):
            raise BadRequestError("outcome must be COMMIT or ROLLBACK")
        if not isinstance(msg_id, str):
            raise BadRequestError("msg_id must be a string")
        return [(msg_id, outcome)], True
    if type(items) is not list or not items:
        raise BadRequestError("items must be a non-empty list of [msg_id, outcome]")
    return items, False


def op_name(op: int) -> str:
    try:
        return Op(op).name
    except ValueError:
        return f"op {op}"


def check_send(p: Any, valid: set[str], group: str | None, config: BrokerConfig) -> tuple[str, list[list[Any]], bool, int]:
    """The topic, messages, half flag and weight of a SEND, checked whole before
    anything is stored. The weight, counted in ``--max-inflight-bytes``, is the body
    bytes plus ``SEND_MESSAGE_OVERHEAD`` per message; at most ``MAX_SEND_MESSAGES``.
    ``valid``: topic names already checked (a name found there is not checked again;
    one checked here is added, up to 100,000); ``group``: the connection's producer
    group (half messages need one)."""
    if type(p) is not dict:
        raise payload_error(Op.SEND, f"got {shown(p)}")
    topic = p.get("topic")
    msgs = p.get("msgs")
    if topic is None or msgs is None:
        raise payload_error(Op.SEND, "topic is missing" if topic is None else "msgs is missing")
    half = p.get("half", False)
    if type(half) is not bool:
        raise BadRequestError("SEND: half must be true or false")
    if type(topic) is not str or topic not in valid:
        validate_send_topic(topic)  # (raises InvalidNameError for anything but a name)
        if len(valid) < 100_000:
            valid.add(topic)
    if type(msgs) is not list or not msgs:
        raise BadRequestError("SEND: msgs must be a non-empty list of messages "
                              "[body, tags, keys, properties, born_ts]")
    n = len(msgs)
    if n > MAX_SEND_MESSAGES:  # refused whole, before any message is looked at
        raise too_many_messages(n)
    if half and not group:
        raise BadRequestError("half messages need a producer group in the handshake")
    limit = config.max_message_size
    size = n * SEND_MESSAGE_OVERHEAD
    now_ms = 0
    for m in msgs:
        if type(m) is list and len(m) == 5:
            body, tags, keys, props, born = m
        elif type(m) is list and len(m) == 6:
            now_ms = now_ms or int(time.time() * 1000)
            opts = check_send_options(m[5], half=half, max_delay_ms=int(config.max_delay * 1000),
                                      now_ms=now_ms)
            if opts is None:
                del m[5]
            else:
                m[5] = opts
            body, tags, keys, props, born = m[:5]
        else:
            raise BadRequestError("each message must be [body, tags, keys, properties, "
                                  "born_timestamp] and optionally a map of options")
        if (type(body) is bytes and (n := len(body)) <= limit and (tags is None or type(tags) is str)
                and type(keys) is list and not keys and type(props) is dict and not props and type(born) is int):
            size += n
            continue  # the common case, checked at once
        check_message(body, tags, keys, props, born, limit)
        size += len(body)
    return topic, msgs, half, size

def check_subscribe(p: Any, max_prefetch: int) -> SubscribeRequest:
    """A SUBSCRIBE's group, topic and settings, checked (a prefetch over
    ``max_prefetch`` is a ``LimitExceededError``)."""
    if type(p) is not dict:
        raise payload_error(Op.SUBSCRIBE, f"got {shown(p)}")
    if "group" not in p or "topic" not in p:
        raise payload_error(Op.SUBSCRIBE, "group is missing" if "group" not in p else "topic is missing")
    group = validate_name(p["group"], "group")
    topic = validate_subscribe_topic(p["topic"])
    tags = check_tags(p.get("tags", "*"))
    start = p.get("start", "earliest")
    if start not in ("earliest", "latest"):
        raise BadRequestError("start must be 'earliest' or 'latest'")
    prefetch = p.get("prefetch", 64)
    max_re = p.get("max_reconsume_times", 16)
    if type(prefetch) is not int or type(max_re) is not int:
        raise BadRequestError("prefetch and max_reconsume_times must be integers")
    if prefetch < 1 or max_re < 0:
        raise BadRequestError("prefetch must be >= 1 and max_reconsume_times >= 0")
    if prefetch > max_prefetch:
        raise LimitExceededError(f"prefetch {prefetch} exceeds the broker's --max-prefetch {max_prefetch}")
    fifo = p.get("fifo", False)
    if type(fifo) is not bool:
        raise BadRequestError("fifo must be a boolean")
    return SubscribeRequest(group, topic, tags, start, prefetch, max_re, fifo)

def check_receive(p: Any, max_prefetch: int) -> dict[str, Any]:
    """The arguments of a RECEIVE (a long poll of up to ``max`` messages; more than
    ``max_prefetch`` is a ``LimitExceededError``)."""
    if not isinstance(p, dict):
        raise payload_error(Op.RECEIVE, f"got {shown(p)}")
    group = validate_name(p.get("group"), "group")
    topic = validate_subscribe_topic(p.get("topic"))
    tags = check_tags(p.get("tags", "*"))
    n, invisible, wait = p.get("max", 32), p.get("invisible_ms", 30_000), p.get("wait_ms", 20_000)
    if type(n) is not int or type(invisible) is not int or type(wait) is not int:
        raise BadRequestError("max, invisible_ms and wait_ms must be integers")
    if n < 1:
        raise BadRequestError("max must be >= 1")
    if n > max_prefetch:
        raise LimitExceededError(f"max {n} exceeds the broker's --max-prefetch {max_prefetch}")
    if not INVISIBLE_MS[0] <= invisible <= INVISIBLE_MS[1]:
        raise BadRequestError(f"invisible_ms must be between {INVISIBLE_MS[0]} and {INVISIBLE_MS[1]}")
    if not 0 <= wait <= WAIT_MS_MAX:
        raise BadRequestError(f"wait_ms must be between 0 and {WAIT_MS_MAX}")
    return {"group": group, "topic": topic, "tags": tags, "max_messages": n, "invisible_ms": invisible,
            "wait_ms": wait}
