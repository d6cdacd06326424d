"""The RocketMQ 5 gRPC front end (``apache.rocketmq.v2.MessagingService``): the official
RocketMQ clients talk to halfmq unchanged. Needs the ``grpc`` extra."""

from __future__ import annotations

__all__ = ["GrpcFrontend", "ServiceTuning"]


def __getattr__(name: str) -> object:  # imported on use: grpcio is optional
    if name in __all__:
        from broker.frontends.grpc import server, service

        return {"GrpcFrontend": server.GrpcFrontend, "ServiceTuning": service.ServiceTuning}[name]
    raise AttributeError(name)
