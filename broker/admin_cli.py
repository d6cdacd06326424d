"""``halfmq admin ...``: the admin HTTP API from a terminal, as tables for people.

How this works
--------------
Each sub-command is one call of the admin HTTP API (``broker.frontends.http.admin``). Its
JSON answer is printed as it came with ``--json`` (for scripts), otherwise as aligned
tables (for people, as the ``nats`` CLI does): one row per topic, group, message, event.
Times are shown in UTC, ages and delays in seconds; a page that has more says how to get
the next one (``--after``).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any
from urllib.parse import quote, urlencode

from broker.security.cli import add_http_login_options, http_call

__all__ = ["admin_main", "table", "trace_lines"]

Column = tuple[str, Callable[[dict[str, Any]], Any]]


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.1f}"
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value) or "-"
    return str(value)


def table(rows: Iterable[dict[str, Any]], columns: Sequence[Column], empty: str = "(none)") -> str:
    """``rows`` as an aligned text table (numbers right-aligned); ``empty`` if there are none."""
    cells = [[_fmt(get(r)) for _h, get in columns] for r in rows]
    if not cells:
        return empty
    heads = [h for h, _ in columns]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(heads)]
    numeric = [all(c[i].replace(",", "").replace(".", "").replace("-", "").isdigit() for c in cells)
               for i in range(len(heads))]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if n else v.ljust(w) for v, w, n in zip(values, widths, numeric, strict=True)).rstrip()

    return "\n".join([line(heads), line(["-" * w for w in widths]), *(line(c) for c in cells)])


def when(ms: int | float | None) -> str | None:
    """Epoch milliseconds as ``YYYY-MM-DD HH:MM:SS.mmm`` UTC."""
    if ms is None:
        return None
    ms = int(ms)
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ms / 1000)) + f".{ms % 1000:03d}"


def _in(at: float | None) -> float | None:
    return None if at is None else max(0.0, at - time.time())


_DETAIL_SKIP = {"at", "event"}


def trace_lines(trace: dict[str, Any]) -> str:
    """A trace (``GET /api/messages/{id}/trace``) as a timeline table."""
    def detail(e: dict[str, Any]) -> str:
        parts = []
        for k, v in e.items():
            if k in _DETAIL_SKIP or v is None or k == "group":
                continue
            if k in ("due", "deliver_at", "born"):
                v = when(v)
            parts.append(f"{k}={_fmt(v)}")
        return " ".join(parts)

    head = f"message {trace['msg_id']}  topic {trace['topic']}  keys {_fmt(trace.get('keys'))}"
    note = "" if trace.get("trace") else \
        "\n(delivery attempts are recorded with the broker's --trace flag: off on this broker)"
    rows = table(trace["events"], [("time (UTC)", lambda e: when(e["at"])), ("event", lambda e: e["event"]),
                                   ("group", lambda e: e.get("group")), ("detail", detail)])
    groups = trace.get("groups") or {}
    states = table([{"group": g, **st} for g, st in sorted(groups.items())],
                   [("group", lambda s: s["group"]), ("state", lambda s: s["state"]),
                    ("deliveries", lambda s: s.get("deliveries"))], "(no consumer group reads its topic)")
    return f"{head}\n\n{rows}{note}\n\nnow, per group:\n{states}"


_TOPICS: list[Column] = [("topic", lambda t: t["topic"]), ("queues", lambda t: len(t["queues"])),
                         ("messages", lambda t: t["messages"]), ("scheduled", lambda t: t.get("scheduled", 0)),
                         ("next due (UTC)", lambda t: when(t.get("next_due")))]
_GROUPS: list[Column] = [("group", lambda g: g["group"]), ("topics", lambda g: g["topics"]),
                         ("members", lambda g: g["members"]), ("delivered", lambda g: g["delivered"]),
                         ("acked", lambda g: g["acked"]), ("in flight", lambda g: g["in_flight"]),
                         ("retrying", lambda g: g["waiting_retry"]), ("dead", lambda g: g["dead_lettered"]),
                         ("lag", lambda g: g["lag"])]
_MESSAGES: list[Column] = [("msg_id", lambda m: m["msg_id"]), ("topic", lambda m: m["topic"]),
                           ("queue", lambda m: m.get("queue_id")), ("offset", lambda m: m.get("queue_offset")),
                           ("keys", lambda m: m.get("keys")), ("tags", lambda m: m.get("tags")),
                           ("stored (UTC)", lambda m: when(m.get("store_timestamp"))),
                           ("bytes", lambda m: m.get("body_size"))]
_TXS: list[Column] = [("msg_id", lambda t: t["msg_id"]), ("topic", lambda t: t["topic"]), ("keys", lambda t: t["keys"]),
                      ("producer group", lambda t: t["group"]), ("producer", lambda t: t.get("producer_id")),
                      ("state", lambda t: t["state"]), ("age s", lambda t: t["age"]), ("checks", lambda t: t["checks"]),
                      ("next check in s", lambda t: _in(t.get("next_check_at")))]
_CLIENTS: list[Column] = [("client id", lambda c: c["client_id"]), ("role", lambda c: c["role"]),
                          ("group", lambda c: c.get("group")), ("address", lambda c: c["address"]),
                          ("version", lambda c: c.get("version")), ("agent", lambda c: c.get("agent")),
                          ("topic", lambda c: c.get("topic")), ("since (UTC)", lambda c: when(c.get("since")))]


def _paged(out: dict[str, Any], name: str, columns: list[Column], empty: str) -> str:
    text = table(out[name], columns, empty)
    if out.get("next"):
        text += f"\n(more: --after {out['next']})"
    return text


def _message(m: dict[str, Any]) -> str:
    body = m["body"] if m.get("body") is not None else f"(binary, hex) {m.get('body_hex')}"
    lines = [table([m], _MESSAGES), "", f"body: {body[:200]}{'...' if len(body) > 200 else ''}"]
    if m.get("properties"):
        lines.append("properties: " + ", ".join(f"{k}={v}" for k, v in m["properties"].items()))
    if m.get("transaction"):
        lines.append(f"transaction: {m['transaction']['state']} after {m['transaction']['checks']} check-backs")
    if m.get("schedule"):
        lines.append(f"schedule: {m['schedule']['state']}, due {when(m['schedule']['deliver_at'])}")
    groups = m.get("groups") or {}
    lines += ["", table([{"group": g, **st} for g, st in sorted(groups.items())],
                        [("group", lambda s: s["group"]), ("state", lambda s: s["state"]),
                         ("deliveries", lambda s: s.get("deliveries"))], "(no consumer group reads its topic)")]
    return "\n".join(lines)


def _scheduled(out: dict[str, Any]) -> str:
    per = table([{"topic": t, "n": n} for t, n in sorted((out.get("topics") or {}).items())],
                [("topic", lambda r: r["topic"]), ("scheduled", lambda r: r["n"])], "(nothing scheduled)")
    nxt = table(out.get("next") or [], [("msg_id", lambda r: r["msg_id"]), ("topic", lambda r: r["topic"]),
                                        ("deliver at (UTC)", lambda r: when(r["deliver_at"]))], "(none)")
    return f"{per}\n\nnext due:\n{nxt}"


def _settings(s: dict[str, Any]) -> str:
    return table([s], [("group", lambda r: r["group"]), ("fifo", lambda r: r["fifo"]),
                       ("max attempts", lambda r: r.get("max_attempts") or "per subscription"),
                       ("retry delays s", lambda r: r.get("retry_delays") or "broker default")])


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="halfmq admin", description="Query the broker's admin HTTP API.")
    p.add_argument("--http", default="http://127.0.0.1:7601", help="admin API base URL (default http://127.0.0.1:7601)")
    p.add_argument("--json", action="store_true", help="print the API's JSON answer as it is (for scripts)")
    add_http_login_options(p)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("topics", help="topics, queues, message counts")
    ct = sub.add_parser("create-topic", help="create a topic (also with --no-auto-create-topics); "
                                             "one that exists is left as it is")
    ct.add_argument("topic")
    ct.add_argument("--queues", type=int, help="its queues, 1 to 1024 (default: the broker's --default-queues)")
    sub.add_parser("groups", help="consumer groups: delivered, acked, in flight, retrying, dead, lag")
    gm = sub.add_parser("members", help="a consumer group's members: client id, address, version, leases")
    gm.add_argument("group")
    sub.add_parser("clients", help="connected clients: client id, role, group, address, version")
    m = sub.add_parser("message", help="one message and its state in each group")
    m.add_argument("msg_id")
    tr = sub.add_parser("trace", help="the life of one message in order: stored, outcome, deliveries, retries, DLQ")
    tr.add_argument("msg_id")
    k = sub.add_parser("find", help="messages of a topic carrying a key")
    k.add_argument("topic")
    k.add_argument("key")
    rc = sub.add_parser("recall", help="cancel a scheduled message not yet due")
    rc.add_argument("msg_id")
    sc = sub.add_parser("scheduled", help="scheduled messages: per topic, and the next ones due")
    sc.add_argument("--topic", default=None)
    sc.add_argument("--limit", type=int, default=100, help="next messages listed, at most 1000 (default 100)")
    d = sub.add_parser("dlq", help="the dead letters of a consumer group")
    d.add_argument("group")
    r = sub.add_parser("resend", help="send a dead-lettered message back to its topic for a group")
    r.add_argument("group")
    r.add_argument("msg_id")
    t = sub.add_parser("transactions", help="half messages by state")
    t.add_argument("--state", default="prepared", choices=["prepared", "abandoned", "committed", "rolled_back"])
    gs = sub.add_parser("group-settings", help="show or change a consumer group's settings")
    gs.add_argument("group")
    gs.add_argument("--fifo", choices=["on", "off"], help="deliver each message group in order, one at a time")
    gs.add_argument("--max-attempts", type=int, help="deliveries before the dead-letter queue")
    gs.add_argument("--retry-delays", help="the group's retry delay ladder, e.g. 1s,10s,1m")
    for verb in ("commit", "rollback"):
        v = sub.add_parser(verb, help=f"{verb} a prepared transaction by hand")
        v.add_argument("msg_id")
    for lister in (sub.choices["topics"], sub.choices["groups"], k, t, d):
        lister.add_argument("--limit", type=int, default=100, help="entries per page, at most 1000 (default 100)")
        lister.add_argument("--after", help="the 'next' cursor of the previous page")
    return p


def admin_main(argv: list[str]) -> int:
    """``halfmq admin ...`` (see the module docstring)."""
    a = _parser().parse_args(argv)
    base = a.http.rstrip("/")

    def get(path: str, query: dict[str, Any] | None = None) -> Any:
        return http_call(a, "GET", base + path + ("?" + urlencode(query) if query else ""), prog="halfmq admin")

    def post(path: str, body: Any = None) -> Any:
        return http_call(a, "POST", base + path, body, prog="halfmq admin")

    paging = {"limit": getattr(a, "limit", 100), **({"after": a.after} if getattr(a, "after", None) else {})}
    mid = quote(getattr(a, "msg_id", "") or "", safe="")
    text: Callable[[Any], str]
    if a.cmd == "topics":
        out, text = get("/api/topics", paging), lambda o: _paged(o, "topics", _TOPICS, "(no topics yet)")
    elif a.cmd == "create-topic":
        out = post(f"/api/topics/{quote(a.topic, safe='')}", {} if a.queues is None else {"queues": a.queues})
        text = lambda o: (f"topic {o['topic']}: " + ("created" if o["created"] else "exists already")  # noqa: E731
                          + f", {o['queues']} queues")
    elif a.cmd == "groups":
        out, text = get("/api/groups", paging), lambda o: _paged(o, "groups", _GROUPS, "(no consumer groups yet)")
    elif a.cmd == "members":
        out = get(f"/api/groups/{quote(a.group, safe='')}/members")
        text = lambda o: table(o["members"], [  # noqa: E731
            ("member", lambda r: r["member"]), ("kind", lambda r: r["kind"]), ("client id", lambda r: r.get("client_id")),
            ("address", lambda r: r.get("address")), ("version", lambda r: r.get("version")),
            ("agent", lambda r: r.get("agent")), ("topic", lambda r: r["topic"]), ("tags", lambda r: r.get("tags")),
            ("leases", lambda r: r["leases"])], "(no members)")
    elif a.cmd == "clients":
        out, text = get("/api/clients"), lambda o: table(o["clients"], _CLIENTS, "(no clients connected)")
    elif a.cmd == "message":
        out, text = get(f"/api/messages/{mid}"), _message
    elif a.cmd == "trace":
        out, text = get(f"/api/messages/{mid}/trace"), trace_lines
    elif a.cmd == "find":
        out = get("/api/messages", {"topic": a.topic, "key": a.key, **paging})
        text = lambda o: _paged(o, "messages", _MESSAGES, "(no message carries that key)")  # noqa: E731
    elif a.cmd == "recall":
        out, text = post(f"/api/messages/{mid}/recall"), lambda o: f"{o['msg_id']}: {o['state']}"
    elif a.cmd == "scheduled":
        out = get("/api/scheduled", {"limit": a.limit, **({"topic": a.topic} if a.topic else {})})
        text = _scheduled
    elif a.cmd == "dlq":
        out = get(f"/api/dlq/{quote(a.group, safe='')}/messages", paging)
        text = lambda o: _paged(o, "messages", [  # noqa: E731
            *_MESSAGES[:2], ("keys", lambda m: m.get("keys")), ("tags", lambda m: m.get("tags")),
            ("dead since (UTC)", lambda m: when(m.get("dead_lettered_at")))], "(no dead letters)")
    elif a.cmd == "resend":
        out = post(f"/api/dlq/{quote(a.group, safe='')}/messages/{mid}/resend")
        text = lambda o: f"{o['resent']}: sent again to group {o['group']}"  # noqa: E731
    elif a.cmd == "group-settings":
        changes = {k: v for k, v in (("fifo", None if a.fifo is None else a.fifo == "on"),
                                     ("max_attempts", a.max_attempts), ("retry_delays", a.retry_delays))
                   if v is not None}
        path = f"/api/groups/{quote(a.group, safe='')}/settings"
        out, text = (post(path, changes) if changes else get(path)), _settings
    elif a.cmd == "transactions":
        out = get("/api/transactions", {"state": a.state, **paging})
        text = lambda o: _paged(o, "transactions", _TXS, f"(no {a.state} transactions)")  # noqa: E731
    else:
        out, text = post(f"/api/transactions/{mid}/{a.cmd}"), lambda o: f"{o['msg_id']}: {o['state']}"
    print(json.dumps(out, indent=2) if a.json else text(out))
    return 0
