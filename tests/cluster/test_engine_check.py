"""The engine check: every refusal against a real server, and the accepted cluster."""

from __future__ import annotations

import logging
import socket

import pytest

from broker.engines.jetstream.check import (
    LAZY_FSYNC_WARNING,
    EngineCheckError,
    check_engine,
    split_engine_urls,
)

pytestmark = pytest.mark.timeout(60)


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


async def test_accepts_three_nodes_syncing_always(nats_cluster, caplog):
    caplog.set_level(logging.WARNING, "halfmq.engine")
    report = await check_engine(nats_cluster.engine_url, replicas=3,
                                monitor_urls=nats_cluster.monitor_urls)
    assert report.cluster_size == 3
    assert report.meta_leader in {"n1", "n2", "n3"}
    assert [s.name for s in report.servers] == ["n1", "n2", "n3"]
    assert all(s.sync_always and s.version == "2.15.1" for s in report.servers)
    assert report.unchecked == []
    assert caplog.records == []


async def test_refuses_a_server_older_than_2_12():
    if not _reachable("127.0.0.1", 4222):
        pytest.skip("no nats-server on 127.0.0.1:4222 (the machine's 2.9.10 service)")
    with pytest.raises(EngineCheckError) as err:
        await check_engine("nats://127.0.0.1:4222", replicas=1, fsync="lazy")
    assert "2.9.10" in str(err.value) and "2.12.0 or newer" in str(err.value)


async def test_refuses_fewer_servers_than_replicas(nats_cluster):
    with pytest.raises(EngineCheckError, match="has 3 servers, fewer than --replicas 5"):
        await check_engine(nats_cluster.urls, replicas=5, monitor_urls=nats_cluster.monitor_urls)


async def test_refuses_lazy_fsync_unless_told(cluster_factory, caplog):
    lazy = cluster_factory(nodes=1, sync_always=False)
    with pytest.raises(EngineCheckError) as err:
        await check_engine(lazy.urls, replicas=1, monitor_urls=lazy.monitor_urls)
    msg = str(err.value)
    assert "n1 syncs JetStream writes to disk only every 120s" in msg
    assert "sync_interval: always" in msg and "--engine-fsync lazy" in msg
    caplog.set_level(logging.WARNING, "halfmq.engine")
    report = await check_engine(lazy.urls, replicas=1, fsync="lazy", monitor_urls=lazy.monitor_urls)
    assert report.servers[0].sync_always is False
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings.count(LAZY_FSYNC_WARNING) == 1
    # ... and a single node cannot hold three replicas, whatever its fsync
    with pytest.raises(EngineCheckError, match="fewer than --replicas 3"):
        await check_engine(lazy.urls, replicas=3, fsync="lazy", monitor_urls=lazy.monitor_urls)


async def test_refuses_when_fsync_cannot_be_checked(nats_cluster):
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()  # nothing listens there
    with pytest.raises(EngineCheckError, match="cannot read any server's JetStream configuration"):
        await check_engine(nats_cluster.urls, replicas=3, monitor_urls=[f"http://127.0.0.1:{port}"])


async def test_tolerates_a_node_that_is_down_but_says_so(nats_cluster, caplog):
    """Only one node's monitoring answers: the other two are listed as unchecked, not refused."""
    caplog.set_level(logging.WARNING, "halfmq.engine")
    report = await check_engine(nats_cluster.urls[:1] + ["nats://127.0.0.1:1"], replicas=3,
                                monitor_urls=nats_cluster.monitor_urls[:1])
    assert report.cluster_size == 3
    assert any("nats://127.0.0.1:1" in u for u in report.unchecked)
    assert sum("peer whose monitoring" in u for u in report.unchecked) == 2
    assert len([r for r in caplog.records if "not checked" in r.getMessage()]) == 3


async def test_refuses_when_no_server_answers():
    with pytest.raises(EngineCheckError, match="cannot reach any engine server"):
        await check_engine("nats://127.0.0.1:1", replicas=1, timeout=1)


def test_engine_url_list():
    assert split_engine_urls("nats://a:1, nats://b:2,") == ["nats://a:1", "nats://b:2"]
    for bad in ("", "http://a:1", "nats://"):
        with pytest.raises(ValueError):
            split_engine_urls(bad)
    with pytest.raises(ValueError):
        import asyncio
        asyncio.run(check_engine("nats://a:1", fsync="sometimes"))
