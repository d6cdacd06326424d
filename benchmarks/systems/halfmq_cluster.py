"""halfmq in cluster mode: a fresh 3-node JetStream cluster and one gateway per cell.

Durability: streams with 3 replicas on nats-server with ``sync_interval: always``; a send
is acknowledged once a quorum (2 of 3) has stored it and fsynced it. All three nats-server
processes and the gateway run on this one machine (so on its cores and its disk), the
clients are the same public SDKs as for ``halfmq-sync``, pointed at the gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.systems.base import Server as BaseServer
from benchmarks.systems.halfmq import BrokerProcess, start_broker, topic_name

__all__ = ["Server"]


class Server(BaseServer):
    name = "halfmq-cluster"
    durability = "3 replicas on nats-server (sync_interval: always); ack after a quorum fsynced"
    scenarios = frozenset({"publish", "latency", "e2e", "batch", "tx", "publish-users", "e2e-users"})
    client_module = "halfmq"

    def __init__(self) -> None:
        self.cluster: Any = None
        self.folder: str | None = None
        self.broker: BrokerProcess | None = None

    async def unavailable(self) -> str | None:
        try:
            import nats  # noqa: F401

            from broker.engines.jetstream.binary import NatsServerNotFound, find_nats_server
        except ImportError as exc:
            return f"the cluster extra is not installed ({exc})"
        try:
            find_nats_server()
        except NatsServerNotFound as exc:
            return str(exc)
        return None

    async def start_cell(self, cell: str, workdir: str) -> dict[str, Any]:
        from broker.engines.jetstream.local_cluster import LocalCluster

        self.folder = tempfile.mkdtemp(prefix="halfmq-cluster-bench-", dir=workdir)
        self.cluster = LocalCluster(Path(self.folder), nodes=3)
        await asyncio.to_thread(self.cluster.start)
        self.broker = await start_broker(workdir=self.folder, extra=[
            "--engine", self.cluster.engine_url, "--engine-monitor", ",".join(self.cluster.monitor_urls),
            "--replicas", "3"])
        return {"address": self.broker.address, "topic": topic_name(cell)}

    async def stop_cell(self) -> None:
        if self.broker is not None:
            broker, self.broker = self.broker, None
            await broker.stop()
        if self.cluster is not None:
            cluster, self.cluster = self.cluster, None
            await asyncio.to_thread(cluster.stop)
        if self.folder is not None:
            with contextlib.suppress(OSError):
                shutil.rmtree(self.folder)
            self.folder = None

    def server_pids(self) -> list[int]:
        pids = [self.broker.pid] if self.broker is not None else []
        if self.cluster is not None:
            pids += [n.proc.pid for n in self.cluster.nodes if n.proc is not None and n.running]
        return pids
