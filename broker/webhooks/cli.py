"""``halfmq webhook ...``: define, list, inspect and remove webhooks through the admin API.

    halfmq webhook add NAME --topic T --url URL [--secret S] [--tags EXPR] [--max-attempts N]
                       [--timeout 5s] [--concurrency 8] [--start latest|earliest]
                       [--breaker-failures 5] [--breaker-cooldown 30s] [--fifo] [--http URL]
    halfmq webhook list | show NAME | remove NAME
    halfmq webhook rotate NAME [--secret S] [--overlap 24h]
    halfmq webhook delivery NAME MSG_ID      # whether and when that message was delivered
    halfmq webhook resend NAME MSG_ID        # a dead letter of the webhook, sent again

Each prints the API's JSON answer; an error prints the API's message and exits with 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import quote, urlencode

from protocol.names import WEBHOOK_GROUP_PREFIX

__all__ = ["webhook_main"]

DEFAULT_HTTP = "http://127.0.0.1:7601"


class _ApiError(Exception):
    pass


def _call(method: str, url: str, body: Any = None) -> Any:
    from broker.security.cli import env_login_headers

    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} if data is not None else {}
    req = urllib.request.Request(url, method=method, data=data, headers={**headers, **env_login_headers()})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        text = exc.read().decode("utf-8", "replace")
        try:
            text = json.loads(text).get("error", text)
        except (ValueError, AttributeError):
            pass
        raise _ApiError(f"HTTP {exc.code}: {text}") from None
    except urllib.error.URLError as exc:
        raise _ApiError(f"cannot reach {url}: {exc.reason}") from None


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--http", default=None, help=f"admin API base URL (default {DEFAULT_HTTP})")
    p = argparse.ArgumentParser(prog="halfmq webhook",
                                description="POST every message of a topic to an HTTP endpoint, signed, with retries.")
    sub = p.add_subparsers(dest="cmd", required=True)
    add = sub.add_parser("add", parents=[common], help="define a webhook and start it")
    add.add_argument("name")
    add.add_argument("--topic", required=True)
    add.add_argument("--url", required=True, help="http:// or https:// URL that receives the POSTs")
    add.add_argument("--secret", help="signing secret, 16+ characters (default: generated and printed once)")
    add.add_argument("--tags", help="tag expression, e.g. 'A || B' (default: every message)")
    add.add_argument("--max-attempts", type=int, help="attempts before the DLQ (default 17)")
    add.add_argument("--timeout", help="per request (default 5s; shorter than the broker's --ack-timeout)")
    add.add_argument("--concurrency", type=int, help="requests under way at once (default 8)")
    add.add_argument("--start", choices=["latest", "earliest"], help="new messages only (default) or the retained backlog too")
    add.add_argument("--breaker-failures", type=int, help="consecutive failures that open the circuit breaker (default 5)")
    add.add_argument("--breaker-cooldown", help="how long an open breaker makes no request (default 30s)")
    add.add_argument("--fifo", action="store_true", default=None,
                     help="deliver each message group in order, one message at a time")
    sub.add_parser("list", parents=[common], help="every webhook with its state")
    for verb, what in (("show", "one webhook with its state"), ("remove", "stop and delete a webhook")):
        sub.add_parser(verb, parents=[common], help=what).add_argument("name")
    rot = sub.add_parser("rotate", parents=[common], help="sign with a new secret; the old one signs for --overlap")
    rot.add_argument("name")
    rot.add_argument("--secret", help="the new secret (default: generated and printed once)")
    rot.add_argument("--overlap", default="24h", help="how long the old secret keeps signing (default 24h)")
    for verb, what in (("delivery", "whether and when a message was delivered"),
                       ("resend", "send a dead-lettered message of the webhook again")):
        v = sub.add_parser(verb, parents=[common], help=what)
        v.add_argument("name")
        v.add_argument("msg_id")
    return p


def webhook_main(argv: list[str]) -> int:
    """Run ``halfmq webhook ARGS``; returns the exit status."""
    a = _parser().parse_args(argv)
    base = (a.http or DEFAULT_HTTP).rstrip("/")
    api = f"{base}/api/webhooks"
    try:
        if a.cmd == "add":
            fields = {"name": a.name, "topic": a.topic, "url": a.url, "secret": a.secret, "tags": a.tags,
                      "max_attempts": a.max_attempts, "timeout": a.timeout, "concurrency": a.concurrency,
                      "start": a.start, "breaker_failures": a.breaker_failures,
                      "breaker_cooldown": a.breaker_cooldown, "fifo": a.fifo}
            out = _call("POST", api, {k: v for k, v in fields.items() if v is not None})
        elif a.cmd == "list":
            out = _call("GET", f"{api}?" + urlencode({"limit": 1000}))
        elif a.cmd == "show":
            out = _call("GET", f"{api}/{quote(a.name, safe='')}")
        elif a.cmd == "remove":
            out = _call("DELETE", f"{api}/{quote(a.name, safe='')}")
        elif a.cmd == "rotate":
            body = {"overlap": a.overlap, **({"secret": a.secret} if a.secret else {})}
            out = _call("POST", f"{api}/{quote(a.name, safe='')}/rotate", body)
        elif a.cmd == "delivery":
            out = _call("GET", f"{api}/{quote(a.name, safe='')}/messages/{quote(a.msg_id, safe='')}")
        else:
            group = quote(WEBHOOK_GROUP_PREFIX + a.name, safe=":")
            out = _call("POST", f"{base}/api/dlq/{group}/messages/{quote(a.msg_id, safe='')}/resend", {})
    except _ApiError as exc:
        print(f"halfmq webhook {a.cmd}: {exc}", file=sys.stderr)
        return 1
    if isinstance(out, dict) and "secret" in out:
        print("the signing secret is shown this once: keep it for the receiver", file=sys.stderr)
    print(json.dumps(out, indent=2))
    return 0
