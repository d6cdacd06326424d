"""What the engine's Raft groups look like, for fault tests: who leads what, who is current.

Each call opens its own short NATS connection to the cluster's running nodes and asks the
JetStream API (``$JS.API.STREAM.INFO``, ``CONSUMER.INFO``, ``...LEADER.STEPDOWN``); the
meta leader comes from ``LocalCluster.meta_leader()`` (a node's ``/jsz``).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

__all__ = ["consumer_leader", "js_api", "lagging_replicas", "stream_leader", "wait_all_current",
           "wait_consumer_leader_apart"]


async def js_api(cluster: Any, endpoint: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    """One ``$JS.API.<endpoint>`` request through any running node; returns the answer."""
    import nats

    urls = [n.url for n in cluster.nodes if n.running]
    nc = await nats.connect(servers=urls, connect_timeout=5, max_reconnect_attempts=2)
    try:
        msg = await nc.request(f"$JS.API.{endpoint}", json.dumps(body).encode() if body else b"",
                               timeout=10)
        answer: dict[str, Any] = json.loads(msg.data)
        return answer
    finally:
        await nc.close()


async def _leader(cluster: Any, endpoint: str, timeout: float = 60.0) -> str:
    """The leader an ``...INFO`` endpoint names, asked again while there is none (an
    election: no leader yet, or a 503 "temporarily unavailable")."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            leader = ((await js_api(cluster, endpoint)).get("cluster") or {}).get("leader")
        except Exception:  # noqa: BLE001 - no answer during the election: ask again
            leader = None
        if leader:
            return str(leader)
        assert time.monotonic() < deadline, f"no leader for {endpoint} after {timeout:.0f} s"
        await asyncio.sleep(0.25)


async def stream_leader(cluster: Any, stream: str) -> str:
    return await _leader(cluster, f"STREAM.INFO.{stream}")


async def consumer_leader(cluster: Any, stream: str, consumer: str) -> str:
    return await _leader(cluster, f"CONSUMER.INFO.{stream}.{consumer}")


async def wait_consumer_leader_apart(cluster: Any, stream: str, consumer: str, timeout: float = 60.0) -> str:
    """Step the consumer's leader down until it is not the stream's leader (so a kill of it
    is a consumer fault alone); returns the consumer's leader."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            s_leader = await stream_leader(cluster, stream)
            c_info = await js_api(cluster, f"CONSUMER.INFO.{stream}.{consumer}")
            c_leader = (c_info.get("cluster") or {}).get("leader")
            if c_leader and c_leader != s_leader:
                return str(c_leader)
            if c_leader:
                await js_api(cluster, f"CONSUMER.LEADER.STEPDOWN.{stream}.{consumer}")
        except Exception:  # noqa: BLE001 - an election under way: ask again
            pass
        assert time.monotonic() < deadline, f"consumer {consumer} kept leading with stream {stream}"
        await asyncio.sleep(0.5)


def _lagging(what: str, info: dict[str, Any], nodes: set[str]) -> list[str]:
    cl = info.get("cluster") or {}
    if not cl.get("leader"):
        return [f"{what}: no leader"]
    peers = {cl["leader"]: True}
    for r in cl.get("replicas") or []:
        peers[r["name"]] = bool(r.get("current")) and not r.get("offline")
    return [f"{what}: {name} {'not current' if name in peers else 'missing'}"
            for name in sorted(nodes) if not peers.get(name)]


async def lagging_replicas(cluster: Any) -> list[str]:
    """Every stream and consumer replica on a running node that is not current (empty:
    all caught up)."""
    running = {n.name for n in cluster.nodes if n.running}
    out: list[str] = []
    names = await js_api(cluster, "STREAM.NAMES")
    for stream in names.get("streams") or []:
        info = await js_api(cluster, f"STREAM.INFO.{stream}")
        if "error" in info:
            out.append(f"{stream}: {info['error']}")
            continue
        out += _lagging(stream, info, running)
        consumers = await js_api(cluster, f"CONSUMER.LIST.{stream}")
        for c in consumers.get("consumers") or []:
            out += _lagging(f"{stream}/{c['name']}", c, running)
    return out


async def wait_all_current(cluster: Any, timeout: float = 60.0) -> float:
    """Until every stream and consumer has a leader and every replica on a running node is
    current; returns how long that took."""
    t0 = time.monotonic()
    last: list[str] = ["not asked yet"]
    while True:
        try:
            last = await lagging_replicas(cluster)
        except Exception as exc:  # noqa: BLE001 - a leader being elected: ask again
            last = [repr(exc)]
        if not last:
            return time.monotonic() - t0
        assert time.monotonic() - t0 < timeout, f"replicas not current after {timeout:.0f} s: {last[:5]}"
        await asyncio.sleep(0.25)
