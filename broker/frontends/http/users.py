"""Users and tokens on the admin HTTP API (``halfmq user ... --http URL`` and ``halfmq
token ...`` use these). Every route needs ``admin *`` (see :mod:`.guard`); changes take
effect at once in the running broker.

Routes
------
- ``GET /api/users`` — users and their grants (never a verifier)
- ``POST /api/users`` ``{"user", "password"}`` (or ``"verifier"``) — add a user
- ``POST /api/users/{user}/password`` ``{"password"}`` — a new password
- ``POST /api/users/{user}/remove`` — remove a user and its tokens
- ``POST /api/users/{user}/grant`` and ``.../revoke`` ``{"right", "topic", "group"}``
- ``GET /api/tokens`` — tokens (id, user, created; never the secret)
- ``POST /api/tokens`` ``{"user"}`` — a new token, shown once: ``{"token", "id", "user"}``
- ``POST /api/tokens/{id}/revoke``
- ``GET /api/access-keys`` — gRPC access keys (key, user, created; never the secret)
- ``POST /api/access-keys`` ``{"user"}`` — a new access key and secret key for RocketMQ 5
  clients, shown once: ``{"access_key", "secret_key", "user", "created"}``
- ``POST /api/access-keys/{key}/revoke``
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aiohttp import web

from broker.security.directory import DirectoryError

if TYPE_CHECKING:
    from broker.security.directory import UserDirectory

__all__ = ["user_routes"]


async def _body(req: web.Request) -> dict[str, Any]:
    try:
        body = await req.json()
    except ValueError:
        raise DirectoryError("the request body must be a JSON object") from None
    if not isinstance(body, dict):
        raise DirectoryError("the request body must be a JSON object")
    return body


def _str(body: dict[str, Any], key: str, *, optional: bool = False) -> Any:
    value = body.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise DirectoryError(f"{key!r} must be a string")
    return value


def user_routes(directory: UserDirectory) -> web.RouteTableDef:
    """The routes above, acting on ``directory``."""
    routes = web.RouteTableDef()

    async def run(action: Any) -> web.Response:
        try:
            return web.json_response(await action())
        except DirectoryError as exc:
            return web.json_response({"error": str(exc)}, status=exc.status)

    @routes.get("/api/users")
    async def list_users(_req: web.Request) -> web.Response:
        return web.json_response({"users": directory.list_users()})

    @routes.post("/api/users")
    async def add_user(req: web.Request) -> web.Response:
        async def act() -> Any:
            body = await _body(req)
            name = _str(body, "user")
            verifier = _str(body, "verifier", optional=True)
            if verifier is not None:
                user = await directory.add_user_verifier(name, verifier)
            else:
                user = await directory.add_user(name, _str(body, "password"))
            return user.describe()
        return await run(act)

    @routes.post("/api/users/{user}/password")
    async def password(req: web.Request) -> web.Response:
        async def act() -> Any:
            await directory.set_password(req.match_info["user"], _str(await _body(req), "password"))
            return {"user": req.match_info["user"], "password": "changed"}
        return await run(act)

    @routes.post("/api/users/{user}/remove")
    async def remove(req: web.Request) -> web.Response:
        async def act() -> Any:
            await directory.remove_user(req.match_info["user"])
            return {"removed": req.match_info["user"]}
        return await run(act)

    async def change_grant(req: web.Request, revoke: bool) -> web.Response:
        async def act() -> Any:
            body = await _body(req)
            args = (req.match_info["user"], _str(body, "right"), _str(body, "topic"),
                    _str(body, "group", optional=True))
            if revoke:
                await directory.revoke(*args)
            else:
                await directory.grant(*args)
            return directory.state.users[args[0]].describe()
        return await run(act)

    @routes.post("/api/users/{user}/grant")
    async def grant(req: web.Request) -> web.Response:
        return await change_grant(req, False)

    @routes.post("/api/users/{user}/revoke")
    async def revoke(req: web.Request) -> web.Response:
        return await change_grant(req, True)

    @routes.get("/api/tokens")
    async def list_tokens(_req: web.Request) -> web.Response:
        return web.json_response({"tokens": directory.list_tokens()})

    @routes.post("/api/tokens")
    async def create_token(req: web.Request) -> web.Response:
        async def act() -> Any:
            text, token = await directory.create_token(_str(await _body(req), "user"))
            return {"token": text, **token.describe()}
        return await run(act)

    @routes.post("/api/tokens/{token_id}/revoke")
    async def revoke_token(req: web.Request) -> web.Response:
        async def act() -> Any:
            await directory.revoke_token(req.match_info["token_id"])
            return {"revoked": req.match_info["token_id"]}
        return await run(act)

    @routes.get("/api/access-keys")
    async def list_keys(_req: web.Request) -> web.Response:
        return web.json_response({"access_keys": directory.list_access_keys()})

    @routes.post("/api/access-keys")
    async def create_key(req: web.Request) -> web.Response:
        async def act() -> Any:
            key = await directory.create_access_key(_str(await _body(req), "user"))
            return {**key.describe(), "secret_key": key.secret}
        return await run(act)

    @routes.post("/api/access-keys/{key}/revoke")
    async def revoke_key(req: web.Request) -> web.Response:
        async def act() -> Any:
            await directory.revoke_access_key(req.match_info["key"])
            return {"revoked": req.match_info["key"]}
        return await run(act)

    return routes
