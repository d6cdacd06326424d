"""The native protocol's listening socket and the set of its client connections.

How this works
--------------
``NativeListener.start`` listens on ``--host``/``--port`` (uvloop when installed) and makes
one :class:`ClientConnection` per accepted client; each gets a broker-unique ``conn_id``
and is announced to the engine (``session_opened``) and withdrawn when it closes
(``session_closed``). ``stop`` stops accepting; ``close_all`` closes every connection
(after the engine has answered what it could).

Descriptors: at start the soft ``RLIMIT_NOFILE`` is raised to the hard limit, and
``--max-connections`` is lowered (with a WARNING) if the limit could not hold that many
connections plus the descriptors kept for the broker's own files: ``FD_RESERVE`` (log
segments, metadata, listening sockets) plus ``--max-open-indexes`` (the store's cache of
open queue index files, whatever the number of queues) plus ``--max-http-connections``
(the admin HTTP port's): clients can never starve the broker of descriptors. A client past
the limit gets an ERROR frame (``LimitExceededError``) and is disconnected. With TLS a
connection counts from its accept, its TLS handshake included (``broker.frontends.admission``:
one past the limit is closed at once, a handshake not done within 10 s is dropped).

Memory: each connection counts the weight of its SENDs not yet stored against
``--max-inflight-bytes``; the listener sums them over all connections (``inflight_bytes``)
against ``--max-inflight-total``. A connection that sends past the total is not read
(``hold``) until the sum falls to half of it (``release_held``, from any connection's
answered SEND or a closed connection's SENDs taken out of the sum). The gRPC front end's
sends count in the same sum (``take``/``give_back``): one that does not fit is refused
(TOO_MANY_REQUESTS, the client retries), since an HTTP/2 connection cannot be left unread
for one of its streams.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from broker.frontends.admission import Admission
from broker.frontends.native import connection as native_connection
from broker.frontends.native.connection import ClientConnection, TLSClientConnection
from protocol import FRAME_OVERHEAD, LimitExceededError

try:
    import resource
except ImportError:  # pragma: no cover - not on POSIX
    resource = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from broker.config import BrokerConfig
    from broker.engines.base import Engine
    from broker.security import BrokerSecurity

__all__ = ["NativeListener", "FD_RESERVE", "connection_limit"]

log = logging.getLogger("halfmq.broker")

#: Descriptors kept for the broker's own files (besides its open index files) whatever the
#: number of clients.
FD_RESERVE = 256


def connection_limit(wanted: int, open_indexes: int = 256) -> int:
    """How many client connections this process can hold: ``wanted``, or fewer if the
    descriptor limit (raised to its hard value first) leaves less after ``FD_RESERVE``
    and ``open_indexes`` (the store's open index files; the listener adds the admin HTTP
    port's connections, ``--max-http-connections``)."""
    if resource is None:
        return wanted
    inf = resource.RLIM_INFINITY
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != inf and (hard == inf or soft < hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    if soft == inf:
        return wanted
    return max(1, min(wanted, soft - FD_RESERVE - open_indexes))


class NativeListener:
    """Accepts native-protocol clients for one engine."""

    def __init__(self, engine: Engine, config: BrokerConfig, *, security: BrokerSecurity) -> None:
        self.engine = engine
        self.config = config
        self.security = security
        security.on_change.append(self._rights_changed)
        self.max_frame_size = config.max_message_size + FRAME_OVERHEAD
        self.connections: set[ClientConnection] = set()
        self.valid_topics: set[str] = set()  # topic names already checked (bounded)
        # message bytes of every connection's SENDs not yet stored, and the connections
        # not read until it falls to half of --max-inflight-total (hold, release_held)
        self.inflight_bytes = 0
        self.max_inflight_total = config.max_inflight_total
        self.held: set[ClientConnection] = set()
        self._hold_warned_at = -60.0
        self._holds = 0  # times the budget was passed since the last WARNING
        self.accepted = 0
        self.refused = 0
        self.errors: dict[int, int] = {}  # requests answered with an error, by error code
        self.max_connections = config.max_connections
        self._warned_at = 0.0
        self.port = 0
        self._seq = 0
        self._server: asyncio.AbstractServer | None = None
        self.admission: Admission | None = None  # with TLS
        self._stopping = False

    async def start(self) -> int:
        """Listen; return the bound port."""
        kept = self.config.max_open_indexes + self.config.max_http_connections
        reserve = FD_RESERVE + kept
        if self.config.grpc_port is None:
            limit = connection_limit(self.config.max_connections, kept)
        else:  # the gRPC port holds as many (its own limit: broker.frontends.grpc.server)
            limit = connection_limit(2 * self.config.max_connections, kept) // 2
        if limit < self.config.max_connections:
            log.warning("--max-connections %d lowered to %d: the descriptor limit (ulimit -n) leaves "
                        "room for %d clients after %d for the broker's own files",
                        self.config.max_connections, limit, limit, reserve)
        self.max_connections = limit
        if self.security.tls is not None:  # TLS handshakes under way count too
            self.admission = Admission(
                "native port", make=lambda: TLSClientConnection(self), served=lambda: len(self.connections),
                limit=lambda: self.max_connections, option="--max-connections", tls=self.security.tls,
                handshake_timeout=native_connection.HANDSHAKE_TIMEOUT)
            self.port = await self.admission.start(self.config.host, self.config.port)
            return self.port
        loop = asyncio.get_running_loop()  # (a connection is counted from its accept: opened())
        self._server = await loop.create_server(
            lambda: ClientConnection(self), self.config.host, self.config.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    def stop(self) -> None:
        """Accept no new connections."""
        self._stopping = True
        if self._server is not None:
            self._server.close()
        if self.admission is not None:
            self.admission.stop()

    def close_all(self) -> None:
        """Close every client connection (their queued frames are written first)."""
        if self.admission is not None:
            self.admission.close()
        for c in list(self.connections):
            c.close()

    def opened(self, conn: ClientConnection) -> None:
        """A client connected."""
        if self._stopping:
            conn.close()
            return
        if len(self.connections) >= self.max_connections:
            self.refused += 1
            now = time.monotonic()
            if now - self._warned_at >= 1.0:
                self._warned_at = now
                log.warning("refusing connection from %s: %d connections, the limit (--max-connections) "
                            "(%d refused so far)", conn.peer, self.max_connections, self.refused)
            conn.error(0, LimitExceededError(
                f"too many connections: the broker serves at most {self.max_connections} (--max-connections)"))
            conn.close()
            return
        self._seq += 1
        conn.conn_id = f"c{self._seq}"
        self.connections.add(conn)
        self.accepted += 1
        self.engine.session_opened(conn)

    def _rights_changed(self) -> None:
        """Users or grants changed: connections that lost what they hold are closed."""
        for c in list(self.connections):
            c.recheck_rights()

    def hold(self, conn: ClientConnection) -> None:
        """Stop reading ``conn``: the SENDs of all connections weigh more than
        ``--max-inflight-total`` (``release_held`` reads them all again)."""
        if conn not in self.held:
            if not self.held:
                self._holds += 1
                now = time.monotonic()
                if now - self._hold_warned_at >= 60:  # at most one WARNING a minute
                    log.warning("the sends of all connections weigh %d bytes, over --max-inflight-total %d: "
                                "connections that send are not read until half of it is stored (%d times "
                                "since the last such warning)", self.inflight_bytes, self.max_inflight_total,
                                self._holds)
                    self._hold_warned_at, self._holds = now, 0
            self.held.add(conn)
            if conn._reading:
                conn._pause_reading()

    def release_held(self) -> None:
        """Read the held connections again (the SENDs in flight fell to half the budget)."""
        held, self.held = self.held, set()
        log.debug("the sends in flight fell to %d bytes: reading %d held connections again",
                  self.inflight_bytes, len(held))
        for conn in held:
            conn._maybe_read()

    def take(self, weight: int) -> bool:
        """Another front end's send (gRPC) of ``weight`` bytes: count it in the budget and
        return True, or False if it does not fit (a send alone always fits, as on a native
        connection); ``give_back`` once it is stored or failed."""
        if self.inflight_bytes and self.inflight_bytes + weight > self.max_inflight_total:
            return False
        self.inflight_bytes += weight
        return True

    def give_back(self, weight: int) -> None:
        """The send counted by ``take`` is answered: out of the budget; held connections
        are read again once the sum is down to half of it."""
        self.inflight_bytes -= weight
        if self.held and self.inflight_bytes <= self.max_inflight_total // 2:
            self.release_held()

    def closed(self, conn: ClientConnection) -> None:
        """A client's connection is gone."""
        self.held.discard(conn)
        if self.held and self.inflight_bytes <= self.max_inflight_total // 2:
            self.release_held()  # (its SENDs were taken out of the budget)
        if conn in self.connections:
            self.connections.discard(conn)
            self.engine.session_closed(conn)
