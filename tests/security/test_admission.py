"""Sockets a client opens and leaves silent cannot take the broker's descriptors: the admin
HTTP port holds at most ``--max-http-connections``, and with TLS the native and HTTP ports
count a connection from its accept, its TLS handshake included (``broker.frontends.admission``).

Each test opens real TCP connections that never say anything (no HTTP request, no TLS
ClientHello) and checks the one past the limit is closed at once while the broker keeps
serving the clients that behave.
"""

from __future__ import annotations

import asyncio
import os

import aiohttp
import pytest

from producer_sdk import Producer
from tests.conftest import wait_for
from tests.security.helpers import Certs

pytestmark = pytest.mark.timeout(60)


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def _silent(address: str, n: int) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    host, port = address.rsplit(":", 1)
    return [await asyncio.open_connection(host, int(port)) for _ in range(n)]


async def _closed_by_peer(reader: asyncio.StreamReader, timeout: float) -> bytes:
    """What the broker sent before closing the connection (within ``timeout``)."""
    return await asyncio.wait_for(reader.read(), timeout)


def _close(conns) -> None:
    for _, w in conns:
        w.close()


async def test_silent_connections_to_the_admin_port_are_bounded(broker_factory):
    b = broker_factory("--max-http-connections", "20")
    http_addr = b.http_url.removeprefix("http://")
    base = _open_fds(b.proc.pid)
    conns = await _silent(http_addr, 20)  # (accepted first: the listen queue is in order)
    try:
        extra = await _silent(http_addr, 30)  # past the limit: a 503 each, then closed
        answers = await asyncio.gather(*(_closed_by_peer(r, 5) for r, _ in extra))
        _close(extra)
        assert all(a.startswith(b"HTTP/1.1 503 ") and b"--max-http-connections" in a for a in answers)
        assert _open_fds(b.proc.pid) <= base + 20 + 5  # (a few of its own may come and go)
        async with Producer(b.address) as p:  # the native port is untouched
            await p.send("t", b"still served")
    finally:
        _close(conns)
    async with aiohttp.ClientSession() as http:  # the slots come back
        async def healthy() -> bool:
            async with http.get(f"{b.http_url}/healthz") as r:
                return r.status == 200
        await wait_for(healthy, what="the admin API serving again")
    assert "admin HTTP port: refusing connection from 127.0.0.1:" in b.log_path.read_text()


async def test_tls_handshakes_count_against_max_connections_and_time_out(tmp_path, monkeypatch):
    import broker.frontends.native.connection as native
    from broker import Broker, BrokerConfig

    monkeypatch.setattr(native, "HANDSHAKE_TIMEOUT", 1.0)
    certs = Certs.make(tmp_path / "certs")
    cfg = BrokerConfig(data_dir=str(tmp_path / "d"), port=0, http_port=0, max_connections=10,
                       tls_cert=str(certs.server_cert), tls_key=str(certs.server_key))
    async with Broker(cfg) as b:
        silent = await _silent(b.address, 10)  # no ClientHello: 10 handshakes under way
        try:
            await wait_for(lambda: b.native.admission is not None and b.native.admission.pending == 10,
                           what="10 handshakes counted")
            refused = await _silent(b.address, 5)
            for r, _ in refused:  # closed at once, before any TLS
                assert await _closed_by_peer(r, 5) == b""
            _close(refused)
            assert b.native.admission.refused == 5
            # the silent ones are dropped when their handshake times out; then clients connect
            for r, _ in silent:
                assert await _closed_by_peer(r, 10) == b""
            await wait_for(lambda: b.native.admission.pending == 0, what="the handshakes dropped")
            async with Producer(b.address, tls=certs.client_context()) as p:
                await p.send("t", b"over tls")
                assert len(b.native.connections) == 1
        finally:
            _close(silent)


async def test_a_plain_client_on_the_tls_port_is_dropped_and_counted_out(tmp_path):
    from broker import Broker, BrokerConfig

    certs = Certs.make(tmp_path / "certs")
    cfg = BrokerConfig(data_dir=str(tmp_path / "d"), port=0, http_port=0,
                       tls_cert=str(certs.server_cert), tls_key=str(certs.server_key))
    async with Broker(cfg) as b:
        (r, w), = await _silent(b.address, 1)
        w.write(b"\x00\x00\x00\x10not a tls record")
        await _closed_by_peer(r, 5)  # (a TLS alert, perhaps) and closed: the handshake failed
        w.close()
        await wait_for(lambda: b.native.admission.pending == 0, what="the failed handshake counted out")


async def test_the_grpc_port_holds_at_most_max_connections(tmp_path):
    from broker import Broker, BrokerConfig

    cfg = BrokerConfig(data_dir=str(tmp_path / "d"), port=0, http_port=0, grpc_port=0, max_connections=5)
    async with Broker(cfg) as b:
        held = await _silent(b.grpc_address, 5)
        try:
            refused = await _silent(b.grpc_address, 5)  # past the limit: closed at their accept
            for r, _ in refused:
                assert await _closed_by_peer(r, 5) == b""
            _close(refused)
        finally:
            _close(held)
