"""An example receiver of halfmq webhooks: check the signature, refuse replays, apply once.

How this works
--------------
``POST /hook`` reads the raw body (the signature covers the exact bytes: verify before
parsing), checks it with ``consumer_sdk.WebhookVerifier`` — a bad signature, a timestamp
outside five minutes or a replayed request gets 401 and changes nothing — then stores the
event with ``apply_once`` keyed by ``halfmq-id``: the broker delivers at least once (a
lost 2xx, a timeout after the work was done, a resend from the DLQ), so the same message
may come again and must not be applied twice. It answers 204 when the event is stored
(now or before), and 500 when the database fails, so the broker retries later.

``GET /events`` lists what was stored. ``GET /missed?ids=ID,ID`` shows how the receiving
side asks the broker what became of messages it expected (``GET
/api/webhooks/NAME/messages/ID`` on the broker's admin API): delivered when, or still
retrying, or dead-lettered.

    python -m examples.webhook_receiver --secret S [--port 8080] [--db events.db]
        [--broker-http http://127.0.0.1:7601 --webhook NAME]
    halfmq webhook add orders-hook --topic orders --url http://127.0.0.1:8080/hook --secret S
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
from typing import Any

import aiohttp
import aiosqlite
from aiohttp import web

from consumer_sdk import WebhookVerificationError, WebhookVerifier, apply_once, create_dedup_table

__all__ = ["build_app", "main"]

log = logging.getLogger("webhook_receiver")

_EVENTS_DDL = ("CREATE TABLE IF NOT EXISTS events (msg_id VARCHAR(64) PRIMARY KEY, topic TEXT, "
               "attempt INTEGER, body BLOB, received_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP)")


def build_app(*, secret: str | list[str], db_path: str, broker_http: str | None = None,
              webhook: str | None = None, tolerance: float = 300.0) -> web.Application:
    """The receiver's aiohttp application. ``secret``: the webhook's secret (or several while
    rotating); ``db_path``: the SQLite file of stored events; ``broker_http`` and
    ``webhook``: where ``/missed`` asks (optional)."""
    verifier = WebhookVerifier(secret, tolerance=tolerance)
    lock = asyncio.Lock()  # one writer at a time on the SQLite file
    app = web.Application()

    async def open_db(app: web.Application) -> Any:
        conn = await aiosqlite.connect(db_path, isolation_level=None)
        await create_dedup_table(conn)
        await conn.execute(_EVENTS_DDL)
        app["db"] = conn
        yield
        await conn.close()

    async def hook(request: web.Request) -> web.Response:
        body = await request.read()
        try:
            event = verifier.verify(request.headers, body)
        except WebhookVerificationError as exc:
            log.warning("refused a request from %s: %s", request.remote, exc)
            return web.Response(status=401, text=str(exc))

        async def store(conn: Any) -> None:
            await conn.execute("INSERT INTO events (msg_id, topic, attempt, body) VALUES (?, ?, ?, ?)",
                               (event.msg_id, event.topic, event.attempt, body))

        try:
            async with lock:
                await apply_once(app["db"], event.msg_id, store)
        except Exception:
            log.exception("could not store %s: answering 500, the broker retries", event.msg_id)
            return web.Response(status=500, text="storage failed")
        return web.Response(status=204)

    async def events(_request: web.Request) -> web.Response:
        rows = await (await app["db"].execute(
            "SELECT msg_id, topic, attempt, body FROM events ORDER BY received_at, msg_id")).fetchall()
        return web.json_response([{"msg_id": m, "topic": t, "attempt": a, "body": b.decode("utf-8", "replace")}
                                  for m, t, a, b in rows])

    async def missed(request: web.Request) -> web.Response:
        if not broker_http or not webhook:
            return web.json_response({"error": "start with --broker-http and --webhook"}, status=400)
        ids = [i for i in request.query.get("ids", "").split(",") if i][:100]
        out = {}
        async with aiohttp.ClientSession() as s:
            for msg_id in ids:
                async with s.get(f"{broker_http}/api/webhooks/{webhook}/messages/{msg_id}") as r:
                    out[msg_id] = await r.json()
        return web.json_response(out)

    app.cleanup_ctx.append(open_db)
    app.router.add_post("/hook", hook)
    app.router.add_get("/events", events)
    app.router.add_get("/missed", missed)
    return app


def main(argv: list[str] | None = None) -> int:
    """Run the receiver until SIGINT/SIGTERM; prints one ready line with its URL."""
    p = argparse.ArgumentParser(prog="python -m examples.webhook_receiver", description=__doc__.split("\n\n")[0])
    p.add_argument("--secret", default=os.environ.get("WEBHOOK_SECRET"),
                   help="the webhook's secret (or set WEBHOOK_SECRET); several: comma-separated")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--db", default="webhook-events.db")
    p.add_argument("--broker-http", help="the broker's admin API, for /missed")
    p.add_argument("--webhook", help="the webhook's name, for /missed")
    a = p.parse_args(argv)
    if not a.secret:
        p.error("--secret (or WEBHOOK_SECRET) is required")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    async def run() -> None:
        app = build_app(secret=a.secret.split(","), db_path=a.db, broker_http=a.broker_http, webhook=a.webhook)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, a.host, a.port)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]  # noqa: SLF001
        print(json.dumps({"ready": f"http://{a.host}:{port}/hook"}), flush=True)
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        await stop.wait()
        await runner.cleanup()

    asyncio.run(run())
    return 0
