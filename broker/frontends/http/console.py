"""The console: one HTML page on the admin HTTP port (``GET /``) for a person to look at.

How this works
--------------
The page is rendered on the server from the same data the JSON routes return (topics with
their scheduled messages, groups, prepared and abandoned transactions), every value
escaped, no JavaScript; it reloads itself every few seconds. It only shows: acting on a
message (resend from a DLQ, recall a scheduled one, commit or roll back a transaction)
stays with the JSON API and ``halfmq admin``.
Abandoned transactions are listed on purpose — RocketMQ's dashboard cannot show them.
"""

from __future__ import annotations

import html
import time
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["render_console", "REFRESH_SECONDS"]

#: The page reloads itself this often.
REFRESH_SECONDS = 5

_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.3em; } h2 { font-size: 1.1em; margin-top: 1.6em; }
table { border-collapse: collapse; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
.empty { color: #777; } .warn { color: #a40; }
"""


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return f"<td>{'yes' if value else 'no'}</td>"
    if isinstance(value, int | float):
        text = f"{value:,}" if isinstance(value, int) else f"{value:,.1f}"
        return f'<td class="n">{text}</td>'
    if isinstance(value, list | tuple):
        value = ", ".join(str(v) for v in value)
    return f"<td>{html.escape('' if value is None else str(value))}</td>"


def _table(headers: Iterable[str], rows: Iterable[Iterable[Any]], empty: str) -> str:
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows)
    if not body:
        return f'<p class="empty">{html.escape(empty)}</p>'
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    return f"<table><tr>{head}</tr>{body}</table>"


def _due_in(due_ms: int | None, now: float) -> float | None:
    """Seconds from ``now`` until a delivery time in epoch ms (None: nothing scheduled)."""
    return None if due_ms is None else max(0.0, due_ms / 1000.0 - now)


def render_console(
    *,
    broker_id: str,
    data_dir: str,
    topics: list[Mapping[str, Any]],
    groups: list[Mapping[str, Any]],
    prepared: list[Mapping[str, Any]],
    abandoned: list[Mapping[str, Any]],
    now: float | None = None,
) -> str:
    """The console page for the given data (as the JSON routes return it)."""
    now = time.time() if now is None else now
    topic_rows = [(t["topic"], len(t["queues"]), t["messages"], t.get("scheduled", 0),
                   _due_in(t.get("next_due"), now)) for t in topics]
    group_rows = [
        (g["group"], g["topics"], g["members"], g["delivered"], g["acked"], g["in_flight"],
         g["waiting_retry"], g["dead_lettered"], g["lag"])
        for g in groups
    ]
    prepared_rows = [
        (t["msg_id"], t["topic"], t["keys"], t["group"], t["age"], t["checks"],
         None if t["next_check_at"] is None else max(0.0, t["next_check_at"] - now))
        for t in prepared
    ]
    abandoned_rows = [(t["msg_id"], t["topic"], t["keys"], t["group"], t["age"], t["checks"]) for t in abandoned]
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(now))
    parts = [
        "<!doctype html><html><head><meta charset=\"utf-8\">",
        f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">',
        f"<title>halfmq {html.escape(broker_id)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>halfmq broker {html.escape(broker_id)}</h1>",
        f"<p>data {html.escape(data_dir)} · {stamp} · reloads every {REFRESH_SECONDS} s · "
        'JSON: <a href="/api/topics">topics</a>, <a href="/api/scheduled">scheduled</a>, '
        '<a href="/api/groups">groups</a>, '
        '<a href="/api/transactions?state=prepared">transactions</a></p>',
        f"<h2>Topics ({len(topic_rows)})</h2>",
        _table(("topic", "queues", "messages", "scheduled", "next due in s"), topic_rows, "no topics yet"),
        f"<h2>Consumer groups ({len(group_rows)})</h2>",
        _table(("group", "topics", "members", "delivered", "acked", "in flight", "waiting retry",
                "dead-lettered", "lag"), group_rows, "no consumer groups yet"),
        f"<h2>Prepared transactions ({len(prepared_rows)})</h2>",
        _table(("msg_id", "topic", "keys", "producer group", "age s", "checks", "next check in s"),
               prepared_rows, "none: every half message has its outcome"),
        f'<h2 class="warn">Abandoned transactions ({len(abandoned_rows)})</h2>',
        "<p>Never delivered: no producer answered the check-backs. Resolve one by hand with "
        "<code>halfmq admin commit ID</code> or <code>halfmq admin rollback ID</code>.</p>"
        if abandoned_rows else "",
        _table(("msg_id", "topic", "keys", "producer group", "age s", "checks"), abandoned_rows, "none"),
        "</body></html>",
    ]
    return "".join(parts)
