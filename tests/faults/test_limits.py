"""No client can hurt the broker: the limits of the README's table, each against a real broker.

Raw clients speak the wire protocol with ``protocol.encode_frame`` on a plain socket, so
they can do what the SDKs never do: ask for too much, and never read.
"""

from __future__ import annotations

import asyncio
import socket
import time

import psutil
import pytest

from consumer_sdk import ConsumeResult, PushConsumer
from producer_sdk import HalfMQError, Producer
from protocol import FrameDecoder, LimitExceededError, Op, encode_frame
from tests.conftest import wait_for
from tests.faults.test_crash_redelivery import admin


class RawClient:
    """A blocking socket speaking frames; reads only when asked to."""

    def __init__(self, address: str) -> None:
        host, port = address.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        self.decoder = FrameDecoder(1 << 26)

    def send(self, op: int, rid: int, payload) -> None:
        self.sock.sendall(encode_frame(op, rid, payload))

    def read_frame(self, timeout: float = 10.0):
        self.sock.settimeout(timeout)
        while True:
            data = self.sock.recv(65536)
            if not data:
                return None
            frames = self.decoder.feed(data)
            if frames:
                return frames[0]

    def hello(self, role: str = "consumer") -> None:
        self.send(Op.HELLO, 1, {"version": 1, "client_id": f"raw-{id(self)}", "role": role, "group": None})
        assert self.read_frame()[0] == Op.REPLY

    def close(self) -> None:
        self.sock.close()


async def test_prefetch_past_the_limit_is_refused(broker_factory):
    b = broker_factory("--max-prefetch", "100")

    async def on(m):
        return ConsumeResult.SUCCESS

    with pytest.raises(LimitExceededError, match="max-prefetch"):
        async with PushConsumer(b.address, group="g", topic="t", listener=on, prefetch=101):
            pass
    async with PushConsumer(b.address, group="g", topic="t", listener=on, prefetch=100):
        pass


async def test_a_consumer_that_never_reads_gets_no_more_than_its_socket_holds(broker_factory):
    """Finding 1 of issue 11 (with the largest prefetch allowed): a raw client subscribes on
    a large backlog and never reads. The broker stops leasing to it once its output is not
    written; its memory stays bounded; another group consumes everything meanwhile."""
    b = broker_factory()
    body = b"x" * (64 << 10)
    n = 1500  # ~94 MiB of backlog
    async with Producer(b.address) as p:
        for _ in range(0, n, 50):
            await p.send_batch("backlog", [body] * 50)
    rss_before = psutil.Process(b.proc.pid).memory_info().rss
    raw = RawClient(b.address)
    try:
        raw.hello()
        raw.send(Op.SUBSCRIBE, 2, {"group": "stuck", "topic": "backlog", "tags": "*", "start": "earliest",
                                   "prefetch": 4096, "max_reconsume_times": 16})
        got = 0

        async def on(m):
            nonlocal got
            got += 1
            return ConsumeResult.SUCCESS

        async with PushConsumer(b.address, group="other", topic="backlog", listener=on):
            await wait_for(lambda: got >= n, timeout=60, what="the other group consuming the backlog")

        def stuck_in_flight() -> int:
            groups = {g["group"]: g for g in admin(b.http_url, "/api/groups")["groups"]}
            return groups["stuck"]["in_flight"] if "stuck" in groups else -1

        # the stuck client's leases stop growing: what its socket buffers and one window hold
        last = -1
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            now = stuck_in_flight()
            if now == last and now > 0:
                break
            last = now
            await asyncio.sleep(0.3)
        assert 0 < last < n // 2, f"{last} of {n} messages leased to a client that never reads"
        growth = psutil.Process(b.proc.pid).memory_info().rss - rss_before
        assert growth < 200 << 20, f"broker RSS grew by {growth >> 20} MiB"
    finally:
        raw.close()


