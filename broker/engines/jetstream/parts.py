"""What the parts of ``JetStreamEngine`` share: its attributes and the task tracker.

``JetStreamEngine`` is assembled from mixins, one file each (``delivering``, ``txcheck``,
``admin``); they all derive from ``EngineParts`` so each knows, by type, what the others
set up in ``JetStreamEngine.__init__``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from broker.config import BrokerConfig
    from broker.engines.jetstream.checkback import CheckRouter
    from broker.engines.jetstream.client import EngineClient
    from broker.engines.jetstream.delivering import _Pump
    from broker.engines.jetstream.groups import Groups
    from broker.engines.jetstream.ledger import TxLedger
    from broker.engines.jetstream.streams import StreamSet

__all__ = ["EngineParts"]

log = logging.getLogger("halfmq.engine")


class EngineParts:
    """Attributes set by ``JetStreamEngine.__init__`` and the task tracker used by all parts."""

    config: BrokerConfig
    client: EngineClient
    streams: StreamSet
    ledger: TxLedger
    groups_api: Groups
    router: CheckRouter
    stats: dict[str, int]
    send_deadline: float
    _stopping: bool
    _tasks: set[asyncio.Task[Any]]
    _loops: list[asyncio.Task[Any]]
    _pumps: dict[tuple[str, str], _Pump]

    def _track(self, coro: Any, what: str) -> asyncio.Task[Any]:
        """Run ``coro`` as a task that ``stop`` waits for; a failure is logged."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.error("%s failed: %r", what, t.exception())

        task.add_done_callback(done)
        return task
