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
6 unknown or conflicting transaction, 8 anything else malformed. Where a request breaks
several rules, any of their codes is accepted (the order of the checks is free).

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

__all__ = [
    "OK", "ERROR", "EITHER", "SILENT", "Expect", "World", "ConnectionModel", "KNOWN_BROKER_BUGS",
    "depth_of", "MAX_PREFETCH",
]

OK, ERROR, EITHER, SILENT = "ok", "error", "either", "silent"

KNOWN_BROKER_BUGS: dict[str, str] = {
    # values of the wrong documented type that the broker converts instead of refusing
    # (prefetch "5", half "no", version 1.0, ack ok 3, ping payload 7, ...)
    "lenient-types": "test_fuzz_regressions.py::test_documented_types_are_enforced",
    # no maximum prefetch: SUBSCRIBE {prefetch: 2**63} is accepted (issue 11, finding 1)
    "unbounded-prefetch": "test_fuzz_regressions.py::test_subscribe_huge_prefetch_on_a_backlog_keeps_rss_bounded",
    # a float infinity as prefetch, or a value nested ~1000 deep echoed in an error
    # message, is answered code 1 (internal error) with a traceback in the log
    "internal-error": "test_fuzz_regressions.py::test_odd_values_are_bad_requests_not_internal_errors",
    # a second HELLO on a connection is accepted and leaks the first identity
    "second-hello": "test_fuzz_regressions.py::test_second_hello_is_refused",
    # END_TX resolves the transaction of another producer group
    "end-tx-any-group": "test_fuzz_regressions.py::test_end_tx_for_another_groups_transaction_is_refused",
    # every unresolved half message costs ~540 bytes of broker memory, forever
    "unbounded-prepared": "test_fuzz_regressions.py::test_unresolved_half_messages_keep_rss_bounded",
}

#: The documented maximum prefetch, once the broker has one (None: none documented yet).
#: Up to the SDK default (64) a prefetch is always valid.
MAX_PREFETCH: int | None = None
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
        elif op in (Op.PING, Op.UNSUBSCRIBE):
            if type(p) is not dict:
                j.deviation("lenient-types", 8)
        else:
            j.breaks(8)  # DELIVER, CHECK and unknown operations are not requests
        return j.result(p)

    def _hello(self, j: _Judgement, p: Any) -> None:
        if self.hello:
            j.deviation("second-hello", 8)
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
        if type(client_id) is not str or not client_id:
            j.breaks(8)
        elif len(client_id) > 256:
            j.unspecified(8)  # the broker caps client ids at 256 characters
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
        if type(m) is not list or len(m) != 5:
            j.breaks(8)
            return
        body, tags, keys, props, born = m
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
        if type(p) is not dict:
            j.breaks(8)
            return
        group, topic = p.get("group", _MISSING), p.get("topic", _MISSING)
        for value, ok in ((group, _name_ok), (topic, _subscribe_topic_ok)):
            if value is _MISSING:
                j.breaks(8)
            elif type(value) is not str:
                j.breaks(3, 8)
            elif not ok(value):
                j.breaks(3)
        tags = p.get("tags", "*")
        if tags is not None and type(tags) is not str:
            j.breaks(8)
        start = p.get("start", "earliest")
        if type(start) is not str or start not in ("earliest", "latest"):
            j.breaks(8)
        self._count(j, p.get("prefetch", 64), low=1, high=64, max_allowed=MAX_PREFETCH, bug="unbounded-prefetch")
        self._count(j, p.get("max_reconsume_times", 16), low=0, high=None, max_allowed=None, bug=None)
        if self.subscribed:
            j.breaks(8)  # one subscription per connection

    @staticmethod
    def _count(j: _Judgement, v: Any, *, low: int, high: int | None, max_allowed: int | None, bug: str | None) -> None:
        """An integer option: below ``low`` refused; above ``high`` open (or refused past the max)."""
        if type(v) is not int:
            try:
                n = int(v)
            except OverflowError:  # float infinity: today an internal error
                j.breaks(8)
                if "internal-error" in KNOWN_BROKER_BUGS:
                    j.codes.add(1)
                    j.bugs.add("internal-error")
                return
            except (TypeError, ValueError):
                j.breaks(8)
                return
            j.deviation("lenient-types", 8)
            v = n
        if v < low:
            j.breaks(8)
        elif high is not None and v > high:
            if max_allowed is not None and v > max_allowed:
                j.breaks(8)
            elif bug is not None and bug in KNOWN_BROKER_BUGS:
                j.deviation(bug, 8)
            else:
                j.unspecified(8)

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
