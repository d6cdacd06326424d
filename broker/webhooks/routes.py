"""The webhook routes of the admin HTTP API (a thin translation onto :class:`Webhooks`).

Routes
------
- ``GET /api/webhooks`` — every webhook (paginated by name, as the other lists)
- ``POST /api/webhooks`` — add one: JSON ``{"name", "topic", "url", "secret", "tags",
  "max_attempts", "timeout", "concurrency", "start", "breaker_failures",
  "breaker_cooldown", "fifo"}`` (name, topic and url required); 201 with the webhook, 400 for a
  bad field, 409 if the name exists or the broker holds too many
- ``GET /api/webhooks/{name}`` — its definition (never the secret) and state
- ``DELETE /api/webhooks/{name}`` — remove it
- ``POST /api/webhooks/{name}/rotate`` — ``{"secret": S, "overlap": "24h"}``: sign with S
  (generated if absent); the old secret keeps signing for the overlap
- ``GET /api/webhooks/{name}/messages/{msg_id}`` — whether and when that message was
  delivered: state, attempts, last status or error, delivered at

A webhook's dead letters are resent with the DLQ route of every group:
``POST /api/dlq/webhook:{name}/messages/{msg_id}/resend``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from broker.config import parse_duration
from broker.webhooks.service import WebhookConflictError
from protocol.errors import HalfMQError

if TYPE_CHECKING:
    from broker.webhooks.service import Webhooks

__all__ = ["add_webhook_routes"]

Page = Callable[[web.Request, list[dict[str, Any]], str, str], dict[str, Any]]


def _err(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


async def _json_body(req: web.Request) -> Any:
    try:
        return await req.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise web.HTTPBadRequest(text=json.dumps({"error": f"the body must be JSON: {exc}"}),
                                 content_type="application/json") from None


def add_webhook_routes(routes: web.RouteTableDef, webhooks: Webhooks, *, page: Page) -> None:
    """Add the webhook routes to ``routes``; ``page`` paginates a list as the API does."""

    @routes.get("/api/webhooks")
    async def list_webhooks(req: web.Request) -> web.Response:
        return web.json_response(page(req, webhooks.list(), "name", "webhooks"))

    @routes.post("/api/webhooks")
    async def add(req: web.Request) -> web.Response:
        fields = await _json_body(req)
        try:
            return web.json_response(await webhooks.add(fields), status=201)
        except WebhookConflictError as exc:
            return _err(409, str(exc))
        except HalfMQError as exc:
            return _err(400, str(exc))

    @routes.get("/api/webhooks/{name}")
    async def show(req: web.Request) -> web.Response:
        name = req.match_info["name"]
        try:
            return web.json_response(webhooks.show(name))
        except KeyError:
            return _err(404, f"no webhook {name}")

    @routes.delete("/api/webhooks/{name}")
    async def remove(req: web.Request) -> web.Response:
        name = req.match_info["name"]
        try:
            await webhooks.remove(name)
        except KeyError:
            return _err(404, f"no webhook {name}")
        return web.json_response({"removed": name})

    @routes.post("/api/webhooks/{name}/rotate")
    async def rotate(req: web.Request) -> web.Response:
        name = req.match_info["name"]
        body = await _json_body(req) if req.can_read_body else {}
        if not isinstance(body, dict) or set(body) - {"secret", "overlap"}:
            return _err(400, 'the body must be {"secret": ..., "overlap": ...}')
        try:
            overlap = parse_duration(body.get("overlap", "24h"))
            return web.json_response(await webhooks.rotate(name, body.get("secret"), overlap=overlap))
        except KeyError:
            return _err(404, f"no webhook {name}")
        except (HalfMQError, ValueError) as exc:
            return _err(400, str(exc))

    @routes.get("/api/webhooks/{name}/messages/{msg_id}")
    async def delivery(req: web.Request) -> web.Response:
        name, msg_id = req.match_info["name"], req.match_info["msg_id"]
        try:
            found = await webhooks.delivery(name, msg_id)
        except KeyError:
            return _err(404, f"no webhook {name}")
        if found is None:
            return _err(404, f"no message {msg_id}")
        return web.json_response(found)
