"""Redis Streams through redis-py: our own ``redis-server`` per cell with AOF
``appendfsync always`` (system ``redis``) or ``appendfsync everysec`` (system
``redis-everysec``: Redis' default AOF setting, which replies before the fsync and may lose
the last second on a power cut); the shared Redis keeps nothing on disk, so it is not used.
XADD to publish, XREADGROUP + XACK to consume.

Publishes from the harness's concurrent loop are auto-pipelined: everything queued during
one event-loop turn goes out as one pipeline on one connection (a few pipelines in
flight), the way ioredis' ``enableAutoPipelining`` does — the fairest way to give Redis
the same window of unconfirmed messages the other systems get. Redis replies only after
the AOF write and fsync of the commands it handled (``appendfsync always``), or after the
AOF write only (``everysec``: a background thread fsyncs once a second).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from typing import Any

from benchmarks.systems.base import Client as BaseClient
from benchmarks.systems.base import OnBody, free_port, port_open, stop_process
from benchmarks.systems.base import Server as BaseServer

__all__ = ["Server", "Client"]

PIPELINES_IN_FLIGHT = 2


_DURABILITY = {
    "always": "AOF appendfsync always (fsync before reply)",
    "everysec": "AOF appendfsync everysec (fsync once a second, after the reply)",
}


class Server(BaseServer):
    client_module = "redis_streams"

    def __init__(self, fsync: str = "always") -> None:
        if fsync not in _DURABILITY:
            raise ValueError(f"appendfsync must be one of {', '.join(_DURABILITY)}, not {fsync!r}")
        self.fsync = fsync
        self.name = "redis" if fsync == "always" else f"redis-{fsync}"
        self.durability = _DURABILITY[fsync]
        self.proc: asyncio.subprocess.Process | None = None
        self.dir: str | None = None

    async def unavailable(self) -> str | None:
        try:
            import redis  # noqa: F401
        except ImportError:
            return "redis-py is not installed (pip install redis)"
        if shutil.which("redis-server") is None:
            return "redis-server is not on PATH"
        return None

    async def start_cell(self, cell: str, workdir: str) -> dict[str, Any]:
        import redis.asyncio as aredis

        self.dir = tempfile.mkdtemp(prefix="redis-bench-", dir=workdir)
        port = free_port()
        self.proc = await asyncio.create_subprocess_exec(
            "redis-server", "--port", str(port), "--bind", "127.0.0.1",
            "--appendonly", "yes", "--appendfsync", self.fsync, "--save", "",
            "--dir", self.dir, "--protected-mode", "no",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
            stdin=asyncio.subprocess.DEVNULL,
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while not await port_open("127.0.0.1", port, 0.2):
            if loop.time() > deadline or self.proc.returncode is not None:
                raise RuntimeError("redis-server did not start")
            await asyncio.sleep(0.02)
        key = f"bench:{cell}"
        r = aredis.Redis(host="127.0.0.1", port=port)
        try:
            await r.xgroup_create(key, "bench_consumer", id="0", mkstream=True)
        finally:
            await r.aclose()
        return {"host": "127.0.0.1", "port": port, "key": key}

    async def stop_cell(self) -> None:
        proc, self.proc = self.proc, None
        await stop_process(proc, 10)
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def server_pids(self) -> list[int]:
        return [self.proc.pid] if self.proc is not None else []


class Client(BaseClient):
    def __init__(self, conn: dict[str, Any]) -> None:
        super().__init__(conn)
        self.r: Any = None
        self._pending: list[tuple[bytes, asyncio.Future[Any]]] = []
        self._wake: asyncio.Event | None = None
        self._flushers: list[asyncio.Task[None]] = []
        self._task: asyncio.Task[None] | None = None
        self._stop = False

    async def _connect(self) -> Any:
        import redis.asyncio as aredis

        self.r = aredis.Redis(host=self.conn["host"], port=self.conn["port"],
                              max_connections=PIPELINES_IN_FLIGHT + 2)
        await self.r.ping()
        return self.r

    async def open_producer(self) -> None:
        await self._connect()
        self.key = self.conn["key"]
        self._wake = asyncio.Event()
        self._flushers = [asyncio.create_task(self._flush_loop())
                          for _ in range(PIPELINES_IN_FLIGHT)]

    async def _flush_loop(self) -> None:
        assert self._wake is not None
        key = self.key
        while True:
            if not self._pending:
                self._wake.clear()
                await self._wake.wait()
                continue
            batch, self._pending = self._pending, []
            pipe = self.r.pipeline(transaction=False)
            for body, _ in batch:
                pipe.xadd(key, {"b": body})
            try:
                results = await pipe.execute()
            except Exception as exc:  # noqa: BLE001 - hand it to the callers
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for (_, fut), res in zip(batch, results, strict=True):
                if not fut.done():
                    fut.set_result(res)

    def _enqueue(self, body: bytes) -> asyncio.Future[Any]:
        fut = asyncio.get_running_loop().create_future()
        self._pending.append((body, fut))
        assert self._wake is not None
        self._wake.set()
        return fut

    async def publish(self, body: bytes) -> None:
        await self._enqueue(body)

    async def publish_batch(self, bodies: list[bytes]) -> None:
        pipe = self.r.pipeline(transaction=False)
        for body in bodies:
            pipe.xadd(self.key, {"b": body})
        await pipe.execute()

    async def open_consumer(self, on_body: OnBody, *, prefetch: int, delay: float = 0.0) -> None:
        r = await self._connect()
        key = self.conn["key"]

        async def run() -> None:
            while not self._stop:
                resp = await r.xreadgroup("bench_consumer", "c1", {key: ">"},
                                          count=prefetch, block=200)
                if not resp:
                    continue
                ids = []
                for _stream, entries in resp:
                    for msg_id, fields in entries:
                        if delay:
                            await asyncio.sleep(delay)
                        on_body(fields[b"b"])
                        ids.append(msg_id)
                if ids:
                    await r.xack(key, "bench_consumer", *ids)

        self._task = asyncio.create_task(run())

    async def close(self) -> None:
        self._stop = True
        if self._task is not None:
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(self._task, 2)
        for t in self._flushers:
            t.cancel()
        if self.r is not None:
            with contextlib.suppress(Exception):
                await self.r.aclose()


