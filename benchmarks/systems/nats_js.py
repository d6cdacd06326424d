"""NATS JetStream through nats-py: a file-storage stream per cell, publish with PubAck,
a durable pull consumer with explicit acks (the server at 127.0.0.1:4222).

Durability note: JetStream acknowledges a publish once the message is written to its
file store; it fsyncs on a timer (``sync_interval``, default 2 minutes; per-message
``sync_always`` exists only from nats-server 2.10 and is not set here).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from typing import Any

from benchmarks.systems.base import Client as BaseClient
from benchmarks.systems.base import OnBody, find_pids, port_open
from benchmarks.systems.base import Server as BaseServer

__all__ = ["Server", "Client"]

DEFAULT_URL = "nats://127.0.0.1:4222"


def _url() -> str:
    return os.environ.get("BENCH_NATS_URL", DEFAULT_URL)


class Server(BaseServer):
    name = "nats"
    durability = "file storage R1, PubAck after write; fsync every 2 min (server default)"
    client_module = "nats_js"
    server_cpu_capacity = 100.0 * (os.cpu_count() or 1)

    def __init__(self) -> None:
        self.stream: str | None = None

    async def unavailable(self) -> str | None:
        try:
            import nats
        except ImportError:
            return "nats-py is not installed (pip install nats-py)"
        from urllib.parse import urlparse

        u = urlparse(_url())
        if not await port_open(u.hostname or "127.0.0.1", u.port or 4222):
            return f"nothing listens on {u.hostname}:{u.port or 4222}"
        try:
            nc = await asyncio.wait_for(nats.connect(_url()), 5)
            try:
                await nc.jetstream().account_info()
            finally:
                await nc.close()
        except Exception as exc:  # noqa: BLE001
            return f"JetStream not available: {exc}"
        return None

    async def start_cell(self, cell: str, workdir: str) -> dict[str, Any]:
        import nats
        from nats.js.api import StorageType, StreamConfig

        self.stream = re.sub(r"[^A-Za-z0-9_-]", "_", f"BENCH_{cell}")
        subject = f"bench.{self.stream}"
        nc = await nats.connect(_url())
        try:
            js = nc.jetstream()
            with contextlib.suppress(Exception):
                await js.delete_stream(self.stream)
            await js.add_stream(StreamConfig(name=self.stream, subjects=[subject],
                                             storage=StorageType.FILE, num_replicas=1))
        finally:
            await nc.close()
        return {"url": _url(), "stream": self.stream, "subject": subject}

    async def stop_cell(self) -> None:
        import nats

        if self.stream is None:
            return
        stream, self.stream = self.stream, None
        try:
            nc = await nats.connect(_url())
            try:
                await nc.jetstream().delete_stream(stream)
            finally:
                await nc.close()
        except Exception:  # noqa: BLE001 - best effort cleanup
            pass

    def server_pids(self) -> list[int]:
        return find_pids(("nats-server",))


class Client(BaseClient):
    def __init__(self, conn: dict[str, Any]) -> None:
        super().__init__(conn)
        self.nc: Any = None
        self._task: asyncio.Task[None] | None = None
        self._stop = False

    async def _connect(self) -> Any:
        import nats

        self.nc = await nats.connect(self.conn["url"], pending_size=64 * 1024 * 1024)
        self.js = self.nc.jetstream(publish_async_max_pending=100_000)
        return self.js

    async def open_producer(self) -> None:
        await self._connect()
        self.subject = self.conn["subject"]

    async def publish(self, body: bytes) -> None:
        await (await self.js.publish_async(self.subject, body))

    async def publish_batch(self, bodies: list[bytes]) -> None:
        pub = self.js.publish_async
        subject = self.subject
        futures = [await pub(subject, b) for b in bodies]
        await asyncio.gather(*futures)

    async def open_consumer(self, on_body: OnBody, *, prefetch: int, delay: float = 0.0) -> None:
        from nats.errors import TimeoutError as NatsTimeout
        from nats.js.api import AckPolicy, ConsumerConfig

        js = await self._connect()
        sub = await js.pull_subscribe(
            self.conn["subject"], durable="bench_consumer", stream=self.conn["stream"],
            config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, max_ack_pending=max(prefetch, 1024)),
        )
        self._sub = sub

        async def run() -> None:
            while not self._stop:
                try:
                    msgs = await sub.fetch(prefetch, timeout=0.5)
                except (TimeoutError, NatsTimeout):
                    continue
                for m in msgs:
                    if delay:
                        await asyncio.sleep(delay)
                    on_body(m.data)
                    await m.ack()

        self._task = asyncio.create_task(run())

    async def close(self) -> None:
        self._stop = True
        if self._task is not None:
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(self._task, 2)
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.nc.close(), 5)
