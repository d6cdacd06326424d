"""The console: a web application on the admin HTTP port (``GET /``) for operators.

How this works
--------------
``GET /`` serves one HTML shell; the application itself (``console_static/app.js``, a
small canvas chart drawer in ``chart.js``, ``app.css``) ships in this package and is served
from ``/console/static/`` — no CDN, nothing fetched from elsewhere. The application reads
the JSON routes of the admin API (topics, groups and their members, message search and
trace, dead letters, transactions, clients) and ``GET /api/series``: per-second series of
the last hour kept in memory (:mod:`.series`) for its charts. Everything it shows goes into
the page as text (never as HTML), so a topic name or a key cannot inject markup.

Logins: while the broker has no users the console is open, like the API. Once users exist,
``GET /`` without a login sends the browser to ``/console/login``; a successful login
(``POST /console/login`` with a JSON body, throttled like every other login) sets an
HttpOnly, SameSite=Strict session cookie, and the shell carries the session's CSRF token.
Requests made with the cookie act as that user with its rights at that moment (``read``
shows, ``admin`` may act: the buttons of a read-only user are not shown, and the API
refuses them anyway), and every state change made with the cookie is a POST that must
carry the token in ``X-CSRF-Token`` (:mod:`.guard` checks it). Sessions live in memory
(a restart logs everyone out) and end after ``SESSION_IDLE`` seconds unused or at logout.
"""

from __future__ import annotations

import html
import json
import logging
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from broker.app import Broker
    from broker.frontends.http.series import Series

log = logging.getLogger("halfmq.broker")

__all__ = ["ConsoleSessions", "ConsoleSession", "console_routes", "SESSION_COOKIE", "CSRF_TOKEN_HEADER",
           "STATIC_DIR", "SESSION_IDLE", "CONSOLE_SESSIONS"]

#: The application's files (shipped as package data).
STATIC_DIR = Path(__file__).with_name("console_static")
_TYPES = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
#: The session cookie's name.
SESSION_COOKIE = "halfmq_console"
#: Header carrying the session's CSRF token on every POST made with the cookie.
CSRF_TOKEN_HEADER = "X-CSRF-Token"
#: A session unused this long (seconds) ends.
SESSION_IDLE = 8 * 3600
#: Sessions held at most (the oldest go first).
MAX_SESSIONS = 10_000
#: ``app[CONSOLE_SESSIONS]``: the sessions, read by the guard.
CONSOLE_SESSIONS = web.AppKey("console_sessions", object)


@dataclass(slots=True)
class ConsoleSession:
    """One browser's login: the user it acts as and its CSRF token."""

    user: str
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    last_used: float = field(default_factory=time.monotonic)


class ConsoleSessions:
    """Console logins by cookie value (in memory, bounded, idle ones expire)."""

    def __init__(self, idle: float = SESSION_IDLE) -> None:
        self.idle = idle
        self._by_token: OrderedDict[str, ConsoleSession] = OrderedDict()

    def create(self, user: str) -> tuple[str, ConsoleSession]:
        """A new session of ``user``: ``(cookie value, session)``."""
        while len(self._by_token) >= MAX_SESSIONS:
            self._by_token.popitem(last=False)
        token = secrets.token_urlsafe(32)
        session = self._by_token[token] = ConsoleSession(user)
        return token, session

    def get(self, token: str | None) -> ConsoleSession | None:
        """The live session of a cookie value (its idle time starts again), or None."""
        if not token:
            return None
        session = self._by_token.get(token)
        if session is None:
            return None
        now = time.monotonic()
        if now - session.last_used > self.idle:
            del self._by_token[token]
            return None
        session.last_used = now
        self._by_token.move_to_end(token)
        return session

    def drop(self, token: str | None) -> None:
        """End a session (logout)."""
        if token:
            self._by_token.pop(token, None)


def _shell(title: str, user: str | None, admin: bool, csrf: str, open_broker: bool) -> str:
    boot = json.dumps({"user": user, "admin": admin, "csrf": csrf, "open": open_broker})
    return (
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>{html.escape(title)}</title>"
        "<link rel=\"stylesheet\" href=\"/console/static/app.css\">"
        f"<script id=\"boot\" type=\"application/json\">{html.escape(boot, quote=False)}</script>"
        "<script src=\"/console/static/chart.js\" defer></script>"
        "<script src=\"/console/static/app.js\" defer></script>"
        "</head><body><noscript>The console needs JavaScript; the same data is served as JSON under "
        "<a href=\"/api/topics\">/api/</a>.</noscript></body></html>"
    )


