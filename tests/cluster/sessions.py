"""An in-memory ``Session`` (broker.engines.base) that records what an engine sends it."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from typing import Any

_ids = itertools.count(1)


class RecordingSession:
    """A real object implementing the Session protocol: replies, errors, deliveries and
    check-back requests are recorded; ``check_answer(wire)`` answers CHECKs (a state, or
    None to never answer)."""

    def __init__(self, *, client_id: str | None = None, role: str | None = None,
                 group: str | None = None,
                 check_answer: Callable[[list[Any]], str | None] | None = None) -> None:
        self.conn_id = f"c{next(_ids)}"
        self.client_id = client_id or f"cli-{self.conn_id}"
        self.role = role
        self.group = group
        self.peer = "127.0.0.1:1"
        self.closed = False
        self.paused = False
        self.replies: dict[int, Any] = {}
        self.errors: dict[int, Exception] = {}
        self.deliveries: list[list[Any]] = []
        self.checks: list[list[Any]] = []
        self.check_answer = check_answer
        self.flushes = 0
        self._rid = itertools.count(1)

    def rid(self) -> int:
        """A fresh request id."""
        return next(self._rid)

    @property
    def writable(self) -> bool:
        return not self.paused and not self.closed

    def output_room(self) -> int:
        return 0 if self.paused or self.closed else 1 << 20

    def reply(self, rid: int, payload: Any) -> None:
        assert not self.closed, "reply to a closed session"
        if rid:
            assert rid not in self.replies and rid not in self.errors, f"rid {rid} answered twice"
            self.replies[rid] = payload

    def error(self, rid: int, exc: Exception) -> None:
        assert not self.closed, "error to a closed session"
        if rid:
            assert rid not in self.replies and rid not in self.errors, f"rid {rid} answered twice"
            self.errors[rid] = exc

    def deliver(self, items: list[list[Any]]) -> None:
        assert not self.closed and self.writable, "delivery to a session that cannot take it"
        self.deliveries.extend(items)

    def request(self, op: int, payload: Any) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.checks.append(payload["m"])
        state = self.check_answer(payload["m"]) if self.check_answer else None
        if state is not None:
            fut.set_result({"state": state})
        return fut

    def flush(self) -> None:
        self.flushes += 1

    def answered(self, rid: int) -> bool:
        return rid in self.replies or rid in self.errors


class Sub:
    """A ``Subscription`` (broker.engines.base)."""

    def __init__(self, group: str, topic: str, *, tags: str | None = "*", start: str = "earliest",
                 prefetch: int = 64, max_reconsume_times: int = 16) -> None:
        self.group, self.topic, self.tags, self.start = group, topic, tags, start
        self.prefetch, self.max_reconsume_times = prefetch, max_reconsume_times
