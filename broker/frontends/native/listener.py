"""The native protocol's listening socket and the set of its client connections.

How this works
--------------
``NativeListener.start`` listens on ``--host``/``--port`` (uvloop when installed) and makes
one :class:`ClientConnection` per accepted client; each gets a broker-unique ``conn_id``
and is announced to the engine (``session_opened``) and withdrawn when it closes
(``session_closed``). ``stop`` stops accepting; ``close_all`` closes every connection
(after the engine has answered what it could).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from broker.frontends.native.connection import ClientConnection
from protocol import FRAME_OVERHEAD

if TYPE_CHECKING:
    from broker.config import BrokerConfig
    from broker.engines.base import Engine

__all__ = ["NativeListener"]

log = logging.getLogger("halfmq.broker")


class NativeListener:
    """Accepts native-protocol clients for one engine."""

    def __init__(self, engine: Engine, config: BrokerConfig) -> None:
        self.engine = engine
        self.config = config
        self.max_frame_size = config.max_message_size + FRAME_OVERHEAD
        self.connections: set[ClientConnection] = set()
        self.valid_topics: set[str] = set()  # topic names already checked (bounded)
        self.accepted = 0
        self.port = 0
        self._seq = 0
        self._server: asyncio.AbstractServer | None = None
        self._stopping = False

    async def start(self) -> int:
        """Listen; return the bound port."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: ClientConnection(self), self.config.host, self.config.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    def stop(self) -> None:
        """Accept no new connections."""
        self._stopping = True
        if self._server is not None:
            self._server.close()

    def close_all(self) -> None:
        """Close every client connection (their queued frames are written first)."""
        for c in list(self.connections):
            c.close()

    def opened(self, conn: ClientConnection) -> None:
        """A client connected."""
        if self._stopping:
            conn.close()
            return
        self._seq += 1
        conn.conn_id = f"c{self._seq}"
        self.connections.add(conn)
        self.accepted += 1
        self.engine.session_opened(conn)

    def closed(self, conn: ClientConnection) -> None:
        """A client's connection is gone."""
        if conn in self.connections:
            self.connections.discard(conn)
            self.engine.session_closed(conn)
