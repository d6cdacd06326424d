"""The SPEC tests on both engines: the embedded broker, and cluster mode.

How this works
--------------
``nats_cluster`` (session-scoped, in ``tests/conftest.py``) is one 3-node nats-server
cluster on free 127.0.0.1 ports with ``sync_interval: always``, started once. A test
directory that imports ``broker_factory`` from here runs each of its tests twice: with
``embedded`` the fixture is the usual one (one ``python -m broker`` process on its own
data directory); with ``cluster`` it starts two gateways (``python -m broker --engine
...``) with the same options, and the object it returns has the ``BrokerProcess`` surface
the tests use: ``address`` is both gateways' ``"gwA,gwB"`` (the SDKs' address list;
clients reach gateway A first), ``http_url`` gateway A's admin API, ``kill9`` / ``stop`` /
``start`` / ``restart`` act on both gateways (never on the engine: a killed "broker" here
is a lost gateway, the state is in the engine).

Isolation: the engine outlives the test, so after each cluster test the gateways are
stopped, every topic stream deleted and the shared streams emptied or deleted
(``reset_engine``). A test whose subject cluster mode does not have (or does differently)
is marked ``@pytest.mark.embedded_only("why")`` and skipped there with that reason.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import BrokerProcess

__all__ = ["ClusterBroker", "broker_factory", "reset_engine", "slow_cluster_broker_factory"]

ENGINES = ("embedded", pytest.param("cluster", marks=pytest.mark.cluster))
#: the same, with the cluster variant under ``-m slow`` (``slow_cluster_broker_factory``)
ENGINES_SLOW_CLUSTER = ("embedded", pytest.param("cluster", marks=[pytest.mark.cluster, pytest.mark.slow]))


#: shared streams emptied rather than deleted (the next gateways need not create them);
#: HMQ_IDS is deleted: a purge keeps its dedup window, which would swallow the next
#: test's "topic is transactional" mark for a topic name used again
_SHARED = ("HMQ_TX", "HMQ_DLQ", "HMQ_SETTINGS")


async def _reset(urls: list[str]) -> None:
    import nats

    nc = await nats.connect(servers=urls, connect_timeout=5, max_reconnect_attempts=3)
    try:
        js = nc.jetstream(timeout=10)
        for info in await js.streams_info():
            name = info.config.name
            if name in _SHARED:
                await js.purge_stream(name)
            elif name.startswith("HMQ_"):
                await js.delete_stream(name)
    finally:
        await nc.close()


def reset_engine(cluster: Any) -> None:
    """Delete every topic stream of ``cluster`` and the message-id prefixes, empty the other
    shared streams (transactions, dead letters, settings): the next gateways start on an
    empty engine."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # callable from a running loop too
        pool.submit(asyncio.run, _reset(cluster.urls)).result()


class _Logs:
    """Several log files read as one (``read_text``), in gateway order."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths

    def read_text(self, *args: Any, **kwargs: Any) -> str:
        return "".join(p.read_text(*args, **kwargs) for p in self.paths if p.exists())

    def __str__(self) -> str:
        return ", ".join(str(p) for p in self.paths)


class ClusterBroker:
    """Two gateways over one engine, seen as one broker by the tests (module docstring)."""

    def __init__(self, cluster: Any, folder: Path, args: list[str], env: dict[str, str],
                 gateways: int = 2) -> None:
        self.cluster = cluster
        self.data_dir = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.gateways = [
            BrokerProcess(folder / f"gw{i}", [
                "--engine", cluster.engine_url, "--engine-monitor", ",".join(cluster.monitor_urls),
                "--replicas", "3", *args], env)
            for i in range(gateways)]

    @property
    def address(self) -> str:
        """Every gateway, comma-separated (the SDKs' address list)."""
        return ",".join(g.address for g in self.gateways)

    @property
    def http_url(self) -> str:
        return self.gateways[0].http_url

    @property
    def log_path(self) -> _Logs:
        """Every gateway's log (whichever gateway ran a check-back logs it)."""
        return _Logs([g.log_path for g in self.gateways if g.log_path is not None])

    @property
    def proc(self) -> Any:
        return self.gateways[0].proc

    @property
    def ready_line(self) -> str:
        return self.gateways[0].ready_line

    def start(self, timeout: float = 60.0) -> ClusterBroker:
        """Start every gateway (in parallel) and wait for their ready lines."""
        with concurrent.futures.ThreadPoolExecutor(len(self.gateways)) as pool:
            for f in [pool.submit(g.start, timeout) for g in self.gateways]:
                f.result()
        return self

    def kill9(self) -> None:
        for g in self.gateways:
            g.kill9()

    def stop(self, timeout: float = 20.0) -> int:
        codes = [g.stop(timeout) for g in self.gateways]
        return next((c for c in codes if c), 0)

    def restart(self) -> ClusterBroker:
        self.stop()
        return self.start()


def _broker_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., Any]]:
    engine = request.param
    if engine == "cluster":
        marker = request.node.get_closest_marker("embedded_only")
        if marker is not None:
            pytest.skip(f"cluster mode: {marker.args[0] if marker.args else marker.kwargs['reason']}")
        cluster = request.getfixturevalue("nats_cluster")
    started: list[Any] = []

    def make(*args: str, env: dict[str, str] | None = None, data_dir: Path | None = None) -> Any:
        folder = data_dir or tmp_path / f"data{len(started)}"
        b: Any
        if engine == "cluster":
            b = ClusterBroker(cluster, folder, list(args), env or {})
        else:
            b = BrokerProcess(folder, list(args), env or {})
        started.append(b)
        return b.start()

    yield make
    for b in started:
        b.stop()
    if engine == "cluster" and started:
        reset_engine(cluster)


@pytest.fixture(params=ENGINES)
def broker_factory(request: pytest.FixtureRequest, tmp_path: Path):
    """``broker_factory(*args, env={})``: a broker on the embedded engine, or two gateways
    over the session's JetStream cluster (see the module docstring); stopped at teardown."""
    yield from _broker_factory(request, tmp_path)


@pytest.fixture(params=ENGINES_SLOW_CLUSTER, name="broker_factory")
def slow_cluster_broker_factory(request: pytest.FixtureRequest, tmp_path: Path):
    """``broker_factory`` whose cluster variant runs only under ``-m slow``: for a test
    module whose cluster runs take long (gateways restarted again and again); a module
    imports it (``from tests.engines import slow_cluster_broker_factory``) and its tests
    still ask for ``broker_factory``."""
    yield from _broker_factory(request, tmp_path)
