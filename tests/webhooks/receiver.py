"""A real aiohttp webhook receiver for the tests: records every request, answers by script."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from consumer_sdk import WebhookVerificationError, WebhookVerifier


@dataclass
class Hit:
    """One request the receiver got, and what it answered (``status`` None: it hung up
    without answering, the client timed out)."""

    at: float
    headers: dict[str, str]
    body: bytes
    status: int | None = None
    refused: str | None = None  # why the verifier refused it


#: An answer: an HTTP status, or HANG (never answer: the client times out).
HANG = -1


class Receiver:
    """An HTTP server on 127.0.0.1 (port 0 at first, the same port after ``restart``).

    ``answer(n, hit)`` (n: 0-based index of the request) decides each answer: a status or
    ``HANG``; by default 204. With ``secret``, requests go through a ``WebhookVerifier``
    first and a refused one is answered 401 (and recorded with ``refused``).
    """

    def __init__(self, *, secret: str | list[str] | None = None,
                 answer: Callable[[int, Hit], int] | None = None) -> None:
        self.hits: list[Hit] = []
        self.answer = answer or (lambda n, hit: 204)
        self.verifier = WebhookVerifier(secret) if secret else None
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._hang = asyncio.Event()  # never set: hung requests wait until the server stops

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def accepted(self) -> list[Hit]:
        """Requests answered 2xx."""
        return [h for h in self.hits if h.status is not None and 200 <= h.status < 300]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        hit = Hit(time.time(), dict(request.headers), await request.read())
        n = len(self.hits)
        self.hits.append(hit)
        if self.verifier is not None:
            try:
                self.verifier.verify(request.headers, hit.body)
            except WebhookVerificationError as exc:
                hit.refused, hit.status = exc.reason, 401
                return web.Response(status=401, text=str(exc))
        status = self.answer(n, hit)
        if status == HANG:
            await self._hang.wait()
        hit.status = status
        return web.Response(status=status, text="" if status < 300 else f"scripted {status}")

    async def start(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await site.start()
        server = site._server  # noqa: SLF001 - the bound port has no public accessor
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    async def replay(self, hit: Hit) -> int:
        """Send a recorded request again, byte for byte; return the status."""
        headers = {k: v for k, v in hit.headers.items()
                   if k.lower().startswith("halfmq-") or k.lower() == "content-type"}
        async with aiohttp.ClientSession() as s, s.post(self.url, data=hit.body, headers=headers) as r:
            return r.status


def closed_port() -> int:
    """A loopback port nothing listens on (a connection to it is refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
