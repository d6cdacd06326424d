"""``Broker``: one engine and the front ends that serve it.

How this works
--------------
``Broker.start`` starts the engine (the embedded one: open the data directory and
recover), loads users and applies protected mode (``broker.security``), starts the
webhooks it keeps (``broker.webhooks``), then the front ends — the native protocol on
``--port``, the admin HTTP API on ``--http-port`` and, with ``--grpc-port``, RocketMQ 5's
gRPC service (signed with a user's access key once users exist) — and is ready. ``stop`` goes the other way: no new connections, the webhooks finish their
requests under way, the engine finishes and persists what is in flight (sends fsynced,
progress saved), then the client connections and the HTTP API close.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from broker.config import BrokerConfig
from broker.engines.embedded import EmbeddedEngine
from broker.frontends.native.listener import NativeListener
from broker.security import BrokerSecurity
from broker.webhooks import Webhooks

__all__ = ["Broker"]

log = logging.getLogger("halfmq.broker")


def make_engine(config: BrokerConfig) -> Any:
    """The engine ``config`` asks for: the embedded one, or with ``--engine`` the JetStream
    engine of cluster mode (needs the ``cluster`` extra, nats-py; ``ImportError`` without)."""
    if not config.engine:
        return EmbeddedEngine(config)
    try:
        from broker.engines.jetstream.engine import JetStreamEngine
    except ImportError as exc:
        raise ImportError(f"--engine needs the cluster extra (pip install 'halfmq[cluster]'): {exc}") from None
    monitors = config.engine_monitor.split(",") if config.engine_monitor else None
    return JetStreamEngine(config, urls=config.engine.split(","), replicas=config.replicas,
                           fsync=config.engine_fsync, monitor_urls=monitors)


class Broker:
    """A halfmq broker; ``async with Broker(BrokerConfig(...)) as b`` runs it in this loop."""

    def __init__(self, config: BrokerConfig | None = None) -> None:
        self.config = config or BrokerConfig()
        self.engine: Any = make_engine(self.config)
        self.security = BrokerSecurity(self.engine, self.config)
        self.native = NativeListener(self.engine, self.config, security=self.security)
        self.webhooks = Webhooks(self.engine, self.config)
        self.broker_id = uuid.uuid4().hex[:12]
        self.data_dir = self.engine.data_dir
        self.address = ""
        self.http_url = ""
        self.port = 0
        self.http_port = 0
        self._http: Any = None
        self.grpc: Any = None  # the gRPC front end, with --grpc-port
        self.grpc_port = 0
        self.grpc_address = ""
        self._started = False
        self._stopping = False

    async def __aenter__(self) -> Broker:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Start the engine and listen. Raises ``DataDirLockedError`` if the data directory
        is locked, ``ConfigError`` for a configuration the data directory cannot serve."""
        cfg = self.config
        await self.engine.start()
        try:
            await self.webhooks.start()
            await self.security.start()
            await self.security.follow(self.engine)
            self.port = await self.native.start()
            self.address = f"{cfg.host}:{self.port}"
            from broker.frontends.http.admin import start_admin_http

            self._http, self.http_port = await start_admin_http(self, cfg.host, cfg.http_port)
            scheme = "https" if self.security.tls is not None else "http"
            self.http_url = f"{scheme}://{cfg.host}:{self.http_port}"
            if cfg.grpc_port is not None:
                from broker.frontends.grpc.auth import UserAccess
                from broker.frontends.grpc.server import GrpcFrontend

                self.grpc = GrpcFrontend(self.engine, cfg, access=UserAccess(self.security),
                                         max_connections=self.native.max_connections, budget=self.native)
                self.grpc_port = await self.grpc.start()
                self.grpc_address = f"{cfg.host}:{self.grpc_port}"
        except BaseException:
            if self.grpc is not None:
                await self.grpc.stop(0)
            if self._http is not None:
                await self._http.cleanup()
            self.native.stop()
            await self.webhooks.stop()
            await self.engine.stop()
            raise
        self._started = True
        log.info("broker started tcp=%s http=%s%s data=%s flush=%s", self.address, self.http_url,
                 f" grpc={self.grpc_address}" if self.grpc is not None else "", self.data_dir, cfg.flush)

    async def stop(self) -> None:
        """Graceful stop: no new connections, writes finished and fsynced, progress persisted."""
        if self._stopping or not self._started:
            return
        self._stopping = True
        self.native.stop()
        if self.grpc is not None:
            await self.grpc.stop()
        await self.webhooks.stop()
        await self.engine.stop()
        self.native.close_all()
        if self._http is not None:
            await self._http.cleanup()
        log.info("broker stopped")
