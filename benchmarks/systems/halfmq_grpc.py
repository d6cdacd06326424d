"""halfmq through its RocketMQ 5 gRPC port, driven by the official ``rocketmq-python-client``.

The broker is the same subprocess as ``halfmq-sync`` (``--flush sync``) with ``--grpc-port``;
the workers use Apache's client: ``Producer.send_async`` (its only pipelined send: one
message per RPC, ``window`` in flight) and a ``PushConsumer`` whose listener records each
body before its ack. The client's own threads and its one-message-per-RPC protocol cap a
client process far below the native SDK (see the README's "Coming from RocketMQ").
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from typing import Any

from benchmarks.systems.base import Client as BaseClient
from benchmarks.systems.base import OnBody, free_port
from benchmarks.systems.halfmq import Server as NativeServer
from benchmarks.systems.halfmq import start_broker, topic_name

__all__ = ["Server", "Client"]


class Server(NativeServer):
    scenarios = frozenset({"publish", "latency", "e2e"})
    client_module = "halfmq_grpc"

    def __init__(self, **kw: Any) -> None:
        super().__init__("sync", **kw)
        self.name = "halfmq-grpc"
        self.durability = "fsync before ack (group commit); official RocketMQ client over gRPC"

    async def unavailable(self) -> str | None:
        try:
            import grpc  # type: ignore[import-untyped]  # noqa: F401

            from broker.frontends.grpc import stubs  # noqa: F401
        except ImportError as exc:
            return f"the grpc extra is not installed ({exc})"
        return None

    async def start_cell(self, cell: str, workdir: str) -> dict[str, Any]:
        port = free_port()
        self.broker = await start_broker("sync", workdir=workdir, extra=["--grpc-port", str(port)])
        return {"address": f"127.0.0.1:{port}", "native": self.broker.address, "topic": topic_name(cell)}


def _client_module() -> Any:
    """Import the official client with its logs in a temporary home (it writes ~/logs)."""
    os.environ["HOME"] = tempfile.mkdtemp(prefix="halfmq-bench-rmq-")
    import rocketmq  # type: ignore[import-untyped]

    return rocketmq


class Client(BaseClient):
    def __init__(self, conn: dict[str, Any]) -> None:
        super().__init__(conn)
        self.rmq = _client_module()
        address = conn.get("grpc") or conn["address"]  # "grpc": beside a native client's "address"
        self.config = self.rmq.ClientConfiguration(address, self.rmq.Credentials(), request_timeout=30)
        self.topic = conn["topic"]
        self.producer: Any = None
        self.consumer: Any = None

    async def open_producer(self, *, transactional: bool = False) -> None:
        if transactional:
            raise NotImplementedError("the tx scenario is not run over gRPC")
        self.producer = self.rmq.Producer(self.config, (self.topic,))
        await asyncio.to_thread(self.producer.startup)

    async def publish(self, body: bytes) -> None:
        m = self.rmq.Message()
        m.topic = self.topic
        m.body = body
        await asyncio.wrap_future(self.producer.send_async(m))

    async def open_consumer(self, on_body: OnBody, *, prefetch: int, delay: float = 0.0) -> None:
        rmq = self.rmq
        loop = asyncio.get_running_loop()
        success = rmq.ConsumeResult.SUCCESS

        class Listener(rmq.MessageListener):  # type: ignore[misc, name-defined]
            def consume(self, message: Any) -> Any:
                loop.call_soon_threadsafe(on_body, message.body)
                return success

        self.consumer = rmq.PushConsumer(self.config, "bench_consumer", Listener(),
                                         {self.topic: rmq.FilterExpression("*")}, consumption_thread_count=8)
        await asyncio.to_thread(self.consumer.startup)

    async def close(self) -> None:
        for c in (self.consumer, self.producer):
            if c is not None:
                await asyncio.to_thread(c.shutdown)
        self.consumer = self.producer = None