_LOGIN = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>halfmq: log in</title>
<link rel="stylesheet" href="/console/static/app.css"><script src="/console/static/login.js" defer></script></head>
<body class="login"><form id="login" class="card"><h1>halfmq console</h1>
<label>User <input name="user" autocomplete="username" required autofocus></label>
<label>Password <input name="password" type="password" autocomplete="current-password" required></label>
<button type="submit">Log in</button><p id="login-error" class="error" role="alert"></p></form></body></html>"""


def console_routes(broker: Broker, sessions: ConsoleSessions, series: Series) -> web.RouteTableDef:
    """The console's routes: the shell, its files, login and logout, the chart series."""
    routes = web.RouteTableDef()
    security = broker.security

    @routes.get("/")
    async def shell(req: web.Request) -> web.Response:
        from broker.frontends.http.guard import USER_KEY

        session = sessions.get(req.cookies.get(SESSION_COOKIE))
        user = session.user if session is not None else \
            req.get(USER_KEY) if USER_KEY is not None else None  # type: ignore[call-overload]
        rights = security.state.rights_of(user)  # type: ignore[arg-type]
        admin = bool(rights and rights.may_admin("*"))
        page = _shell(f"halfmq {broker.broker_id}", user, admin,  # type: ignore[arg-type]
                      session.csrf if session is not None else "", security.state.open)
        return web.Response(text=page, content_type="text/html",
                            headers={"Cache-Control": "no-store", "X-Frame-Options": "DENY",
                                     "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'"})

    @routes.get("/console/static/{name}")
    async def static(req: web.Request) -> web.StreamResponse:
        name = req.match_info["name"]
        path = STATIC_DIR / name
        if "/" in name or name.startswith(".") or path.suffix not in _TYPES or not path.is_file():
            raise web.HTTPNotFound()
        return web.Response(body=path.read_bytes(), content_type=_TYPES[path.suffix],
                            headers={"Cache-Control": "no-cache"})

    @routes.get("/console/login")
    async def login_page(_req: web.Request) -> web.Response:
        return web.Response(text=_LOGIN, content_type="text/html", headers={"X-Frame-Options": "DENY"})

    @routes.post("/console/login")
    async def login(req: web.Request) -> web.Response:
        peer = req.remote or "?"
        wait = security.throttle.wait_left(peer, time.monotonic())
        if wait > 0:
            return web.json_response({"error": f"too many failed logins: try again in {wait:.0f} s"}, status=429)
        origin = req.headers.get("Origin")
        if req.content_type != "application/json" or (origin is not None and origin != f"{req.scheme}://{req.host}"):
            return web.json_response({"error": "log in from the console's own page (a JSON body, same origin)"},
                                     status=403)
        try:
            body = await req.json()
            name, password = body["user"], body["password"]
            if not isinstance(name, str) or not isinstance(password, str):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            return web.json_response({"error": "send JSON {\"user\": ..., \"password\": ...}"}, status=400)
        found = security.state.check_basic(name, password)
        if found is None:
            wait = security.throttle.failed(peer, time.monotonic())
            log.warning("console: login failed for %r from %s (%d failures%s)", name, peer,
                        security.throttle.failures(peer), f"; next attempt in {wait:.0f} s" if wait else "")
            return web.json_response({"error": "unknown user or wrong password"}, status=401)
        token, _session = sessions.create(found.name)
        resp = web.json_response({"user": found.name})
        resp.set_cookie(SESSION_COOKIE, token, httponly=True, samesite="Strict", path="/",
                        secure=req.scheme == "https")
        return resp

    @routes.post("/console/logout")
    async def logout(req: web.Request) -> web.Response:
        if req.content_type != "application/json":
            return web.json_response({"error": "log out from the console's own page"}, status=403)
        sessions.drop(req.cookies.get(SESSION_COOKIE))
        resp = web.json_response({"logged_out": True})
        resp.del_cookie(SESSION_COOKIE, path="/")
        return resp

    @routes.get("/api/series")
    async def series_json(req: web.Request) -> web.Response:
        raw = req.query.get("last")
        last = int(raw) if raw and raw.isdigit() else None
        return web.json_response(series.to_json(last))

    return routes
