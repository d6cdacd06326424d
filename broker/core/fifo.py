"""FIFO order for a consumer group: one message at a time per message group, in queue order.

How this works
--------------
A producer sends the messages of one *message group* to one queue, in order (the group
name is hashed to pick the queue). A FIFO consumer group then delivers them one at a time:
the next only once the previous is acked or dead-lettered. :class:`FifoOrder` keeps, per
message group that has a message out, what holds it (``blocked``), and the later messages
of that group met meanwhile while reading the queue (``parked``, in queue order). When
the holder is done, the first parked message moves to ``ready``, which the delivery core
serves before reading further. Messages of *other* groups go on in parallel, to any member.

A failing message keeps its group blocked while it waits in the retry queue (its delay
ladder applies as usual), so nothing overtakes it; its retry delivery takes over the
hold. Parked messages stay "in flight" for their queue's cursor, so the committed offset
never passes them, and the core reads at most ``LOOKAHEAD`` entries past a queue's
committed offset: memory stays bounded however long a group is held.

After a restart nothing here is restored from disk: the cursor starts again at the
committed offset, acked entries are skipped (durable acks), and a message with a retry
record still pending blocks its group again (``block``) before anything is read.
Messages without a group are not ordered.
"""

from __future__ import annotations

from collections import deque

__all__ = ["FifoOrder", "LOOKAHEAD", "RETRY_HOLD"]

#: Entries a FIFO group reads past a queue's committed offset at most.
LOOKAHEAD = 2048
#: What holds a message group whose message waits in the retry queue.
RETRY_HOLD = -1


class FifoOrder:
    """Which message groups are held, and the messages waiting behind them."""

    __slots__ = ("blocked", "parked", "ready")

    def __init__(self) -> None:
        self.blocked: dict[str, int] = {}  # message group -> lease token, or RETRY_HOLD
        self.parked: dict[str, deque[tuple[tuple[str, int], int]]] = {}
        self.ready: deque[tuple[tuple[str, int], int, str]] = deque()  # (qkey, offset, group) to deliver next

    def is_blocked(self, mgroup: str) -> bool:
        """Whether a message of ``mgroup`` is out (leased, or waiting for its retry)."""
        return mgroup in self.blocked

    def park(self, mgroup: str, qkey: tuple[str, int], offset: int) -> None:
        """A message of a blocked group, met while reading: it waits its turn."""
        self.parked.setdefault(mgroup, deque()).append((qkey, offset))

    def hold(self, mgroup: str, token: int) -> None:
        """A message of ``mgroup`` was leased (lease ``token``)."""
        self.blocked[mgroup] = token

    def block(self, mgroup: str) -> None:
        """A message of ``mgroup`` waits in the retry queue: hold the group."""
        self.blocked[mgroup] = RETRY_HOLD

    def done(self, mgroup: str) -> None:
        """The message holding ``mgroup`` is finished (acked or dead-lettered): the next
        parked one, if any, is ready."""
        self.blocked.pop(mgroup, None)
        waiting = self.parked.get(mgroup)
        if waiting:
            qkey, offset = waiting.popleft()
            self.ready.append((qkey, offset, mgroup))
            self.blocked[mgroup] = RETRY_HOLD  # held until the ready one is leased
            if not waiting:
                del self.parked[mgroup]

    def parked_count(self) -> int:
        """Messages waiting behind a held group."""
        return sum(len(q) for q in self.parked.values()) + len(self.ready)
