"""Helpers for the security tests: users written into a data directory before the broker
starts, certificates made by the test (trustme), raw protocol frames, a recording relay."""

from __future__ import annotations

import asyncio
import concurrent.futures
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trustme

from protocol import FrameDecoder, Op, encode_frame

#: (right, topic pattern, group pattern or None)
GrantSpec = tuple[str, str, str | None]


def add_users(data_dir: Path, users: dict[str, tuple[str, list[GrantSpec]]]) -> None:
    """Create ``users`` ({name: (password, grants)}) in ``data_dir`` as ``halfmq user``
    does offline (under the directory's lock). Call while no broker runs on it."""
    from broker.security.cli import add_users_offline

    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # callable from a running loop too
        pool.submit(asyncio.run, add_users_offline(str(data_dir), users)).result()


@dataclass
class Certs:
    """A test CA, a server certificate for 127.0.0.1 and a client certificate, as files."""

    ca: trustme.CA
    ca_file: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    @classmethod
    def make(cls, folder: Path) -> Certs:
        folder.mkdir(parents=True, exist_ok=True)
        ca = trustme.CA()
        server = ca.issue_cert("127.0.0.1", "localhost")
        client = ca.issue_cert("bank1@clients.example")
        paths = {name: folder / f"{name}.pem" for name in ("ca", "server", "server_key", "client", "client_key")}
        ca.cert_pem.write_to_path(str(paths["ca"]))
        server.cert_chain_pems[0].write_to_path(str(paths["server"]))
        server.private_key_pem.write_to_path(str(paths["server_key"]))
        client.cert_chain_pems[0].write_to_path(str(paths["client"]))
        client.private_key_pem.write_to_path(str(paths["client_key"]))
        return cls(ca, paths["ca"], paths["server"], paths["server_key"], paths["client"], paths["client_key"])

    def broker_args(self, *, mutual: bool = False) -> list[str]:
        args = ["--tls-cert", str(self.server_cert), "--tls-key", str(self.server_key)]
        return args + (["--tls-client-ca", str(self.ca_file)] if mutual else [])

    def client_context(self, *, with_cert: bool = False) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        if with_cert:
            ctx.load_cert_chain(str(self.client_cert), str(self.client_key))
        return ctx


class RawClient:
    """A bare protocol connection: frames out, frames in, nothing else."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.decoder = FrameDecoder(1 << 24)
        self.frames: list[tuple[int, int, Any]] = []

    @classmethod
    async def connect(cls, address: str, ssl_ctx: ssl.SSLContext | None = None) -> RawClient:
        host, port = address.rsplit(":", 1)
        return cls(*await asyncio.open_connection(host, int(port), ssl=ssl_ctx))

    def send(self, op: int, rid: int, payload: Any) -> None:
        self.writer.write(encode_frame(op, rid, payload))

    def send_bytes(self, data: bytes) -> None:
        self.writer.write(data)

    async def next_frame(self, timeout: float = 5.0) -> tuple[int, int, Any] | None:
        """The next frame, or None once the broker closed the connection."""
        while not self.frames:
            data = await asyncio.wait_for(self.reader.read(65536), timeout)
            if not data:
                return None
            self.frames.extend(self.decoder.feed(data))
        return self.frames.pop(0)

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except OSError:
            pass


class RecordingRelay:
    """A TCP relay on 127.0.0.1 that records every byte a client sends to the broker."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.sent = bytearray()
        self.server: asyncio.AbstractServer | None = None
        self.address = ""
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> RecordingRelay:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.address = f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def _serve(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        host, port = self.target.rsplit(":", 1)
        breader, bwriter = await asyncio.open_connection(host, int(port))

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, record: bool) -> None:
            try:
                while data := await src.read(65536):
                    if record:
                        self.sent.extend(data)
                    dst.write(data)
            except OSError:
                pass
            finally:
                dst.close()

        await asyncio.gather(pump(creader, bwriter, True), pump(breader, cwriter, False))

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()




async def raw_login(address: str, user: str | None, password: str | None = None, *,
                    role: str = "producer", group: str | None = None) -> RawClient:
    """A raw connection that did the handshake (with a SCRAM login when ``user``)."""
    from producer_sdk.auth import ClientLogin
    from protocol import PROTOCOL_VERSION

    c = await RawClient.connect(address)
    hello: dict[str, Any] = {"version": PROTOCOL_VERSION, "client_id": "raw", "role": role, "group": group}
    login = ClientLogin(user, password or "") if user else None
    if login is not None:
        hello["auth"] = login.first()
    c.send(Op.HELLO, 1, hello)
    frame = await c.next_frame()
    assert frame is not None and frame[0] == Op.REPLY, frame
    if login is not None:
        c.send(Op.AUTH, 2, login.final(frame[2]["auth"]))
        frame = await c.next_frame()
        assert frame is not None and frame[0] == Op.REPLY, frame
        login.verify(frame[2]["auth"])
    return c


async def raw_request(c: RawClient, op: int, rid: int, payload: Any) -> tuple[int, Any]:
    """Send one request and return ``(op, payload)`` of its answer."""
    c.send(op, rid, payload)
    while True:
        frame = await c.next_frame()
        assert frame is not None, "connection closed"
        if frame[1] == rid:
            return frame[0], frame[2]
