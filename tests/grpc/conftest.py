"""Fixtures for the gRPC front end: the official RocketMQ client (HOME in a temporary
folder, every client shut down), raw stubs, and brokers serving gRPC in-process or as a
subprocess."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("grpc", reason="the grpc extra is not installed (pip install -e '.[test]')")

from tests.conftest import BrokerProcess  # noqa: E402


def _import_client(home: str) -> SimpleNamespace:
    """Import the official client with HOME in a temporary folder: it creates
    ``~/logs/rocketmq_python`` and its log file when first imported."""
    old = os.environ.get("HOME")
    os.environ["HOME"] = home
    try:
        import rocketmq
        from rocketmq.v5.exception import client_exception
    except ImportError as exc:  # pragma: no cover - the test extra installs it
        pytest.skip(f"rocketmq-python-client is not installed: {exc}")
    finally:
        if old is None:
            os.environ.pop("HOME", None)
        else:
            os.environ["HOME"] = old
    return SimpleNamespace(**{n: getattr(rocketmq, n) for n in rocketmq.__all__}, errors=client_exception)


@pytest.fixture(scope="session")
def rmq() -> Any:
    """The official client's API (``rmq.Producer``, ``rmq.Message``, ..., ``rmq.errors``)."""
    home = tempfile.mkdtemp(prefix="halfmq-rmq-home-")
    ns = _import_client(home)
    yield ns
    shutil.rmtree(home, ignore_errors=True)


def _bind_official_io_loop() -> None:
    """Make the official client's I/O loop this thread's current event loop, as the client
    itself does in the thread that creates a channel (``RpcChannel.create_channel``).

    Its ``startup()`` can create the telemetry stream in the calling thread, through
    grpc.aio, which looks up that thread's event loop. Once in CI, in an ``asyncio.to_thread``
    worker where no loop had been set, that failed with "There is no current event loop in
    thread 'asyncio_0'", and the PushConsumer waited 10 s for settings that never came."""
    from rocketmq.v5.client.connection.rpc_client import RpcClient

    loop = RpcClient.get_channel_io_loop()
    if loop is not None:
        asyncio.set_event_loop(loop)


class Clients:
    """Creates official clients against one address and shuts every one down."""

    def __init__(self, rmq: Any, address: str) -> None:
        self.rmq = rmq
        self.address = address
        self.started: list[Any] = []

    def config(self, ak: str = "", sk: str = "", *, address: str | None = None, timeout: int = 3) -> Any:
        return self.rmq.ClientConfiguration(address or self.address, self.rmq.Credentials(ak, sk),
                                            request_timeout=timeout)

    def start(self, client: Any) -> Any:
        self.started.append(client)
        _bind_official_io_loop()
        client.startup()
        return client

    def producer(self, *topics: str, checker: Any = None, config: Any = None) -> Any:
        """A started producer; without ``checker`` every check-back answers UNKNOWN."""
        rmq = self.rmq

        class Unknown(rmq.TransactionChecker):
            def check(self, message: Any) -> Any:
                return rmq.TransactionResolution.TRANSACTION_RESOLUTION_UNSPECIFIED

        return self.start(rmq.Producer(config or self.config(), topics or None, checker or Unknown()))

    def simple(self, group: str, topic: str, *, tags: str = "*", wait: int = 2, config: Any = None) -> Any:
        sub = {topic: self.rmq.FilterExpression(tags)}
        return self.start(self.rmq.SimpleConsumer(config or self.config(), group, sub, await_duration=wait))

    def push(self, group: str, topic: str, listener: Callable[[Any], Any], *, tags: str = "*",
             config: Any = None) -> Any:
        rmq = self.rmq

        class Listener(rmq.MessageListener):
            def consume(self, message: Any) -> Any:
                return listener(message)

        sub = {topic: rmq.FilterExpression(tags)}
        return self.start(rmq.PushConsumer(config or self.config(), group, Listener(), sub,
                                           consumption_thread_count=4))

    def shutdown(self, client: Any) -> None:
        if client in self.started:
            self.started.remove(client)
        client.shutdown()

    def close(self) -> None:
        for c in reversed(self.started):
            try:
                c.shutdown()
            except Exception:
                pass
        self.started.clear()


def message(rmq: Any, topic: str, body: bytes | str, **fields: Any) -> Any:
    """An official ``Message``: ``tag``, ``keys``, ``message_group``, ``delivery_timestamp``,
    ``properties`` (a dict)."""
    m = rmq.Message()
    m.topic = topic
    m.body = body.encode() if isinstance(body, str) else body
    for k, v in fields.items():
        if k == "properties":
            for pk, pv in v.items():
                m.add_property(pk, pv)
        else:
            setattr(m, k, v)
    return m


@pytest.fixture
async def gbroker(tmp_path: Path) -> AsyncIterator[Any]:
    """An in-process broker serving gRPC, with short delays and fast lease timers."""
    from broker import Broker, BrokerConfig

    cfg = BrokerConfig(data_dir=str(tmp_path / "data"), port=0, http_port=0, grpc_port=0, tx_timeout=0.5,
                       tx_check_interval=0.3, retry_delays="1s,1s", ack_timeout=5)
    async with Broker(cfg) as b:
        t = b.grpc.service.tuning
        t.long_polling, t.renew_slice, t.renew_ahead, t.renew_period, t.release = 3.0, 1.5, 0.8, 0.2, 0.3
        yield b


@pytest.fixture
async def clients(rmq: Any, gbroker: Any) -> AsyncIterator[Clients]:
    """Official clients against ``gbroker``; all shut down after the test."""
    c = Clients(rmq, gbroker.grpc_address)
    yield c
    await asyncio.to_thread(c.close)


@pytest.fixture
async def stub(gbroker: Any) -> AsyncIterator[Any]:
    """A raw ``MessagingServiceStub`` on this test's loop, calls signed with a fixed client id."""
    import grpc

    from broker.frontends.grpc.stubs import grpc_pb

    channel = grpc.aio.insecure_channel(gbroker.grpc_address)
    yield SimpleNamespace(api=grpc_pb.MessagingServiceStub(channel), md=(("x-mq-client-id", "raw@1"),),
                          channel=channel)
    await channel.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def grpc_broker_process(tmp_path: Path):
    """Factory of broker subprocesses serving gRPC on a fixed free port (kept across restarts)."""
    started: list[BrokerProcess] = []

    def make(*args: str) -> tuple[BrokerProcess, str]:
        port = free_port()
        b = BrokerProcess(tmp_path / f"data{len(started)}", ["--grpc-port", str(port), *args])
        started.append(b)
        b.start()
        return b, f"127.0.0.1:{port}"

    yield make
    for b in started:
        b.stop()
