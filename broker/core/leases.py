"""Leases: one message handed to a consumer until it is acked, fails, or its time runs out.

How this works
--------------
A :class:`Delivery` is one lease. Each has its own deadline: a push consumer's is
``--ack-timeout`` after the delivery, a pulled message's is the *invisible duration* its
receiver asked for, and ``change_deadline`` moves it (a pull consumer extending its work,
or a ``nack`` that asks for redelivery later). :class:`LeaseTable` holds the live leases by
token and a heap of ``(deadline, token, version)``; a changed or finished lease leaves a
stale heap entry behind that ``expired`` skips, so every operation is O(log n) and the
table holds only live leases, never finished ones.

A lease's *receipt handle* (``handle``) names it from any connection of the group:
``<boot>.<token>.<version>``. ``boot`` changes at every broker start (leases are not kept
across a restart: the message is simply delivered again) and ``version`` at every
deadline change, so a handle goes stale when its lease ends, expires or changes, and a
stale one is refused rather than acting on the wrong lease. ``renew`` is the one deadline
change that keeps the handle: a broker extending the lease of a push consumer that is
still alive (the consumer holds that handle and acks with it later).

``boot`` is the table's creation time (epoch milliseconds, hex) followed by 8 random hex
digits, so that a refused handle can be told apart: one of an earlier run (its time is
before this table's: the broker restarted, "stale receipt handle") from one this broker
never issued ("unknown receipt handle": malformed, a time at or after this table's that
is not its own, or a version its lease never had). Handles of versions before this
scheme have an 8-digit ``boot`` with no time; they can only come from an earlier run.
"""

from __future__ import annotations

import heapq
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

from broker.core.lifecycle import DeliveryState
from protocol.names import shown

__all__ = ["Delivery", "LeaseTable", "StaleHandleError"]

#: Hex digits of randomness at the end of a table's ``boot`` (also the whole ``boot`` of
#: the handles of earlier versions, which had no time in it).
_BOOT_RANDOM = 8
_HEX = frozenset("0123456789abcdef")


def _number(text: str) -> bool:
    """True for the decimal digits of a token or version (ASCII, at most 19 of them)."""
    return text.isdigit() and text.isascii() and len(text) <= 19


class StaleHandleError(ValueError):
    """A receipt handle whose lease has ended, expired or changed, or that this broker
    never issued (malformed, or of an unknown ``boot``): the message says which."""


@dataclass(slots=True)
class Delivery:
    """One lease: a message handed to a member, until ack, failure or expiry."""

    token: int
    member: str
    qkey: tuple[str, int]
    offset: int
    msg_pos: int
    msg_id: str
    topic: str
    origin_queue: int
    origin_offset: int
    reconsume_times: int
    deadline: float
    tags: str | None
    state: DeliveryState = DeliveryState.LEASED
    version: int = 0
    mgroup: str | None = None  # FIFO: the message group it holds


