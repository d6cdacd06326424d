"""The gRPC front end's server: listening, the advertised address, the broker-side timers.

How this works
--------------
``GrpcFrontend.start`` runs a ``grpc.aio`` server on the broker's own event loop, on
``--host`` and ``--grpc-port``, serving :class:`~.service.MessagingService`. Topic routes
tell clients where to send their RPCs: the address of ``--advertise`` when given (a
broker behind NAT or in a container), else the address the client used (as the proxy).
One timer task renews the leases of live push consumers and forgets clients that fell
silent. At most ``max_connections`` connections at once (the native port's limit; gRPC
closes one past it at its accept), each with 10 s for its TLS and HTTP/2 handshake. ``stop`` lets running RPCs finish for a short grace, then cancels the rest
(long polls) before the engine stops.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from typing import TYPE_CHECKING, Any

import grpc  # type: ignore[import-untyped]

from broker.frontends.grpc.service import MessagingService, SendBudget, ServiceTuning
from broker.frontends.grpc.stubs import grpc_pb, pb

if TYPE_CHECKING:
    from broker.config import BrokerConfig
    from broker.engines.base import Engine
    from broker.frontends.grpc.auth import Authenticator, UserAccess

__all__ = ["GrpcFrontend", "endpoints_of"]

log = logging.getLogger("halfmq.broker")

#: A gRPC connection's TLS and HTTP/2 handshake must end within this (milliseconds).
GRPC_HANDSHAKE_TIMEOUT_MS = 10_000


def endpoints_of(address: str) -> Any:
    """``Endpoints`` for ``HOST:PORT`` (IPv4, IPv6 in brackets or not, or a DNS name)."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    try:
        scheme = pb.AddressScheme.IPv6 if ipaddress.ip_address(host).version == 6 else pb.AddressScheme.IPv4
    except ValueError:
        scheme = pb.AddressScheme.DOMAIN_NAME
    return pb.Endpoints(scheme=scheme, addresses=[pb.Address(host=host, port=int(port))])


def _credentials(cfg: BrokerConfig) -> Any:
    """Server TLS credentials from ``--tls-cert``/``--tls-key`` (and ``--tls-client-ca``:
    clients must present a certificate it signed)."""

    def read(path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    assert cfg.tls_cert is not None  # (called only when TLS is configured)
    ca = read(cfg.tls_client_ca) if cfg.tls_client_ca else None
    return grpc.ssl_server_credentials([(read(cfg.tls_key or cfg.tls_cert), read(cfg.tls_cert))],
                                       root_certificates=ca, require_client_auth=ca is not None)


class GrpcFrontend:
    """The RocketMQ 5 gRPC endpoint of a broker."""

    def __init__(self, engine: Engine, config: BrokerConfig, *, tuning: ServiceTuning | None = None,
                 authenticator: Authenticator | None = None, access: UserAccess | None = None,
                 max_connections: int | None = None, budget: SendBudget | None = None) -> None:
        """``max_connections``: the most connections at once, handshakes included (default
        ``--max-connections``; the broker passes the native port's, lowered to what its
        descriptors hold). ``budget``: where sends not yet stored are counted against
        ``--max-inflight-total`` (the broker passes its native listener)."""
        self.engine = engine
        self.config = config
        self.max_connections = max_connections or config.max_connections
        self.service = MessagingService(engine, config, tuning=tuning, authenticator=authenticator, access=access,
                                        budget=budget)
        self.port = 0
        self._server: Any = None
        self._timer: asyncio.Task[None] | None = None

    async def start(self) -> int:
        """Listen on ``--host``/``--grpc-port``; return the bound port. Raises ``OSError``
        when the port cannot be bound."""
        cfg = self.config
        limit = cfg.max_message_size + (1 << 20)
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", limit),
                                          ("grpc.max_send_message_length", limit),
                                          ("grpc.so_reuseport", 0),
                                          # connections past it are closed at their accept; a
                                          # connection must finish its (TLS and HTTP/2)
                                          # handshake in 10 s: silent sockets hold no descriptor long
                                          ("grpc.max_allowed_incoming_connections", self.max_connections),
                                          ("grpc.server_handshake_timeout_ms", GRPC_HANDSHAKE_TIMEOUT_MS)])
        grpc_pb.add_MessagingServiceServicer_to_server(self.service, server)
        host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
        try:
            address = f"{host}:{cfg.grpc_port}"
            if cfg.tls_cert:  # the same certificate (and client CA) as the other ports
                self.port = server.add_secure_port(address, _credentials(cfg))
            else:
                self.port = server.add_insecure_port(address)
        except RuntimeError as exc:
            raise OSError(f"cannot listen on gRPC port {cfg.grpc_port}: {exc}") from None
        if not self.port:
            raise OSError(f"cannot listen on gRPC port {cfg.host}:{cfg.grpc_port}")
        await server.start()
        self._server = server
        advertise = cfg.advertise
        if advertise:
            self.service.advertised = endpoints_of(advertise)
        self.service.store_host = advertise or f"{cfg.host}:{self.port}"
        self._timer = asyncio.create_task(self._tick(), name="halfmq-grpc-timers")
        return self.port

    async def _tick(self) -> None:
        t = self.service.tuning
        next_renew = 0.0
        while True:
            await asyncio.sleep(min(1.0, t.renew_period))
            try:
                now = time.monotonic()
                self.service.clients.sweep(now)
                if now >= next_renew:
                    next_renew = now + t.renew_period
                    self.service.renew_due()
            except Exception:
                log.exception("gRPC timers failed")

    async def stop(self, grace: float = 1.0) -> None:
        """Stop serving: running RPCs get ``grace`` seconds, then are cancelled."""
        if self._timer is not None:
            self._timer.cancel()
            try:
                await self._timer
            except (asyncio.CancelledError, Exception):
                pass
            self._timer = None
        if self._server is not None:
            server, self._server = self._server, None
            self.service.clients.close_all()
            await server.stop(grace)
