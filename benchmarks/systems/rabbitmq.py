"""RabbitMQ through aio-pika: a durable quorum queue per cell, persistent messages,
publisher confirms, manual acks with a prefetch window (the server at 127.0.0.1:5672)."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from benchmarks.systems.base import Client as BaseClient
from benchmarks.systems.base import OnBody, find_pids, port_open
from benchmarks.systems.base import Server as BaseServer

__all__ = ["Server", "Client"]

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/"


def _url() -> str:
    return os.environ.get("BENCH_RABBITMQ_URL", DEFAULT_URL)


class Server(BaseServer):
    name = "rabbitmq"
    durability = "quorum queue (Raft log fsync'd), persistent msgs, publisher confirms"
    client_module = "rabbitmq"
    server_cpu_capacity = 100.0 * (os.cpu_count() or 1)

    def __init__(self) -> None:
        self.queue: str | None = None

    async def unavailable(self) -> str | None:
        try:
            import aio_pika  # noqa: F401
        except ImportError:
            return "aio-pika is not installed (pip install aio-pika)"
        from urllib.parse import urlparse

        u = urlparse(_url())
        if not await port_open(u.hostname or "127.0.0.1", u.port or 5672):
            return f"nothing listens on {u.hostname}:{u.port or 5672}"
        try:
            conn = await asyncio.wait_for(aio_pika.connect(_url()), 5)
            await conn.close()
        except Exception as exc:  # noqa: BLE001
            return f"cannot connect: {exc}"
        return None

    async def start_cell(self, cell: str, workdir: str) -> dict[str, Any]:
        import aio_pika

        self.queue = f"bench.{cell}"
        conn = await aio_pika.connect(_url())
        async with conn:
            ch = await conn.channel()
            await ch.queue_delete(self.queue)
            await ch.declare_queue(self.queue, durable=True,
                                   arguments={"x-queue-type": "quorum"})
        return {"url": _url(), "queue": self.queue}

    async def stop_cell(self) -> None:
        import aio_pika

        if self.queue is None:
            return
        queue, self.queue = self.queue, None
        try:
            conn = await aio_pika.connect(_url())
            async with conn:
                ch = await conn.channel()
                await ch.queue_delete(queue)
        except Exception:  # noqa: BLE001 - best effort cleanup
            pass

    def server_pids(self) -> list[int]:
        return find_pids(("beam.smp",))


class Client(BaseClient):
    def __init__(self, conn: dict[str, Any]) -> None:
        super().__init__(conn)
        self.connection: Any = None

    async def _connect(self) -> Any:
        import aio_pika

        self.connection = await aio_pika.connect(self.conn["url"])
        return self.connection

    async def open_producer(self) -> None:
        import aio_pika

        conn = await self._connect()
        self.channel = await conn.channel(publisher_confirms=True)
        self.exchange = self.channel.default_exchange
        self._Message = aio_pika.Message
        self._persistent = aio_pika.DeliveryMode.PERSISTENT
        self.queue = self.conn["queue"]

    async def publish(self, body: bytes) -> None:
        await self.exchange.publish(
            self._Message(body, delivery_mode=self._persistent), routing_key=self.queue
        )

    async def open_consumer(self, on_body: OnBody, *, prefetch: int, delay: float = 0.0) -> None:
        conn = await self._connect()
        ch = await conn.channel()
        await ch.set_qos(prefetch_count=prefetch)
        queue = await ch.get_queue(self.conn["queue"], ensure=False)

        async def callback(message: Any) -> None:
            if delay:
                await asyncio.sleep(delay)
            on_body(message.body)
            await message.ack()

        await queue.consume(callback, no_ack=False)

    async def close(self) -> None:
        if self.connection is not None:
            try:
                await asyncio.wait_for(self.connection.close(), 5)
            except Exception:  # noqa: BLE001
                pass
