"""Who may do what on the admin HTTP API: logins, rights per route, cross-site safety.

How this works
--------------
One aiohttp middleware runs before every route but ``/healthz`` (left open for load
balancers and probes):

1. **Cross-site safety** for state changes sent as POST (the one changing method a
   browser sends cross-site without a CORS preflight; DELETE and PUT always need one,
   which this server never grants): a request whose
   ``Origin`` is not this server's own is refused, and the request must carry the header
   ``X-HalfMQ-Request`` (any value) or a JSON body (``Content-Type: application/json``):
   a browser cannot send either cross-site without a CORS preflight, which this server
   never grants (a cross-site form posts only ``text/plain``, ``multipart/form-data`` or
   ``application/x-www-form-urlencoded``). Or the request passes the CSRF hook
   ``app[CSRF_CHECK]`` (a callable ``(request) -> bool``, None today), which the
   console's own forms will use with a token of their page.
2. **Login.** While the broker has no users everything is open (the zero-setup default).
   Once users exist a request needs ``Authorization: Basic`` (user and password, checked
   against the stored verifier) or ``Authorization: Bearer <token>`` (``halfmq token
   create``), or the console's session cookie (see :mod:`.console`; a POST made with it
   must carry the session's CSRF token in ``X-CSRF-Token``); otherwise 401 (a browser
   asking for ``/`` is sent to the console's login page). The console's login, logout and
   static files are open. Failures are logged at WARNING with the peer's address and
   count against it in the broker's login throttle (429 while it must wait).
3. **Rights** (``broker.security.rights``): GET needs ``read`` (or ``admin``), POST needs
   ``admin`` (so do the lists of users and tokens), on the topic the request concerns — the message's topic for routes with a
   ``{msg_id}``, the ``topic`` query parameter for a search — and on ``*`` for everything
   else (lists, stats, the console, users and tokens, routes added later). 403 otherwise.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

from broker.frontends.http.console import CONSOLE_SESSIONS, CSRF_TOKEN_HEADER, SESSION_COOKIE
from broker.security.rights import Rights
from broker.security.service import NEEDS_LOGIN

if TYPE_CHECKING:
    from broker.app import Broker

__all__ = ["guard_middleware", "CSRF_CHECK", "CSRF_HEADER", "USER_KEY"]

log = logging.getLogger("halfmq.broker")

#: Header a state-changing request must carry (any value), unless the CSRF hook passes it.
CSRF_HEADER = "X-HalfMQ-Request"
#: ``app[CSRF_CHECK]``: None, or ``(request) -> bool`` accepting a request without the header.
CSRF_CHECK = web.AppKey("csrf_check", object)
#: ``request[USER_KEY]``: the user a request acts as (None: anonymous, broker without users);
#: set where aiohttp has request keys (3.12 and later).
USER_KEY = web.RequestKey("halfmq_user", object) if hasattr(web, "RequestKey") else None

_OPEN_PATHS = frozenset({"/healthz", "/console/login", "/console/logout"})
#: The console's own files (nothing secret): served without a login, for the login page.
_OPEN_PREFIX = "/console/static/"
#: Reading these needs ``admin *`` too (who may log in is the admin's business).
_ADMIN_PATHS = ("/api/users", "/api/tokens", "/api/access-keys")
_MSG_ROUTES = ("/api/messages/{msg_id}", "/api/messages/{msg_id}/trace", "/api/messages/{msg_id}/recall", "/api/dlq/{group}/messages/{msg_id}/resend",
               "/api/transactions/{msg_id}/commit", "/api/transactions/{msg_id}/rollback")


def _error(status: int, message: str, **headers: str) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers or None)


def _cross_site_refusal(req: web.Request) -> str | None:
    """Why a state-changing request may come from another site (None: it cannot)."""
    origin = req.headers.get("Origin")
    if origin is not None and origin != f"{req.scheme}://{req.host}":
        return f"cross-site request from origin {origin!r} refused"
    if req.headers.get(CSRF_HEADER) or req.content_type == "application/json":
        return None
    check = req.app.get(CSRF_CHECK)
    if callable(check) and check(req):
        return None
    return (f"a state-changing request must carry the header {CSRF_HEADER} (any value) "
            "or a JSON body (Content-Type: application/json)")


def guard_middleware(broker: Broker) -> Any:
    """The middleware for ``broker``'s admin API (see the module docstring)."""
    security = broker.security
    state = security.state

    async def topic_of(req: web.Request) -> str:
        """The topic a request concerns, or ``*`` (broker-wide, or unknown)."""
        canonical = req.match_info.route.resource.canonical if req.match_info.route.resource else ""
        if canonical in _MSG_ROUTES:
            found = await broker.engine.admin_message(req.match_info["msg_id"])  # type: ignore[attr-defined]
            return str(found["topic"]) if found else "*"
        if canonical == "/api/messages" and req.query.get("topic"):
            return req.query["topic"]
        return "*"

    def login(req: web.Request) -> tuple[str | None, Rights | None] | web.Response:
        if state.open:
            return None, state.rights_of(None)
        peer = req.remote or "?"
        sessions = req.app.get(CONSOLE_SESSIONS)
        if "Authorization" not in req.headers and sessions is not None and SESSION_COOKIE in req.cookies:
            session = sessions.get(req.cookies[SESSION_COOKIE])  # type: ignore[attr-defined]
            if session is not None:
                if req.method == "POST" and not hmac.compare_digest(
                        req.headers.get(CSRF_TOKEN_HEADER, ""), session.csrf):
                    return _error(403, f"a console request that changes something must carry the page's "
                                       f"{CSRF_TOKEN_HEADER}")
                return session.user, state.rights_of(session.user)
        wait = security.throttle.wait_left(peer, time.monotonic())
        if wait > 0:
            return _error(429, f"too many failed logins from {peer}: try again in {wait:.0f} s",
                          **{"Retry-After": str(int(wait) + 1)})
        header = req.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        user = None
        name = "?"
        if scheme.lower() == "basic":
            try:
                name, _, password = base64.b64decode(value, validate=True).decode("utf-8").partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return _error(400, "malformed Basic credentials")
            user = state.check_basic(name, password)
        elif scheme.lower() == "bearer":
            name = "token"
            user = state.check_bearer(value.strip())
        elif req.method == "GET" and req.path == "/" and "text/html" in req.headers.get("Accept", ""):
            raise web.HTTPFound("/console/login")  # a browser: the console's login page
        else:
            return _error(401, NEEDS_LOGIN.replace("give user= and password= (or set HALFMQ_USER "
                                                   "and HALFMQ_PASSWORD)", "HTTP Basic or a bearer token"),
                          **{"WWW-Authenticate": 'Basic realm="halfmq", charset="UTF-8"'})
        if user is None:
            wait = security.throttle.failed(peer, time.monotonic())
            log.warning("admin API: authentication failed for %r from %s (%d failures%s)", name, peer,
                        security.throttle.failures(peer), f"; next attempt in {wait:.0f} s" if wait else "")
            return _error(401, "authentication failed: unknown user, wrong password or revoked token",
                          **{"WWW-Authenticate": 'Basic realm="halfmq", charset="UTF-8"'})
        return user.name, user.rights

    @web.middleware
    async def guard(req: web.Request, handler: Any) -> web.StreamResponse:
        if req.path in _OPEN_PATHS or req.path.startswith(_OPEN_PREFIX):
            return await handler(req)  # type: ignore[no-any-return]
        changing = req.method not in ("GET", "HEAD", "OPTIONS")
        acting = changing or req.path.startswith(_ADMIN_PATHS)
        if req.method == "POST":  # the one changing method a cross-site page can send unasked
            refusal = _cross_site_refusal(req)
            if refusal is not None:
                return _error(403, refusal)
        who = login(req)
        if isinstance(who, web.Response):
            return who
        user, rights = who
        if rights is None:
            return _error(403, "no rights")
        topic = "*"
        if not (rights.may_admin("*") if acting else rights.may_read("*")):
            topic = await topic_of(req)
        allowed = rights.may_admin(topic) if acting else rights.may_read(topic)
        if not allowed:
            what = "act on" if acting else "read"
            scope = "everything (a grant on *)" if topic == "*" else f"topic {topic!r}"
            return _error(403, f"user {user!r} may not {what} {scope}: needs the "
                               f"{'admin' if acting else 'read'} right")
        if USER_KEY is not None:
            req[USER_KEY] = user
        return await handler(req)  # type: ignore[no-any-return]

    return guard
