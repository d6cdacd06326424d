"""What each request of the native protocol must look like: checks without I/O.

How this works
--------------
The connection (:mod:`broker.frontends.native.connection`) checks every request before
the engine sees it, so that a refused request stores nothing. The checks that need only
the payload (and the broker's limits as arguments) are here: each raises
``BadRequestError`` (or ``MessageTooLargeError``) naming the first thing wrong, and returns
what the engine takes. A SEND's messages are checked one by one (``check_message``) with
their options (``check_send_options``); an ACK's items are all checked before any is
applied (``check_acks``); END_TX comes in a single and a list form (``check_end_tx``).
The shapes are in docs/protocol.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from protocol import BadRequestError, MessageTooLargeError, Op
from protocol.names import shown

__all__ = [
    "INVISIBLE_MS",
    "SEND_OPTIONS",
    "WAIT_MS_MAX",
    "SubscribeRequest",
    "check_acks",
    "check_empty",
    "check_end_tx",
    "check_message",
    "check_recall",
    "check_send_options",
    "op_name",
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
