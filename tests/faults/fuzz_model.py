"""What the broker must answer to a request, as docs/protocol.md and SPEC.md say.

How this works
--------------
``ConnectionModel`` follows one connection: it knows whether the handshake was accepted,
with which group, and whether the connection subscribed. ``expect(op, payload)`` returns
an ``Expect``: REPLY (``OK``), ERROR with one of ``codes`` (``ERROR``), either of the two
(``EITHER``, where the documents leave the choice open or the broker has a known bug), or
no answer at all (``SILENT``: REPLY and ERROR frames sent by a client answer nothing).
``observe`` then moves the state on from the *actual* answer, so a request whose outcome
was open does not make the model guess, and checks the REPLY payload's shape.

The payload judged is the one the broker decoded (the fuzzer decodes its own bytes with
the project's ``FrameDecoder``). Codes: 3 bad name, 4 body over ``--max-message-size``,
6 unknown or conflicting transaction, 8 anything else malformed, 10 past a documented
limit (``--max-prefetch``), 11 a receipt handle naming no live lease. Where a request
breaks several rules, any of their codes is accepted (the order of the checks is free).

Known broker bugs
-----------------
Each entry of ``KNOWN_BROKER_BUGS`` relaxes the model where today's broker deviates from
the documents, and names the ``xfail(strict=True)`` test that pins the deviation. Whoever
fixes one removes that mark *and* the entry here: the fuzzer then holds the broker to the
documented behaviour.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from protocol import Op

#: What a client id or a tag expression may not hold (the broker writes them into its log).
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")

__all__ = [
    "OK", "ERROR", "EITHER", "SILENT", "Expect", "World", "ConnectionModel", "KNOWN_BROKER_BUGS",
    "depth_of", "MAX_PREFETCH", "WAIT_MS_MAX", "INVISIBLE_MS",
]

OK, ERROR, EITHER, SILENT = "ok", "error", "either", "silent"

KNOWN_BROKER_BUGS: dict[str, str] = {}  # none open

#: The broker's ``--max-prefetch`` (README, "Limits"): a larger prefetch, or RECEIVE max,
#: is refused with code 10.
MAX_PREFETCH = 4096
#: RECEIVE bounds (docs/protocol.md): invisible duration and long-poll wait, milliseconds.
INVISIBLE_MS = (100, 12 * 3600 * 1000)
WAIT_MS_MAX = 60_000
#: Values nested this deep may still hit Python's recursion limit in an error message.
DEEP = 900
NAME = re.compile(r"[A-Za-z0-9_-]{1,127}")
DLQ_PREFIX = "%DLQ%"
TX_STATES = {"COMMIT": "COMMITTED", "ROLLBACK": "ROLLED_BACK"}
_MISSING = object()


def depth_of(value: Any) -> int:
    """Nesting depth of lists and dicts in ``value`` (iterative: values may be 1000 deep)."""
    best = 0
    stack = [(value, 0)]
    while stack:
        v, d = stack.pop()
        best = max(best, d)
        if type(v) is list:
            stack.extend((x, d + 1) for x in v)
        elif type(v) is dict:
            stack.extend((x, d + 1) for x in v.values())
    return best


def _name_ok(v: Any) -> bool:
    return type(v) is str and NAME.fullmatch(v) is not None


def _subscribe_topic_ok(v: Any) -> bool:
    if type(v) is str and v.startswith(DLQ_PREFIX):
        return _name_ok(v[len(DLQ_PREFIX):])
    return _name_ok(v)


def _not_a_list_pair(j: _Judgement, item: Any, *codes: int) -> bool:
    """True if ``item`` (meant to be a two-element list) is not a list. One that unpacks into
    two values all the same (a two-character string, a two-key map) is a known deviation
    (the broker unpacks it); one that does not is refused."""
    if type(item) is list:
        return False
    try:
        _first, _second = item
    except (TypeError, ValueError):
        j.breaks(8)
    else:
        j.deviation("lenient-types", *codes)
    return True


@dataclass(frozen=True)
class Expect:
    """The answers allowed to one request."""

    verdict: str
    codes: frozenset[int] = frozenset()
    bugs: frozenset[str] = frozenset()
    items: tuple[Expect, ...] | None = None  # END_TX items: the expected result per item

    def problem(self, answer: str, code: int | None) -> str | None:
        """None if ``answer`` (``ok``, ``error`` or ``none``) with ``code`` is allowed; else why not."""
        if self.verdict == SILENT:
            return None if answer == "none" else f"expected no answer, got {answer} {code}"
        if answer == "ok" and self.verdict in (OK, EITHER):
            return None
        if answer == "error" and self.verdict in (ERROR, EITHER) and code in self.codes:
            return None
        want = {OK: "REPLY", ERROR: f"ERROR {sorted(self.codes)}", EITHER: f"REPLY or ERROR {sorted(self.codes)}"}
        return f"expected {want[self.verdict]}, got {answer.upper()}{'' if code is None else f' code {code}'}"


class _Judgement:
    """Collects the rules a request breaks: definite ones and known deviations."""

    def __init__(self) -> None:
        self.codes: set[int] = set()
        self.open_codes: set[int] = set()
        self.bugs: set[str] = set()
        self.open = False

    def breaks(self, *codes: int) -> None:
        self.codes.update(codes)

    def deviation(self, bug: str, *codes: int) -> None:
        """A rule the broker is known to break: open while ``bug`` is known, else definite."""
        if bug in KNOWN_BROKER_BUGS:
            self.bugs.add(bug)
            self.open = True
            self.open_codes.update(codes)
        else:
            self.codes.update(codes)

    def unspecified(self, *codes: int) -> None:
        """The documents leave it open: refusing (with ``codes``) and accepting are both fine."""
        self.open = True
        self.open_codes.update(codes)

    def result(self, payload: Any = None) -> Expect:
        codes = self.codes | self.open_codes
        if (self.codes or self.open) and "internal-error" in KNOWN_BROKER_BUGS and depth_of(payload) >= DEEP:
            codes.add(1)
            self.bugs.add("internal-error")
        if self.codes:
            return Expect(ERROR, frozenset(codes), frozenset(self.bugs))
        if self.open:
            return Expect(EITHER, frozenset(codes), frozenset(self.bugs))
        return Expect(OK)


@dataclass
class World:
    """What the model knows beyond one connection: the prepared transactions and the limits."""

    max_message_size: int
    tx_group: str
    tx_ids: list[str] = field(default_factory=list)
    recorded: dict[str, str] = field(default_factory=dict)  # msg_id -> state seen in a REPLY


class ConnectionModel:
    """The state of one connection as far as the broker's answers go (see module docstring)."""

    def __init__(self, world: World, *, hello: bool = False, group: str | None = None) -> None:
        self.world = world
        self.hello = hello
        self.group = group
        self.subscribed = False

    # -- expectations --------------------------------------------------------------------

    def expect(self, op: int, p: Any) -> Expect:
        """What the broker may answer to ``[op, rid, p]`` on this connection now."""
        if op in (Op.REPLY, Op.ERROR):
            return Expect(SILENT)
        j = _Judgement()
        if op == Op.ACK:
            self._ack(j, p)
        elif op == Op.HELLO:
            self._hello(j, p)
        elif not self.hello:
            j.breaks(8)  # the first frame must be HELLO
        elif op == Op.SEND:
            self._send(j, p)
        elif op == Op.END_TX:
            return self._end_tx(j, p)
        elif op == Op.SUBSCRIBE:
            self._subscribe(j, p)
        elif op == Op.RECEIVE:
            self._receive(j, p)
        elif op == Op.SETTLE:
            return self._settle(j, p)
        elif op == Op.RECALL:
            # a scheduled message may be recalled (REPLY); anything else is refused: 8 for a
            # malformed request, 12 (MessageStateError) for an unknown, unscheduled or due message
            j.unspecified(6, 8, 12)
        elif op in (Op.PING, Op.UNSUBSCRIBE):
            if type(p) is not dict:
                j.deviation("lenient-types", 8)
        else:
            j.breaks(8)  # DELIVER, CHECK and unknown operations are not requests
        return j.result(p)

    def _hello(self, j: _Judgement, p: Any) -> None:
        if self.hello:
            j.breaks(8)  # HELLO is the first frame, once
        if type(p) is not dict:
            j.breaks(8)
            return
        version = p.get("version", _MISSING)
        if not (type(version) is int and version == 1):
            if version is not _MISSING and version == 1:  # True, 1.0
                j.deviation("lenient-types", 8)
            else:
                j.breaks(8)
        client_id = p.get("client_id", _MISSING)
        if type(client_id) is not str or not client_id or len(client_id) > 256 or _CONTROL.search(client_id):
            j.breaks(8)  # a client id has 1 to 256 characters (README, "Limits")
        if p.get("role", _MISSING) not in ("producer", "consumer"):
            j.breaks(8)
        group = p.get("group")
        if group is not None and not _name_ok(group):
            j.breaks(3, 8) if type(group) is not str else j.breaks(3)

    def _send(self, j: _Judgement, p: Any) -> None:
        if type(p) is not dict:
            j.breaks(8)
            return
        topic = p.get("topic", _MISSING)
        if topic is _MISSING:
            j.breaks(8)
        elif type(topic) is not str:
            j.breaks(3, 8)
        elif topic.startswith("%") or not _name_ok(topic):
            j.breaks(3)
        msgs = p.get("msgs", _MISSING)
        if type(msgs) is not list or not msgs:
            j.breaks(8)
        else:
            for m in msgs:
                self._message(j, m)
        half = p.get("half", False)
        if type(half) is not bool:
            j.deviation("lenient-types", 8)
        if half and not self.group:
            j.breaks(8)  # half messages need a producer group

    def _message(self, j: _Judgement, m: Any) -> None:
        if type(m) is not list or len(m) not in (5, 6):
            j.breaks(8)
            return
        if len(m) == 6:
            self._options(j, m[5])
        body, tags, keys, props, born = m[:5]
        if type(body) is not bytes:
            j.breaks(8)
        elif len(body) > self.world.max_message_size:
            j.breaks(4)
        if tags is not None and type(tags) is not str:
            j.breaks(8)
        if type(keys) is not list or any(type(k) is not str for k in keys):
            j.breaks(8)
        if type(props) is not dict or any(type(k) is not str or type(v) is not str for k, v in props.items()):
            j.breaks(8)
        if type(born) is not int:
            j.breaks(8)

    @staticmethod
    def _options(j: _Judgement, opts: Any) -> None:
        """The option map of one message: ``group`` (FIFO), ``delay`` / ``at`` (scheduled)."""
        if type(opts) is not dict:
            j.breaks(8)
            return
        for key, value in opts.items():
            if key == "group":
                if type(value) is not str or not 0 < len(value) <= 256:
                    j.breaks(8)
            elif key in ("delay", "at"):
                j.unspecified(8)  # documented, but the embedded engine schedules nothing
            else:
                j.breaks(8)  # not an option

    def _end_tx(self, j: _Judgement, p: Any) -> Expect:
        if type(p) is not dict:
            j.breaks(8)
            return j.result(p)
        items = p.get("items")
        if items is not None:
            if type(items) is not list or not items:
                j.breaks(8)
                return j.result(p)
            return Expect(OK, items=tuple(self._tx_item(item) for item in items))
        msg_id, outcome = p.get("msg_id", _MISSING), p.get("outcome", _MISSING)
        if msg_id is _MISSING or outcome is _MISSING:
            j.breaks(8)
            return j.result(p)
        return self._tx(msg_id, outcome, p)

    def _tx_item(self, item: Any) -> Expect:
        j = _Judgement()
        if _not_a_list_pair(j, item, 6, 8):  # unpacked as [msg_id, outcome] all the same
            return j.result(item)
        if len(item) != 2:
            j.breaks(8)
            return j.result(item)
        return self._tx(item[0], item[1], item)

    def _tx(self, msg_id: Any, outcome: Any, p: Any) -> Expect:
        j = _Judgement()
        if type(outcome) is not str or outcome not in TX_STATES or type(msg_id) is not str:
            j.breaks(8)
            return j.result(p)
        if msg_id not in self.world.tx_ids:
            j.breaks(6)  # unknown transaction
            return j.result(p)
        target = TX_STATES[outcome]
        recorded = self.world.recorded.get(msg_id)
        if self.group != self.world.tx_group:
            j.deviation("end-tx-any-group", 6, 7)
        if recorded is None:
            j.unspecified(6)  # prepared, or resolved meanwhile (a check-back, another session)
        elif recorded != target:
            j.breaks(6)  # conflicting outcome (T6)
        return j.result(p)

    def _subscribe(self, j: _Judgement, p: Any) -> None:
        if self.subscribed:
            j.breaks(8)  # one subscription per connection
        if type(p) is not dict:
            j.breaks(8)
            return
        self._group_and_topic(j, p.get("group", _MISSING), p.get("topic", _MISSING), missing=8)
        self._tags(j, p)
        start = p.get("start", "earliest")
        if type(start) is not str or start not in ("earliest", "latest"):
            j.breaks(8)
        self._count(j, p.get("prefetch", 64), low=1, high=MAX_PREFETCH)
        self._count(j, p.get("max_reconsume_times", 16), low=0, high=None)
        fifo = p.get("fifo", False)
        if type(fifo) is not bool:
            j.breaks(8)
        elif fifo:
            j.unspecified(8)  # makes a new group FIFO; refused for an existing group that is not

    def _receive(self, j: _Judgement, p: Any) -> None:
        if type(p) is not dict:
            j.breaks(8)
            return
        self._group_and_topic(j, p.get("group"), p.get("topic"), missing=3)
        self._tags(j, p)
        self._count(j, p.get("max", 32), low=1, high=MAX_PREFETCH)
        invisible, wait = p.get("invisible_ms", 30_000), p.get("wait_ms", 20_000)
        if type(invisible) is not int or not INVISIBLE_MS[0] <= invisible <= INVISIBLE_MS[1]:
            j.breaks(8)
        if type(wait) is not int or not 0 <= wait <= WAIT_MS_MAX:
            j.breaks(8)

    def _settle(self, j: _Judgement, p: Any) -> Expect:
        if type(p) is not dict:
            j.breaks(8)
            return j.result(p)
        group, items = p.get("group", _MISSING), p.get("s", _MISSING)
        if group is _MISSING:
            j.breaks(8)
        elif not _name_ok(group):
            j.breaks(3, 8) if type(group) is not str else j.breaks(3)
        if type(items) is not list or not items:
            j.breaks(8)
        if j.codes:
            return j.result(p)
        # no receipt handle the fuzzer sends names a live lease: every item fails on its own
        stale = Expect(ERROR, frozenset({8, 11}))
        return Expect(OK, items=tuple(stale for _ in items))

    @staticmethod
    def _group_and_topic(j: _Judgement, group: Any, topic: Any, *, missing: int) -> None:
        for value, ok in ((group, _name_ok), (topic, _subscribe_topic_ok)):
            if value is _MISSING:
                j.breaks(missing)
            elif type(value) is not str:
                j.breaks(3, 8)
            elif not ok(value):
                j.breaks(3)

    @staticmethod
    def _tags(j: _Judgement, p: dict[Any, Any]) -> None:
        tags = p.get("tags", "*")
        if tags is not None and (type(tags) is not str or len(tags) > 16 * 1024 or _CONTROL.search(tags)):
            j.breaks(8)

    @staticmethod
    def _count(j: _Judgement, v: Any, *, low: int, high: int | None) -> None:
        """An integer option: not an int or below ``low``, code 8; above ``high``, code 10."""
        if type(v) is not int or v < low:
            j.breaks(8)
        elif high is not None and v > high:
            j.breaks(10)  # a documented limit (LimitExceededError)

    def _ack(self, j: _Judgement, p: Any) -> None:
        if not self.subscribed:
            j.breaks(8)  # ACK without a subscription (payload not even read)
            return
        if type(p) is not dict or "a" not in p:
            j.breaks(8)
            return
        acks = p["a"]
        if type(acks) is not list:
            try:
                iter(acks)
            except TypeError:
                j.breaks(8)
            else:
                j.deviation("lenient-types", 8)
            return
        for item in acks:
            if _not_a_list_pair(j, item, 8):
                continue
            if len(item) != 2:
                j.breaks(8)
                continue
            token, ok = item
            if type(token) in (list, dict):
                j.breaks(8)  # unhashable
                if "ack-partial" in KNOWN_BROKER_BUGS:
                    j.bugs.add("ack-partial")  # the items before it were applied all the same
            elif type(token) is not int:
                j.deviation("lenient-types", 8)
            if type(ok) is not bool:
                j.deviation("lenient-types", 8)

    def refused_whatever_the_state(self, op: int, p: Any) -> bool:
        """True if the request is refused on any connection (for sessions that never read)."""
        optimistic = ConnectionModel(self.world, hello=True, group=self.world.tx_group)
        return optimistic.expect(op, p).verdict == ERROR

    # -- observations ------------------------------------------------------------------

    def observe(self, op: int, p: Any, expect: Expect, answer: str, reply: Any) -> list[str]:
        """Move the state on from the actual answer; return problems with the REPLY payload."""
        problems: list[str] = []
        if answer != "ok":
            return problems
        if op == Op.HELLO:
            self.hello, self.group = True, p.get("group")
            if reply is not None and reply != {"version": 1, "max_message_size": self.world.max_message_size}:
                problems.append(f"HELLO reply {reply!r}")
        elif op == Op.SUBSCRIBE:
            self.subscribed = True
        elif op == Op.END_TX:
            problems += self._observe_end_tx(p, expect, reply)
        elif op == Op.SEND and reply is not None:
            problems += self._check_send_reply(p, reply)
        elif op == Op.RECEIVE and reply is not None:
            rows = reply.get("m") if isinstance(reply, dict) else None
            if type(rows) is not list or any(type(r) is not list or len(r) != 2 or type(r[0]) is not str
                                             for r in rows):
                problems.append(f"RECEIVE reply {str(reply)[:200]}")
        elif op == Op.SETTLE and reply is not None:
            problems += self._check_items(p["s"], expect, reply, "SETTLE")
        elif op in (Op.PING, Op.UNSUBSCRIBE, Op.ACK) and reply not in (None, {}):
            problems.append(f"{Op(op).name} reply {reply!r}")
        return problems

    def _observe_end_tx(self, p: dict, expect: Expect, reply: Any) -> list[str]:
        if expect.items is None:
            item = [p["msg_id"], p["outcome"]]
            if reply is None:  # rid 0: accepted means recorded as asked
                pairs = [(item, TX_STATES.get(p["outcome"]) if type(p["outcome"]) is str else None)]
            else:
                pairs = [(item, reply.get("state") if isinstance(reply, dict) else None)]
            exps = [expect]
        else:
            if reply is None:
                return []  # rid 0: no per-item results to check
            results = reply.get("r") if isinstance(reply, dict) else None
            if not isinstance(results, list) or len(results) != len(expect.items):
                return [f"END_TX items reply {reply!r}"]
            pairs = list(zip(p["items"], results, strict=True))
            exps = list(expect.items)
        problems = []
        for (item, result), exp in zip(pairs, exps, strict=True):
            if type(result) is list:  # [code, message] for this item
                code = result[0] if result else None
                why = exp.problem("error", code if type(code) is int else None)
            else:
                why = exp.problem("ok", None)
                msg_id, outcome = (item[0], item[1]) if type(item) is list else (None, None)
                want = TX_STATES.get(outcome) if type(outcome) is str else None
                if want is not None and result != want:
                    why = f"recorded state {result!r} for outcome {outcome!r}"
                elif want is not None and type(msg_id) is str:
                    self.world.recorded[msg_id] = want
            if why:
                problems.append(f"END_TX item {item!r}: {why}")
        return problems

    @staticmethod
    def _check_items(items: list[Any], expect: Expect, reply: Any, what: str) -> list[str]:
        """A per-item reply ``{"r": [...]}``: each result a value, or ``[code, message]``."""
        assert expect.items is not None
        results = reply.get("r") if isinstance(reply, dict) else None
        if not isinstance(results, list) or len(results) != len(items):
            return [f"{what} reply {str(reply)[:200]}"]
        problems = []
        for item, result, exp in zip(items, results, expect.items, strict=True):
            if type(result) is list:
                code = result[0] if result and type(result[0]) is int else None
                why = exp.problem("error", code)
            else:
                why = exp.problem("ok", None)
            if why:
                problems.append(f"{what} item {str(item)[:100]}: {why}")
        return problems

    def _check_send_reply(self, p: dict, reply: Any) -> list[str]:
        rows = reply.get("r") if isinstance(reply, dict) else None
        prefix = reply.get("p") if isinstance(reply, dict) else None
        if type(prefix) is not str or len(prefix) != 8 or type(rows) is not list or len(rows) != len(p["msgs"]):
            return [f"SEND reply {str(reply)[:200]}"]
        half = bool(p.get("half", False))
        for row in rows:
            if type(row) is not list or len(row) != 3 or not all(type(x) is int for x in row):
                return [f"SEND reply row {row!r}"]
            if (row[2] == -1) != half or row[0] < 0 or row[1] < 0:
                return [f"SEND reply row {row!r} for half={half}"]
        return []
