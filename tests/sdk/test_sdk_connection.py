"""The shared client connection against a real broker: pipelining, deadlines, lost
connections, retries and reconnect (the broker is frozen with SIGSTOP to hold replies)."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from broker.engines.jetstream.local_cluster import wait_stopped
from producer_sdk import BrokerUnavailableError, Producer, RequestTimeoutError
from producer_sdk.connection import Connection, parse_address, parse_addresses
from protocol import Op, Role
from tests.conftest import wait_for

pytestmark = pytest.mark.timeout(30)


def _freeze(broker) -> None:
    """SIGSTOP, returning once every thread of the broker has stopped."""
    os.kill(broker.proc.pid, signal.SIGSTOP)
    wait_stopped(broker.proc.pid)


def _thaw(broker) -> None:
    os.kill(broker.proc.pid, signal.SIGCONT)


def _kill9(broker) -> None:
    """SIGKILL (works on a frozen process too: no reply escapes) and close the pipes."""
    broker.kill9()
    for stream in (broker.proc.stdout, broker.proc.stderr):
        if stream:
            stream.close()


def test_parse_address():
    assert parse_address("127.0.0.1:7600") == ("127.0.0.1", 7600)
    assert parse_address("[::1]:7600") == ("::1", 7600)
    for bad in ["nohost", "host:", ":7600", "host:port"]:
        with pytest.raises(ValueError):
            parse_address(bad)


def test_parse_addresses():
    assert parse_addresses("127.0.0.1:7600") == [("127.0.0.1", 7600)]
    assert parse_addresses("gw1:7600, [::1]:7700") == [("gw1", 7600), ("::1", 7700)]
    for bad in ["", "gw1:7600,", "gw1:7600,,gw2:7600", "gw1:7600,gw2", None]:
        with pytest.raises(ValueError):
            parse_addresses(bad)
    with pytest.raises(ValueError):
        parse_address("gw1:7600,gw2:7600")  # one address only


async def test_a_dead_first_address_costs_one_attempt(broker, unused_tcp_port):
    """The first address refuses connections: the connection goes on to the second."""
    conn = Connection(f"127.0.0.1:{unused_tcp_port},{broker.address}", role="producer")
    await conn.open(timeout=5)
    try:
        assert conn.connected and conn.current_address == broker.address.split(",")[0]
    finally:
        await conn.close()


async def test_handshake_and_pipelined_requests(broker):
    conn = Connection(broker.address, role=Role.PRODUCER, group="pg", client_id="me@1@x")
    await conn.open()
    try:
        assert conn.connected and conn.generation == 1 and conn.max_message_size > 0
        replies = await asyncio.gather(*(conn.request(Op.PING, {}) for _ in range(500)))
        assert replies == [{}] * 500
        assert not conn._pending
    finally:
        await conn.close()
    assert conn.closed and not conn.connected


async def test_request_deadline_raises_timeout(broker):
    async with Producer(broker.address, send_timeout=0.3, retries=0) as p:
        _freeze(broker)
        try:
            t0 = time.monotonic()
            with pytest.raises(RequestTimeoutError):
                await p.send("t", b"x")
            assert 0.25 < time.monotonic() - t0 < 2
            assert not p._conn._pending
        finally:
            _thaw(broker)
        assert (await p.send("t", b"after")).msg_id  # the late reply was ignored


async def test_in_flight_request_fails_unavailable_on_lost_connection(broker):
    conn = Connection(broker.address, role=Role.PRODUCER)
    await conn.open()
    try:
        _freeze(broker)
        req = asyncio.ensure_future(conn.request(Op.PING, {}, timeout=10))
        await wait_for(lambda: conn._pending, what="the request in flight")
        await asyncio.to_thread(_kill9, broker)
        with pytest.raises(BrokerUnavailableError) as info:
            await asyncio.wait_for(req, 5)
        assert info.value.retriable
    finally:
        await conn.close()


async def test_send_retried_across_broker_restart(broker):
    # (time for a loaded machine to start the broker again: two gateways in cluster mode)
    async with Producer(broker.address, send_timeout=20.0) as p:
        _freeze(broker)
        sending = asyncio.ensure_future(p.send("rt", b"survives"))
        await wait_for(lambda: p._conn._pending, what="the send in flight")
        await asyncio.to_thread(_kill9, broker)
        await asyncio.to_thread(broker.start)
        r = await asyncio.wait_for(sending, 21)
        assert r.msg_id


async def test_send_gives_up_within_send_timeout(broker):
    async with Producer(broker.address, send_timeout=0.5) as p:
        await asyncio.to_thread(broker.stop)
        t0 = time.monotonic()
        with pytest.raises(BrokerUnavailableError):
            await p.send("t", b"x")
        assert time.monotonic() - t0 < 1.5


async def test_close_fails_waiting_requests(broker):
    conn = Connection(broker.address, role=Role.PRODUCER)
    await conn.open()
    _freeze(broker)
    try:
        req = asyncio.ensure_future(conn.request(Op.PING, {}, timeout=10))
        await wait_for(lambda: conn._pending, what="the request in flight")
        closing = asyncio.ensure_future(conn.close())
        with pytest.raises(Exception) as info:
            await asyncio.wait_for(req, 5)
        assert not isinstance(info.value, asyncio.TimeoutError)
    finally:
        _thaw(broker)
    await closing
