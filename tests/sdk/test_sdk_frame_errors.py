"""The SDK's reader when the broker's bytes go bad: answers that arrived first still count."""

from __future__ import annotations

import asyncio
import contextlib

from producer_sdk.connection import Connection
from protocol import Op
from tests.conftest import wait_for


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, corrupt: asyncio.Event | None) -> None:
    try:
        while data := await reader.read(1 << 16):
            if corrupt is not None and corrupt.is_set():
                corrupt.clear()
                data += b"\x00\x00\x00\x00"  # a zero-length frame, in the same write as the answer
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def test_answer_in_the_same_read_as_a_malformed_frame_is_delivered(broker):
    """A proxy appends a zero-length frame to the broker's answer to a PING. The SDK hands the
    answer to its request, then drops the connection and reconnects by itself (before, the
    answer was lost with the connection and the request failed)."""
    host, port = broker.address.split(",")[0].rsplit(":", 1)
    corrupt = asyncio.Event()
    pipes: set[asyncio.Task] = set()

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        broker_r, broker_w = await asyncio.open_connection(host, int(port))
        for task in (_pipe(client_r, broker_w, None), _pipe(broker_r, client_w, corrupt)):
            pipes.add(asyncio.create_task(task))

    proxy = await asyncio.start_server(handle, "127.0.0.1", 0)
    address = f"127.0.0.1:{proxy.sockets[0].getsockname()[1]}"
    conn = Connection(address, role="producer")
    try:
        await conn.open()
        assert conn.generation == 1
        corrupt.set()
        assert await conn.request(Op.PING, {}) == {}
        await wait_for(lambda: conn.generation == 2 and conn.connected, what="the reconnect")
        assert await conn.request(Op.PING, {}) == {}
    finally:
        await conn.close()
        proxy.close()
        await proxy.wait_closed()
        for task in pipes:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
