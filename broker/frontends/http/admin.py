"""The admin HTTP API (aiohttp, JSON, plus the console web application) on ``--http-port``: for
people and tools, never the data plane.

Routes
------
- ``GET /`` — the console, a web application over the routes below (see
  :mod:`broker.frontends.http.console`); ``GET /api/series`` — its per-second chart series
  of the last hour (see :mod:`broker.frontends.http.series`)
- ``GET /healthz`` — ``{"status": "ok", "broker_id": ...}``, no login needed
- ``GET /metrics`` — Prometheus text format (see :mod:`broker.frontends.http.metrics`)
- ``GET /api/stats`` — store counters (batches, records, writes, fsyncs, bundles,
  ``handed_off``: synced batches written by the writer thread while the loop went on,
  ``loop_disk_wait_ns``: time the event loop spent waiting for the disk in the
  fdatasyncs done on it) and messages sent
- ``GET /api/topics`` — topics with their queues and message counts, scheduled messages
  and the next one's delivery time
- ``POST /api/topics/{topic}`` (JSON ``{"queues": N}``, optional) — create a topic, also
  with ``--no-auto-create-topics``: 201 when created, 200 when it exists with that queue
  count (nothing changes), 409 when it exists with another or ``--max-topics`` is reached
- ``GET /api/groups`` — per group and topic: delivered, acked, in-flight, waiting retry,
  dead-lettered, lag
- ``GET /api/groups/{group}/members`` — a group's members: client id, address, client
  library, topic, tags, leases
- ``GET /api/clients`` — connected clients: client id, role, group, address, version
- ``GET /api/dlq/{group}/messages`` — a group's dead letters and when they died
- ``GET /api/messages/{msg_id}`` — the message and its state in each group (a scheduled
  one: its delivery time and whether it is scheduled, released or recalled)
- ``GET /api/messages/{msg_id}/trace`` — the life of the message in time order: stored,
  scheduled, transaction outcome (by whom), deliveries and their outcomes (``--trace``),
  retries, dead letters, resends (see :mod:`broker.engines.embedded.tracing`)
- ``POST /api/messages/{msg_id}/recall`` — cancel a scheduled message not yet due
- ``GET /api/scheduled?topic=T`` — scheduled messages: how many per topic, the next ones
- ``GET /api/messages?topic=T&key=K`` — messages of a topic carrying a business key
- ``POST /api/dlq/{group}/messages/{msg_id}/resend`` — back to its original topic for that group
- ``GET /api/transactions?state=prepared|abandoned|committed|rolled_back`` — half messages
- ``POST /api/transactions/{msg_id}/commit`` and ``.../rollback`` — resolve one by hand
- ``GET /api/groups/{group}/settings`` and ``POST`` (JSON ``{"fifo": bool, "max_attempts":
  int, "retry_delays": [seconds, ...] | "1s,5s"}``, each optional) — a group's settings
- ``/api/webhooks...`` — webhooks: list, add, show, remove, rotate a secret, one message's
  delivery (see :mod:`broker.webhooks.routes`)

Lists are paginated and bounded: ``?limit=N`` (default 100, at most 1,000) and
``?after=CURSOR``; the response's ``next`` is the cursor of the following page, or null.
Topics and groups page by name, transactions and messages by msg_id.

Every route is a thin translation onto the engine's admin calls. Who may call which route
(logins, rights, cross-site safety) is decided before it runs, in :mod:`.guard`; the
routes of users and tokens are in :mod:`.users`. With ``--tls-cert`` the API is served
over TLS.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import TYPE_CHECKING, Any

from aiohttp import web

from broker.config import parse_duration_list
from broker.core.lifecycle import TxState
from broker.frontends.admission import Admission
from broker.frontends.http.console import CONSOLE_SESSIONS, ConsoleSessions, console_routes
from broker.frontends.http.guard import guard_middleware
from broker.frontends.http.metrics import CONTENT_TYPE_LATEST as METRICS_CONTENT_TYPE
from broker.frontends.http.metrics import render_metrics
from broker.frontends.http.series import Series, run_sampler
from broker.frontends.http.users import user_routes
from broker.webhooks.routes import add_webhook_routes
from protocol import (
    DLQ_PREFIX,
    BadRequestError,
    BrokerUnavailableError,
    HalfMQError,
    LimitExceededError,
    MessageStateError,
    TransactionStateError,
    validate_name,
    validate_send_topic,
)

if TYPE_CHECKING:
    from broker.app import Broker

__all__ = ["start_admin_http", "AdminHTTP", "build_app", "PAGE_DEFAULT", "PAGE_MAX"]

PAGE_DEFAULT = 100
PAGE_MAX = 1000
#: Queues a topic created through ``POST /api/topics/{topic}`` may have, at most.
MAX_TOPIC_QUEUES = 1024


class _BadQuery(ValueError):
    """A query parameter the route cannot use (answered with HTTP 400)."""


def _limit(req: web.Request) -> int:
    """The ``limit`` query parameter (default ``PAGE_DEFAULT``, at most ``PAGE_MAX``)."""
    raw = req.query.get("limit", str(PAGE_DEFAULT))
    try:
        limit = int(raw)
    except ValueError:
        raise _BadQuery(f"limit must be an integer, got {raw!r}") from None
    if not 1 <= limit <= PAGE_MAX:
        raise _BadQuery(f"limit must be between 1 and {PAGE_MAX}")
    return limit


def _page(req: web.Request, items: list[dict[str, Any]], key: str, name: str) -> dict[str, Any]:
    """One page of ``items`` ordered by ``key``: ``{name: [...], "next": cursor | None}``."""
    limit = _limit(req)
    after = req.query.get("after")
    items = sorted(items, key=lambda item: item[key])
    if after is not None:
        items = [item for item in items if item[key] > after]
    page = items[:limit]
    return {name: page, "next": page[-1][key] if len(items) > limit else None}


def client_list(broker: Broker) -> list[dict[str, Any]]:
    """The connected native clients: client id, role, group, address, protocol version,
    client library, subscription, connected since (epoch ms)."""
    out = []
    for c in broker.native.connections:
        if c.client_id is None:
            continue  # not past its handshake
        sub = getattr(c, "_subscription", None)
        out.append({"client_id": c.client_id, "role": c.role, "group": c.group or (sub[1] if sub else None),
                    "address": c.peer, "version": getattr(c, "protocol_version", None),
                    "agent": getattr(c, "agent", None), "topic": sub[0] if sub else None,
                    "since": int(getattr(c, "since", 0) * 1000)})
    return sorted(out, key=lambda c: (c["role"] or "", c["client_id"]))


def build_app(broker: Broker) -> web.Application:
    """The aiohttp application serving the admin API of ``broker``."""
    engine: Any = broker.engine
    routes = web.RouteTableDef()

    def err(status: int, message: str) -> web.Response:
        return web.json_response({"error": message}, status=status)

    @routes.get("/healthz")
    async def healthz(_req: web.Request) -> web.Response:
        # (open to anyone, even with users: nothing about the machine, such as the data dir)
        return web.json_response({"status": "ok", "broker_id": broker.broker_id})

    @routes.get("/metrics")
    async def metrics(_req: web.Request) -> web.Response:
        body = render_metrics(broker)
        return web.Response(body=body, headers={"Content-Type": METRICS_CONTENT_TYPE})

    @routes.get("/api/stats")
    async def stats(_req: web.Request) -> web.Response:
        return web.json_response(await engine.admin_stats())

    @web.middleware
    async def bad_queries(req: web.Request, handler: Any) -> web.StreamResponse:
        try:
            return await handler(req)  # type: ignore[no-any-return]
        except _BadQuery as exc:
            return err(400, str(exc))

    @routes.get("/api/topics")
    async def topics(req: web.Request) -> web.Response:
        return web.json_response(_page(req, await engine.admin_topics(), "topic", "topics"))

    @routes.post("/api/topics/{topic}")
    async def create_topic(req: web.Request) -> web.Response:
        topic = req.match_info["topic"]
        try:
            validate_send_topic(topic)
            body = await req.json() if req.can_read_body else {}
            if not isinstance(body, dict) or set(body) - {"queues"}:
                raise BadRequestError("the body must be a JSON object with at most one key, queues")
            queues = body.get("queues")
            if queues is not None and (type(queues) is not int or not 1 <= queues <= MAX_TOPIC_QUEUES):
                raise BadRequestError(f"queues must be an integer from 1 to {MAX_TOPIC_QUEUES}, got {queues!r}")
            out = await engine.admin_create_topic(topic, queues)
        except ValueError as exc:  # a body that is not JSON
            return err(400, f"malformed body: {exc}")
        except LimitExceededError as exc:
            return err(409, str(exc))
        except BrokerUnavailableError as exc:
            return err(503, str(exc))
        except HalfMQError as exc:
            return err(400, str(exc))
        if queues is not None and out["queues"] != queues:
            return err(409, f"topic {topic!r} exists with {out['queues']} queues; "
                            "the queue count of a topic does not change")
        return web.json_response(out, status=201 if out["created"] else 200)

    @routes.get("/api/groups")
    async def groups(req: web.Request) -> web.Response:
        return web.json_response(_page(req, await engine.admin_groups(), "group", "groups"))

    @routes.get("/api/groups/{group}/members")
    async def members(req: web.Request) -> web.Response:
        group = req.match_info["group"]
        found = await engine.admin_members(group) if hasattr(engine, "admin_members") else None
        if found is None:
            return err(404, f"no consumer group {group}")
        return web.json_response({"group": group, "members": found})

    @routes.get("/api/clients")
    async def clients(_req: web.Request) -> web.Response:
        return web.json_response({"clients": client_list(broker)})

    @routes.get("/api/dlq/{group}/messages")
    async def dlq(req: web.Request) -> web.Response:
        group = req.match_info["group"]
        if not hasattr(engine, "admin_dlq"):
            return err(501, "this engine does not list dead letters")
        try:
            found = await engine.admin_dlq(group, PAGE_MAX * 10)
        except HalfMQError as exc:
            return err(400, str(exc))
        return web.json_response(_page(req, found, "msg_id", "messages"))

    @routes.get("/api/groups/{group}/settings")
    async def group_settings(req: web.Request) -> web.Response:
        group = req.match_info["group"]
        try:
            validate_name(group, "group")
        except HalfMQError as exc:
            return err(400, str(exc))
        return web.json_response(await engine.admin_group_settings(group))

    @routes.post("/api/groups/{group}/settings")
    async def set_group_settings(req: web.Request) -> web.Response:
        group = req.match_info["group"]
        try:
            validate_name(group, "group")
            body = await req.json() if req.can_read_body else {}
            if not isinstance(body, dict) or set(body) - {"fifo", "max_attempts", "retry_delays"}:
                raise BadRequestError("the body must be a JSON object with fifo, max_attempts, retry_delays")
            fifo, attempts, delays = body.get("fifo"), body.get("max_attempts"), body.get("retry_delays")
            if fifo is not None and type(fifo) is not bool:
                raise BadRequestError("fifo must be true or false")
            if attempts is not None and type(attempts) is not int:
                raise BadRequestError("max_attempts must be an integer")
            if delays is not None:
                try:
                    delays = list(parse_duration_list(delays))
                except ValueError as exc:
                    raise BadRequestError(f"retry_delays: {exc}") from None
            out = await engine.admin_set_group_settings(group, fifo=fifo, max_attempts=attempts, retry_delays=delays)
        except ValueError as exc:  # a body that is not JSON
            return err(400, f"malformed body: {exc}")
        except HalfMQError as exc:
            return err(400, str(exc))
        return web.json_response(out)

    @routes.get("/api/messages/{msg_id}")
    async def message(req: web.Request) -> web.Response:
        msg_id = req.match_info["msg_id"]
        body = await engine.admin_message(msg_id)
        if body is None:
            return err(404, f"no message {msg_id}")
        return web.json_response(body)

    @routes.get("/api/messages/{msg_id}/trace")
    async def trace(req: web.Request) -> web.Response:
        msg_id = req.match_info["msg_id"]
        body = await engine.admin_trace(msg_id) if hasattr(engine, "admin_trace") else None
        if body is None:
            return err(404, f"no message {msg_id}")
        return web.json_response(body)

    @routes.get("/api/messages")
    async def by_key(req: web.Request) -> web.Response:
        topic = req.query.get("topic")
        key = req.query.get("key")
        if not topic or not key:
            return err(400, "query parameters topic and key are required")
        found = await engine.admin_find(topic, key, PAGE_MAX * 10)
        return web.json_response(_page(req, found, "msg_id", "messages"))

    @routes.post("/api/messages/{msg_id}/recall")
    async def recall(req: web.Request) -> web.Response:
        msg_id = req.match_info["msg_id"]
        try:
            await engine.admin_recall(msg_id)
        except MessageStateError as exc:
            return err(404 if str(exc).startswith("no message") else 409, str(exc))
        return web.json_response({"msg_id": msg_id, "state": "RECALLED"})

    @routes.get("/api/scheduled")
    async def scheduled(req: web.Request) -> web.Response:
        topic = req.query.get("topic") or None
        return web.json_response(await engine.admin_scheduled(topic, _limit(req)))

    @routes.post("/api/dlq/{group}/messages/{msg_id}/resend")
    async def resend(req: web.Request) -> web.Response:
        group, msg_id = req.match_info["group"], req.match_info["msg_id"]
        try:
            await engine.admin_resend(group, msg_id)
        except KeyError:
            return err(404, f"message {msg_id} is not in {DLQ_PREFIX}{group}")
        except HalfMQError as exc:
            return err(400, str(exc))
        return web.json_response({"resent": msg_id, "group": group})

    @routes.get("/api/transactions")
    async def transactions(req: web.Request) -> web.Response:
        name = req.query.get("state", "prepared").upper()
        try:
            state = TxState[name]
        except KeyError:
            return err(400, "state must be prepared, committed, rolled_back or abandoned")
        return web.json_response(_page(req, await engine.admin_transactions(state), "msg_id", "transactions"))

    async def resolve(req: web.Request, state: TxState) -> web.Response:
        msg_id = req.match_info["msg_id"]
        try:
            await engine.admin_resolve(msg_id, state)
        except TransactionStateError as exc:
            return err(409, str(exc))
        return web.json_response({"msg_id": msg_id, "state": state.name})

    @routes.post("/api/transactions/{msg_id}/commit")
    async def commit(req: web.Request) -> web.Response:
        return await resolve(req, TxState.COMMITTED)

    @routes.post("/api/transactions/{msg_id}/rollback")
    async def rollback(req: web.Request) -> web.Response:
        return await resolve(req, TxState.ROLLED_BACK)

    add_webhook_routes(routes, broker.webhooks, page=_page)

    sessions = ConsoleSessions()
    series = Series()
    app = web.Application(middlewares=[guard_middleware(broker), bad_queries])  # type: ignore[list-item]
    app[CONSOLE_SESSIONS] = sessions
    app.add_routes(console_routes(broker, sessions, series))
    app.add_routes(routes)
    if hasattr(engine, "metrics_snapshot"):
        async def sampler(app: web.Application) -> Any:
            task = asyncio.get_running_loop().create_task(run_sampler(series, engine.metrics_snapshot),
                                                          name="halfmq-console-series")
            yield
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

        app.cleanup_ctx.append(sampler)
    app.add_routes(user_routes(broker.security.directory))
    return app


class AdminHTTP:
    """The admin API's listening socket and its aiohttp runner; ``cleanup()`` stops both."""

    def __init__(self, runner: web.AppRunner, admission: Admission) -> None:
        self.runner = runner
        self.admission = admission

    async def cleanup(self) -> None:
        """Stop accepting, drop TLS handshakes under way, close the connections."""
        self.admission.close()
        await self.runner.cleanup()


def _http_refusal(limit_option: str) -> bytes:
    body = json.dumps({"error": f"too many connections to the admin API ({limit_option})"}).encode()
    return (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)) + body


async def start_admin_http(broker: Broker, host: str, port: int) -> tuple[AdminHTTP, int]:
    """Start the admin API; returns what stops it (``cleanup()``) and the bound port.

    Its connections go through an :class:`~broker.frontends.admission.Admission`: at most
    ``--max-http-connections`` at once, TLS handshakes included (a handshake must end within
    10 s); one more gets a 503 (without TLS) and is closed."""
    runner = web.AppRunner(build_app(broker), access_log=None)
    await runner.setup()
    handlers = runner.server
    assert handlers is not None
    admission = Admission(
        "admin HTTP port", make=handlers, served=lambda: len(handlers.connections),
        limit=lambda: broker.config.max_http_connections, option="--max-http-connections",
        tls=broker.security.tls, refusal=_http_refusal("--max-http-connections"))
    try:
        bound = await admission.start(host, port)
    except BaseException:
        await runner.cleanup()
        raise
    return AdminHTTP(runner, admission), bound
