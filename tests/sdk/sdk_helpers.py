"""Helpers for the SDK tests: a recording consumer listener and small polling utilities."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

from consumer_sdk import ConsumeResult, Message


class Recorder:
    """An async consumer listener that records every delivery and returns ``decide(message)``.

    ``in_flight`` / ``max_in_flight`` count concurrent calls; ``gate`` (when set) makes each
    call wait until it is released. ``finished`` counts calls that ended, ``returned`` only
    those that returned a result (not cancelled, not raised); ``events`` records each return
    as ``("returned", msg_id)``, and a test may append its own events to order them.
    """

    def __init__(self, decide: Callable[[Message], ConsumeResult] | None = None,
                 gate: asyncio.Event | None = None) -> None:
        self.messages: list[Message] = []
        self.decide = decide or (lambda m: ConsumeResult.SUCCESS)
        self.gate = gate
        self.in_flight = 0
        self.max_in_flight = 0
        self.finished = 0
        self.returned = 0
        self.events: list[tuple[str, str]] = []

    async def __call__(self, message: Message) -> ConsumeResult:
        self.messages.append(message)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.gate is not None:
                await self.gate.wait()
            result = self.decide(message)
            self.returned += 1
            self.events.append(("returned", message.msg_id))
            return result
        finally:
            self.in_flight -= 1
            self.finished += 1

    def bodies(self) -> list[bytes]:
        return [m.body for m in self.messages]

    def ids(self) -> set[str]:
        return {m.msg_id for m in self.messages}


class ThreadRecorder:
    """A plain-``def`` listener recording the thread it ran on."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.messages: list[Message] = []
        self.threads: set[int] = set()

    def __call__(self, message: Message) -> ConsumeResult:
        with self.lock:
            self.messages.append(message)
            self.threads.add(threading.get_ident())
        return ConsumeResult.SUCCESS