class LeaseTable:
    """Live leases by token, with their deadlines in a heap (see the module docstring)."""

    __slots__ = ("boot", "created_ms", "by_token", "heap")

    def __init__(self) -> None:
        self.created_ms = int(time.time() * 1000)
        self.boot = f"{self.created_ms:x}{os.urandom(_BOOT_RANDOM // 2).hex()}"
        #: the live leases by token; the delivery core makes and ends leases inline on its
        #: hot paths, with the same steps as ``add`` and ``pop``
        self.by_token: dict[int, Delivery] = {}
        #: ``(deadline, token, version)`` of every lease, stale ones included (a min-heap)
        self.heap: list[tuple[float, int, int]] = []

    def __len__(self) -> int:
        return len(self.by_token)

    def __contains__(self, token: object) -> bool:
        return token in self.by_token

    def get(self, token: int) -> Delivery | None:
        """The live lease ``token``, or None."""
        return self.by_token.get(token)

    def values(self) -> Iterator[Delivery]:
        """Every live lease."""
        return iter(self.by_token.values())

    def add(self, d: Delivery) -> None:
        """A new lease."""
        self.by_token[d.token] = d
        heapq.heappush(self.heap, (d.deadline, d.token, d.version))

    def pop(self, token: int) -> Delivery | None:
        """End the lease ``token`` (its heap entry goes stale)."""
        return self.by_token.pop(token, None)

    def change_deadline(self, d: Delivery, deadline: float) -> None:
        """Move a live lease's deadline; its old receipt handle goes stale."""
        d.deadline = deadline
        d.version += 1
        heapq.heappush(self.heap, (deadline, d.token, d.version))

    def renew(self, d: Delivery, deadline: float) -> None:
        """Move a live lease's deadline keeping its receipt handle (its version)."""
        d.deadline = deadline
        heapq.heappush(self.heap, (deadline, d.token, d.version))

    def expired(self, now: float) -> Iterator[Delivery]:
        """Pop and yield every live lease whose deadline is ``now`` or earlier."""
        heap = self.heap
        by_token = self.by_token
        while heap and heap[0][0] <= now:
            deadline, token, version = heapq.heappop(heap)
            d = by_token.get(token)
            if d is not None and d.version == version and d.deadline == deadline:
                del by_token[token]
                yield d
        if len(heap) > 64 and len(heap) > 4 * len(by_token):  # mostly stale: rebuild
            self.heap = [(d.deadline, d.token, d.version) for d in by_token.values()]
            heapq.heapify(self.heap)

    def next_deadline(self) -> float | None:
        """The earliest live deadline, or None."""
        heap = self.heap
        while heap:
            deadline, token, version = heap[0]
            d = self.by_token.get(token)
            if d is not None and d.version == version and d.deadline == deadline:
                return deadline
            heapq.heappop(heap)
        return None

    def handle(self, d: Delivery) -> str:
        """The receipt handle of a live lease."""
        return f"{self.boot}.{d.token}.{d.version}"

    def by_handle(self, handle: object) -> Delivery:
        """The live lease a receipt handle names; ``StaleHandleError`` if there is none,
        saying whether the handle is stale or was never issued (see the module docstring)."""
        if not isinstance(handle, str):
            raise StaleHandleError(f"unknown receipt handle {shown(handle)}: a receipt handle is a string")
        parts = handle.split(".", 3)
        if len(parts) != 3 or not _number(parts[1]) or not _number(parts[2]):
            raise StaleHandleError(f"unknown receipt handle {shown(handle)}: not one this broker issues "
                                   "(<boot>.<token>.<version>)")
        if parts[0] != self.boot:
            raise StaleHandleError(self._foreign(handle, parts[0]))
        d = self.by_token.get(int(parts[1]))
        if d is None:
            raise StaleHandleError("stale receipt handle: its lease was acked, failed or expired")
        version = int(parts[2])
        if d.version != version:
            if version > d.version:
                raise StaleHandleError(f"unknown receipt handle {shown(handle)}: its lease never had "
                                       f"version {version}")
            raise StaleHandleError("stale receipt handle: its lease was changed (use the newer handle)")
        return d

    def _foreign(self, handle: str, boot: str) -> str:
        """Why a well-formed handle of another ``boot`` is refused: an earlier run of the
        broker issued it, or nobody did."""
        if len(boot) < _BOOT_RANDOM or not _HEX.issuperset(boot):
            return f"unknown receipt handle {shown(handle)}: not one this broker issues (<boot>.<token>.<version>)"
        if len(boot) > _BOOT_RANDOM and int(boot[:-_BOOT_RANDOM], 16) >= self.created_ms:
            # not this table's, yet made after it started: no earlier run made it
            return f"unknown receipt handle {shown(handle)}: never issued by this broker for this group"
        # made before this table (or by a version whose handles have no time): an earlier run
        return "stale receipt handle: the broker restarted since it was issued (the message is delivered again)"
