"""The two halves every benchmarked system provides.

How this works
--------------
A system module (``benchmarks/systems/<name>.py``) defines a ``Server`` and a ``Client``.

* ``Server`` lives in the harness process. It checks that the system is reachable,
  prepares a fresh place for one *cell* (one scenario of one round: a new halfmq broker
  with a new data dir, a new RabbitMQ quorum queue, a new JetStream stream, a new
  ``redis-server`` with AOF), tells the worker processes how to reach it (a JSON-able
  ``conn`` dict), names the server processes whose CPU and RSS we sample, and cleans up.
* ``Client`` lives in a worker process (``python -m benchmarks.e2e worker ...``). It turns
  the harness's uniform calls — ``publish(body)`` (returns once the system confirmed the
  message durably), ``publish_batch(bodies)``, ``consume(on_body)`` (acks each message
  after ``on_body`` ran) — into the system's own client library calls.

The loops that drive these calls, the payloads and the clocks are the harness's own
(``benchmarks/e2e.py``), identical for every system.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["Server", "Client", "free_port", "port_open", "find_pids", "OnBody"]

#: Called by a consumer for every message body it receives (before the ack).
OnBody = Callable[[bytes], None]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def port_open(host: str, port: int, timeout: float = 1.0) -> bool:
    """True if a TCP connection to host:port succeeds within ``timeout``."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


def find_pids(names: tuple[str, ...]) -> list[int]:
    """Pids of running processes whose name is one of ``names`` (read-only lookup, used to
    sample the CPU of servers we did not start, e.g. ``beam.smp``)."""
    import psutil

    out = []
    for proc in psutil.process_iter(["name"]):
        if proc.info.get("name") in names:
            out.append(proc.pid)
    return out


async def stop_process(proc: asyncio.subprocess.Process | None, grace: float = 5.0) -> None:
    """SIGTERM a child process, SIGKILL it if it is not gone after ``grace`` seconds."""
    if proc is None or proc.returncode is not None:
        return
    proc.terminate()
    try:
        await asyncio.wait_for(proc.wait(), grace)
    except TimeoutError:
        proc.kill()
        await proc.wait()


class Server:
    """The harness-side half of a system. Subclasses override what they need."""

    #: Short name used on the command line and in the tables.
    name = "base"
    #: The system's durability setting, printed beside its numbers.
    durability = ""
    #: Scenarios this system can run.
    scenarios: frozenset[str] = frozenset({"publish", "latency", "e2e", "batch", "publish-users", "e2e-users"})
    #: The module that holds the matching ``Client`` (``benchmarks.systems.<module>``).
    client_module = ""
    #: CPU capacity of the server process(es), in % of one core (a Python process: 100).
    server_cpu_capacity = 100.0

    async def unavailable(self) -> str | None:
        """None if the system can be benchmarked, else why not (the harness skips it)."""
        return None

    async def start_cell(self, cell: str, workdir: str) -> dict[str, Any]:
        """Prepare a fresh place for one cell named ``cell``; return the workers' ``conn``."""
        raise NotImplementedError

    async def stop_cell(self) -> None:
        """Undo ``start_cell`` (stop the server we started, delete the queue/stream)."""

    def server_pids(self) -> list[int]:
        """Processes that serve this system (CPU and RSS are sampled from them)."""
        return []

    async def loop_disk_wait_seconds(self) -> float | None:
        """Seconds the server's event loop has spent waiting for its own disk writes so far,
        if the server reports it (None: unknown). Time a process spends blocked does not
        show in its CPU time; with this, a loop that is busy or blocked all the time is
        reported as the saturated side."""
        return None

    def extra_args(self) -> dict[str, Any]:
        """Extra per-system parameters for the workers (merged into ``conn``)."""
        return {}


class Client:
    """The worker-side half of a system: one producer or one consumer connection."""

    def __init__(self, conn: dict[str, Any]) -> None:
        self.conn = conn

    async def open_producer(self) -> None:
        raise NotImplementedError

    async def publish(self, body: bytes) -> None:
        """Publish one message; return once the system confirmed it (durably per its setting)."""
        raise NotImplementedError

    async def publish_batch(self, bodies: list[bytes]) -> None:
        """Publish many messages in as few round trips as the system allows; return once all
        are confirmed."""
        await asyncio.gather(*(self.publish(b) for b in bodies))

    async def publish_tx(self, body: bytes) -> None:
        """Transactional publish (halfmq only)."""
        raise NotImplementedError

    async def open_consumer(self, on_body: OnBody, *, prefetch: int,
                            delay: float = 0.0) -> Awaitable[None] | None:
        """Start consuming: call ``on_body`` for every message, then ack it.

        ``delay`` (seconds) makes a deliberately slow consumer (sleep before each ack).
        """
        raise NotImplementedError

    async def close(self) -> None:
        """Close every connection (stop consuming first)."""
