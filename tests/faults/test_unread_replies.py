"""A client that sends requests but does not read the replies: the broker stops reading it
once an eighth of ``--max-client-buffer`` is unsent, so its requests wait in the kernel's
buffers instead of piling up as replies in the broker's memory; once it reads, every reply
comes and the broker reads it again. Before, the replies grew up to ``--max-client-buffer``
(64 MiB by default) per client, and the client was disconnected there.
"""

from __future__ import annotations

import asyncio
import socket

from broker import Broker, BrokerConfig
from broker.frontends.native import connection as native_connection
from protocol import FrameDecoder, Op, encode_frame
from tests.conftest import wait_for

MiB = 1 << 20


async def test_a_client_that_does_not_read_its_replies_is_not_read_either(tmp_path, monkeypatch):
    # small windows so that a few hundred thousand PINGs show it: the transport pauses
    # writing past 32 KiB, the broker stops reading past 1 MiB / 8 = 128 KiB unsent
    monkeypatch.setattr(native_connection, "DELIVERY_WINDOW", 32 * 1024)
    monkeypatch.setattr(native_connection, "READ_STOP_MIN", 64 * 1024)
    async with Broker(BrokerConfig(data_dir=str(tmp_path / "d"), port=0, http_port=0, max_client_buffer=MiB)) as b:
        host, port = b.address.rsplit(":", 1)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: a small window
        sock.connect((host, int(port)))
        sock.setblocking(False)
        reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
        decoder = FrameDecoder(1 << 20)
        frames: list = []

        async def next_frames() -> None:
            while True:
                data = await reader.read(65536)
                assert data, "the broker closed the connection"
                got = decoder.feed(data)
                if got:
                    frames.extend(got)
                    return

        writer.write(encode_frame(Op.HELLO, 1, {"version": 1, "client_id": "deaf", "role": "producer"}))
        await next_frames()
        assert frames.pop(0)[:2] == (Op.REPLY, 1)
        (conn,) = b.native.connections
        conn.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)

        n = 200_000  # ~2.4 MB of replies: past --max-client-buffer had the broker read them all
        writer.write(b"".join(encode_frame(Op.PING, rid, {}) for rid in range(2, n + 2)))
        # the broker stops reading (it used to read on, and disconnect the client at 1 MiB)
        await wait_for(lambda: conn.closed or not conn._reading, what="the broker to stop reading the client")
        assert not conn.closed, "disconnected: the replies piled up to --max-client-buffer"
        unsent = conn.transport.get_write_buffer_size()
        assert unsent < MiB, unsent
        assert conn._inflight == 0  # whatever it read is answered: the rest waits unread

        answered: set[int] = set()
        while len(answered) < n:
            await next_frames()
            answered.update(rid for op, rid, _ in frames if op == Op.REPLY)
            frames.clear()
            assert conn.transport.get_write_buffer_size() < MiB  # never near the limit
        assert answered == set(range(2, n + 2)) and not conn.closed and conn._reading
        writer.write(encode_frame(Op.PING, n + 2, {}))
        await next_frames()
        assert frames[-1][:2] == (Op.REPLY, n + 2)
        writer.close()