async def test_a_client_that_never_reads_its_replies_is_disconnected(broker_factory):
    b = broker_factory("--max-client-buffer", "256KiB")
    raw = RawClient(b.address)
    try:
        raw.hello(role="producer")
        msg = [b"y" * 16, None, [], {}, 0]
        raw.sock.settimeout(30)
        closed = False
        try:
            for rid in range(2, 400_000):  # replies pile up in the broker: ~30 bytes each
                raw.sock.sendall(encode_frame(Op.SEND, rid, {"topic": "flood", "msgs": [msg]}))
        except (ConnectionResetError, BrokenPipeError):
            closed = True
        assert closed, "the broker kept a client whose unsent output passed --max-client-buffer"
    finally:
        raw.close()
    assert "max-client-buffer" in b.log_path.read_text()
    async with Producer(b.address) as p:  # everyone else is served
        await p.send("flood", b"still fine")


async def test_back_pressure_on_a_pipelining_client_loses_nothing(broker_factory):
    """With few requests allowed in flight, the broker stops reading instead of queueing:
    a producer with 2,000 sends in flight still gets every reply."""
    b = broker_factory("--max-inflight-requests", "8", "--max-inflight-bytes", "64KiB")
    async with Producer(b.address) as p:
        results = await asyncio.gather(*(p.send("bp", b"z" * 1024) for _ in range(2000)))
    assert len({r.msg_id for r in results}) == 2000
    assert admin(b.http_url, "/api/topics")["topics"][0]["messages"] == 2000


async def test_connections_past_the_limit_are_refused_with_a_clear_error(broker_factory):
    b = broker_factory("--max-connections", "3")
    producers = [Producer(b.address) for _ in range(3)]
    for p in producers:
        await p.start()
    try:
        raw = RawClient(b.address)
        frame = raw.read_frame()
        assert frame is not None and frame[0] == Op.ERROR and frame[2]["code"] == LimitExceededError.code
        assert "max-connections" in frame[2]["message"]
        assert raw.read_frame() is None  # and closed
        raw.close()
        await producers[0].send("conn", b"served")
    finally:
        await producers[0].close()
    async with Producer(b.address) as p:  # a slot is free again
        await p.send("conn", b"after")
    for p in producers[1:]:
        await p.close()
    assert "refusing connection" in b.log_path.read_text()


async def test_topics_and_groups_past_the_limit_are_refused_and_nothing_is_stored(broker_factory):
    b = broker_factory("--max-topics", "3", "--max-groups", "2")
    async with Producer(b.address) as p:
        for t in ("t1", "t2", "t3"):
            await p.send(t, b"m")
        with pytest.raises(LimitExceededError, match="max-topics"):
            await p.send("t4", b"m")
        await p.send("t1", b"existing topics still work")
    names = [t["topic"] for t in admin(b.http_url, "/api/topics")["topics"]]
    assert names == ["t1", "t2", "t3"]

    async def on(m):
        return ConsumeResult.SUCCESS

    async with PushConsumer(b.address, group="g1", topic="t1", listener=on), \
            PushConsumer(b.address, group="g2", topic="t1", listener=on):
        with pytest.raises(HalfMQError, match="max-groups"):
            async with PushConsumer(b.address, group="g3", topic="t1", listener=on):
                pass
    assert sorted(g["group"] for g in admin(b.http_url, "/api/groups")["groups"]) == ["g1", "g2"]


async def test_a_connection_without_a_handshake_is_closed(tmp_path, monkeypatch):
    """A client that connects and never finishes its handshake does not keep a slot."""
    import broker.frontends.native.connection as native
    from broker import Broker, BrokerConfig

    monkeypatch.setattr(native, "HANDSHAKE_TIMEOUT", 0.3)
    async with Broker(BrokerConfig(data_dir=str(tmp_path / "d"), port=0, http_port=0)) as b:
        host, port = b.address.rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        data = await asyncio.wait_for(reader.read(), 10)  # until the broker closes it
        frames = FrameDecoder().feed(data)
        assert frames and frames[0][0] == Op.ERROR and "handshake" in frames[0][2]["message"]
        writer.close()
        await wait_for(lambda: not b.native.connections, what="the slot freed")
        async with Producer(b.address) as p:  # a client that says hello in time is served
            served = set(b.native.connections)
            assert len(served) == 1
            await asyncio.sleep(0.5)  # well past the handshake timeout: its timer is off
            await p.send("hs", b"ok")
            assert b.native.connections == served  # the same connection (no reconnect)
