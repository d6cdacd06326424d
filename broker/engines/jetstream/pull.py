"""Pulling from a durable consumer: one inbox, at most one open pull request, no task.

How this works
--------------
A ``Puller`` subscribes one inbox. ``fetch(batch, timeout)`` returns what the inbox has
already buffered; if nothing, it sends one pull request (``$JS.API.CONSUMER.MSG.NEXT``,
``{"batch": n, "expires": timeout}``) unless one is still open, and waits — on a plain
future and a timer, no task — until a message arrives, the request ends (status 404 /
408 / 409) or the timeout passes. The engine may deliver the rest of an open request
later: those messages wait in the buffer for the next ``fetch``, never dropped (each is
a lease already counting down). Only one request is open at a time, so what is leased
to a puller is bounded by the batch it asked for.

Status 503 (the consumer has no leader: a failover, or a consumer just created while a
node is down) ends the request too; ``fetch`` then waits a little before returning
nothing, so a caller's loop does not spin.

Each request has its own reply subject (``<inbox>.<n>``) and a status ends only the
request it answers: the end of an earlier one that comes late (a no-wait pull's 408 after
this side's timer already gave up on it) must not end the long poll sent after it.
Messages go to the buffer whichever request brought them.

Why not nats-py's ``fetch``: it runs a task per wait and nested ``wait_for`` calls; a
cancelled fetch was seen to stay blocked past its timeout under uvloop, which would hang
a gateway's graceful stop.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from typing import Any

from nats.aio.msg import Msg

__all__ = ["Puller"]

_DONE_STATUSES = frozenset({"404", "408", "409"})


class Puller:
    """Pulls messages of ``consumer`` on ``stream`` over connection ``nc``."""

    def __init__(self, nc: Any, stream: str, consumer: str) -> None:
        self._nc = nc
        self._next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self._inbox = nc.new_inbox()
        self._requests = 0
        self._reply = ""  # the reply subject of the latest request
        self._sub: Any = None
        self._buffer: deque[Msg] = deque()
        self._open_left = 0  # messages the open request may still bring
        self._open_until = 0.0
        self._waiter: asyncio.Future[None] | None = None
        self._no_leader = False

    async def open(self) -> Puller:
        """Subscribe the inbox; returns self."""
        self._sub = await self._nc.subscribe(self._inbox + ".*", cb=self._on_msg,
                                             pending_msgs_limit=1_000_000,
                                             pending_bytes_limit=1024 * 1024 * 1024)
        return self

    @property
    def buffered(self) -> int:
        """Messages received and not yet returned by ``fetch``."""
        return len(self._buffer)

    async def _on_msg(self, msg: Msg) -> None:
        status = (msg.headers or {}).get("Status") if not msg.data else None
        if status is None:
            self._buffer.append(msg)
            self._open_left = max(0, self._open_left - 1)
        elif msg.subject != self._reply:
            return  # the end of an earlier request
        elif status in _DONE_STATUSES:
            self._open_left = 0
        elif status == "503":
            self._open_left = 0
            self._no_leader = True
        else:
            return  # 100: heartbeat / flow control
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def _wait(self) -> None:
        """Until a message or a status arrives, or the open request's time is over."""
        loop = asyncio.get_running_loop()
        self._waiter = loop.create_future()
        timer = loop.call_later(max(0.0, self._open_until - time.monotonic()), self._wake)
        try:
            await self._waiter
        finally:
            timer.cancel()
            self._waiter = None

    async def _send(self, request: dict[str, Any]) -> None:
        self._requests += 1
        self._reply = f"{self._inbox}.{self._requests}"
        await self._nc.publish(self._next_subject, json.dumps(request).encode(), reply=self._reply)

    async def fetch(self, batch: int, timeout: float) -> list[Msg]:
        """Up to ``batch`` messages; waits at most ``timeout`` seconds when none is buffered."""
        if not self._buffer:
            now = time.monotonic()
            if self._open_left <= 0 or now >= self._open_until:
                self._no_leader = False
                self._open_left = batch
                self._open_until = now + timeout
                request = {"batch": batch, "expires": max(1_000_000, int(timeout * 1e9) - 50_000_000)}
                await self._send(request)
            await self._wait()
            if not self._buffer and self._no_leader:
                await asyncio.sleep(min(timeout, 0.25))
        out: list[Msg] = []
        while self._buffer and len(out) < batch:
            out.append(self._buffer.popleft())
        return out

    @property
    def request_open(self) -> bool:
        """Whether a pull request may still bring messages."""
        return self._open_left > 0 and time.monotonic() < self._open_until

    async def fetch_now(self, batch: int, timeout: float = 2.0) -> list[Msg]:
        """Up to ``batch`` messages the consumer has now: a no-wait pull request, waited for
        until it ends (all its messages are in, none can arrive later) or ``timeout``. The
        engine ends it itself by then (a consumer at its ``max_ack_pending`` does not answer
        a no-wait request: it holds it until it expires)."""
        if len(self._buffer) < batch and not self.request_open:
            self._no_leader = False
            self._open_left = batch - len(self._buffer)
            self._open_until = time.monotonic() + timeout
            request = {"batch": self._open_left, "no_wait": True,
                       "expires": max(1_000_000, int(timeout * 1e9) - 10_000_000)}
            await self._send(request)
            while self.request_open:
                await self._wait()
        out: list[Msg] = []
        while self._buffer and len(out) < batch:
            out.append(self._buffer.popleft())
        return out

    async def close(self) -> None:
        """Unsubscribe (messages still buffered go back to the engine after their ack wait)."""
        self._wake()
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None
