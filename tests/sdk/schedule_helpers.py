"""Helpers for the scheduled-message tests: arrival times and the admin API."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any

from consumer_sdk import ConsumeResult, Message


class Arrivals:
    """A consumer listener recording each delivery with the wall-clock ms it arrived."""

    def __init__(self) -> None:
        self.messages: list[tuple[int, Message]] = []

    async def __call__(self, message: Message) -> ConsumeResult:
        self.messages.append((int(time.time() * 1000), message))
        return ConsumeResult.SUCCESS

    def ids(self) -> list[str]:
        return [m.msg_id for _, m in self.messages]

    def lateness_ms(self) -> list[int]:
        """Arrival minus due time of every scheduled message received."""
        return [at - m.deliver_at for at, m in self.messages if m.deliver_at is not None]


def admin(http_url: str, path: str, method: str = "GET") -> tuple[int, Any]:
    """Call an admin API route; return (HTTP status, JSON body)."""
    req = urllib.request.Request(f"{http_url}{path}", method=method, data=b"" if method == "POST" else None,
                                 headers={"X-HalfMQ-Request": "test"})  # cross-site safety of POSTs
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def topic_view(http_url: str, topic: str) -> dict[str, Any]:
    """The ``/api/topics`` entry of ``topic`` (``{}`` if it does not exist)."""
    _, body = admin(http_url, "/api/topics?limit=1000")
    return next((t for t in body["topics"] if t["topic"] == topic), {})


def console_page(http_url: str) -> str:
    """The console's HTML."""
    with urllib.request.urlopen(f"{http_url}/", timeout=10) as resp:
        return resp.read().decode()  # type: ignore[no-any-return]
