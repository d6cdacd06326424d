"""The broker's security: users loaded at start, logins on the native port, rights checks
for the front ends, protected mode, TLS.

How this works
--------------
``BrokerSecurity`` is made by the ``Broker`` with its engine (whose settings keep users
and tokens) and configuration. ``start()`` loads the users (engine settings plus the
optional ``--users-file``) and applies *protected mode*: on a ``--host`` other than
loopback, with no users, the broker refuses to start unless ``--allow-anonymous``.

The front ends call it before the engine sees a request:

- ``login_begin`` / ``login_end``: the SCRAM-SHA-256 exchange of the native handshake
  (docs/protocol.md). Failures are logged at WARNING with the peer's address and
  counted per address (:class:`~broker.security.throttle.LoginThrottle`).
- ``check_*``: one per operation (table in the README's "Security" section); each raises
  ``AuthError`` naming what was refused. Answers are cached per connection until the
  next change of users or grants.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import secrets
import ssl
import time
from typing import Any

from broker.security.directory import (
    AKEYS_PREFIX,
    TOKENS_PREFIX,
    USERS_PREFIX,
    SettingsStore,
    UserDirectory,
    load_users_file,
)
from broker.security.scram import ScramLogin
from broker.security.state import SecurityState, SessionAccess
from broker.security.throttle import LoginThrottle
from broker.security.tls import server_context
from broker.security.users import MECHANISM
from protocol.errors import AuthError

__all__ = ["BrokerSecurity", "is_loopback", "NEEDS_LOGIN"]

log = logging.getLogger("halfmq.broker")

#: What a client without credentials is told once users exist.
NEEDS_LOGIN = ("this broker requires a login: give user= and password= "
               "(or set HALFMQ_USER and HALFMQ_PASSWORD)")


def is_loopback(host: str) -> bool:
    """True if ``host`` listens on loopback only (``127.0.0.0/8``, ``::1``, ``localhost``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _ip_of(peer: str) -> str:
    return peer.rsplit(":", 1)[0] if ":" in peer else peer


class BrokerSecurity:
    """Users, logins and rights checks of one broker (see the module docstring)."""

    def __init__(self, settings: SettingsStore, config: Any) -> None:
        self.config = config
        self.state = SecurityState()
        self.directory = UserDirectory(settings, self.state)
        self.on_change = self.directory.on_change
        self.throttle = LoginThrottle()
        self._dummy_key = secrets.token_bytes(32)
        self._warned_at: dict[str, float] = {}
        self.tls: ssl.SSLContext | None = None
        self._reload: asyncio.Task[None] | None = None
        self._reload_again = False

    async def follow(self, engine: Any) -> None:
        """Reload users, grants and tokens whenever another broker on the same engine
        changes them (cluster mode: ``engine.settings_watch``; nothing for an engine that
        only this broker uses)."""
        watch = getattr(engine, "settings_watch", None)
        if watch is not None:
            await watch(self._setting_changed)

    def _setting_changed(self, key: str) -> None:
        if not key.startswith((USERS_PREFIX, TOKENS_PREFIX, AKEYS_PREFIX)):
            return
        if self._reload is not None and not self._reload.done():
            self._reload_again = True  # changes during a reload: one more after it
            return
        self._reload = asyncio.get_running_loop().create_task(self._reload_users())

    async def _reload_users(self) -> None:
        while True:
            self._reload_again = False
            try:
                await self.directory.load()
            except Exception:
                log.exception("reloading users after a change by another broker failed")
            if not self._reload_again:
                return

    async def start(self) -> None:
        """Load the TLS certificate and users; refuse an unprotected non-loopback broker.
        Raises ``ConfigError``."""
        from broker.config import ConfigError

        cfg = self.config
        if cfg.tls_cert:
            try:
                self.tls = server_context(cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"--tls-cert/--tls-key/--tls-client-ca: cannot load: {exc}") from None
        if cfg.users_file:
            try:
                self.directory.file_users = {u.name: u for u in load_users_file(cfg.users_file)}
            except (OSError, ValueError) as exc:
                raise ConfigError(f"--users-file: {exc}") from None
        await self.directory.load()
        if self.state.open and not is_loopback(cfg.host) and not cfg.allow_anonymous:
            raise ConfigError(
                f"protected mode: --host {cfg.host} is reachable from other machines and no user "
                f"exists, so anyone could send, consume and resolve transactions. Add a user first "
                f"(halfmq user add NAME --data-dir {cfg.data_dir}, then halfmq user grant ...), or "
                f"pass --allow-anonymous to serve everyone without credentials")
        if self.state.open and not is_loopback(cfg.host):
            log.warning("--allow-anonymous: serving clients on %s without credentials", cfg.host)
        if self.state.users and self.tls is None and not is_loopback(cfg.host):
            log.warning("users exist but TLS is off on %s: logins are safe (SCRAM), but messages "
                        "and admin API passwords (HTTP Basic) cross the network in clear; "
                        "set --tls-cert and --tls-key", cfg.host)

    @property
    def login_required(self) -> bool:
        """True once a user exists: every client must log in."""
        return not self.state.open

    def session(self, user: str | None) -> SessionAccess:
        """A new connection's view of the rights of ``user`` (None: anonymous)."""
        return SessionAccess(self.state, user)

    # -- the native login --------------------------------------------------------------

    def login_begin(self, peer: str, auth: Any) -> tuple[ScramLogin, dict[str, str]]:
        """Start a login from the HELLO's ``auth`` map; return the login and the reply's
        ``auth`` map (the server-first message). Raises ``AuthError`` (logged) if the
        client gave no credentials, is throttled, or sent a malformed first message."""
        ip = _ip_of(peer)
        if auth is None:
            self._warn(ip, "refusing %s: no credentials and users exist", peer)
            raise AuthError(NEEDS_LOGIN)
        wait = self.throttle.wait_left(ip, time.monotonic())
        if wait > 0:
            self._warn(ip, "refusing a login from %s: too many failed logins from %s (%d), %.0f s to wait",
                       peer, ip, self.throttle.failures(ip), wait)
            raise AuthError(f"too many failed logins from {ip}: try again in {wait:.0f} s")
        if not isinstance(auth, dict) or auth.get("mechanism") != MECHANISM:
            raise AuthError(f"unsupported authentication mechanism: this broker speaks {MECHANISM}")
        login = ScramLogin(self.state.verifier, self._dummy_key)
        try:
            server_first = login.first(auth.get("message"))
        except AuthError:
            self.login_failed(peer, login)
            raise
        return login, {"mechanism": MECHANISM, "message": server_first}

    def login_end(self, peer: str, login: ScramLogin, message: Any) -> dict[str, str]:
        """Check the client's final message; return the reply's ``auth`` map (server-final).
        Raises ``AuthError`` (logged, counted) if the proof does not hold."""
        try:
            return {"message": login.final(message)}
        except AuthError:
            self.login_failed(peer, login)
            raise

    def login_failed(self, peer: str, login: ScramLogin) -> None:
        """Log a failed login at WARNING and count it against the peer's address."""
        ip = _ip_of(peer)
        wait = self.throttle.failed(ip, time.monotonic())
        log.warning("authentication failed for user %r from %s: %s (%d failures from %s%s)",
                    login.user, peer, login.reason, self.throttle.failures(ip), ip,
                    f"; next attempt in {wait:.0f} s" if wait else "")

    def _warn(self, ip: str, fmt: str, *args: Any) -> None:
        """A WARNING, at most one a second per address (refusals can come fast)."""
        now = time.monotonic()
        if now - self._warned_at.get(ip, -1e9) >= 1.0:
            if len(self._warned_at) > 10_000:
                self._warned_at.clear()
            self._warned_at[ip] = now
            log.warning(fmt, *args)

    # -- rights checks (each raises AuthError) ------------------------------------------

    def check_producer_group(self, access: SessionAccess, group: str) -> None:
        """A producer HELLO announcing ``group`` (check-backs of that group come to it)."""
        rights = access.rights()
        if rights is None or not rights.may_announce_producer_group(group):
            raise AuthError(f"user {access.user!r} may not act as producer group {group!r} "
                            "(needs: publish TOPIC --group PATTERN)")

    def check_send(self, access: SessionAccess, topic: str, group: str | None, half: bool) -> None:
        """A SEND to ``topic`` (``half``: of half messages, as ``group``)."""
        key = ("h" if half else "p", topic)
        ok = access.allowed(key)
        if ok is None:
            rights = access.rights()
            ok = access.remember(key, rights is not None and rights.may_send(topic, group, half))
        if not ok:
            self._refused(access, f"publish to topic {topic!r}" + (f" as producer group {group!r}" if half else ""))

    def check_subscribe(self, access: SessionAccess, topic: str, group: str) -> None:
        """A SUBSCRIBE to ``topic`` as consumer ``group``."""
        rights = access.rights()
        if rights is None or not rights.may_subscribe(topic, group):
            self._refused(access, f"subscribe to topic {topic!r} as consumer group {group!r}")

    def check_settle(self, access: SessionAccess, group: str) -> None:
        """A SETTLE (ack / nack / change visibility by receipt handle) for consumer ``group``:
        the user must be allowed to consume as that group (on some topic)."""
        rights = access.rights()
        if rights is None or not rights.may_consume_as(group):
            self._refused(access, f"settle messages of consumer group {group!r}")

    def check_recall(self, access: SessionAccess) -> None:
        """A RECALL of a scheduled message, before the engine looks it up: the user must
        hold some publish right (the engine then asks for publish on the message's topic)."""
        rights = access.rights()
        if rights is None or not any(g.right == "publish" for g in rights.grants):
            self._refused(access, "recall scheduled messages (needs a publish right)")

    def check_active(self, access: SessionAccess) -> None:
        """Any other request (END_TX, ACK, ...): the client must still have some rights
        (a removed user, or an anonymous client once users exist, has none)."""
        if access.rights() is None:
            self._refused(access, "anything: " + (NEEDS_LOGIN if access.user is None else "no such user"))

    @staticmethod
    def _refused(access: SessionAccess, what: str) -> None:
        who = "an anonymous client" if access.user is None else f"user {access.user!r}"
        raise AuthError(f"{who} may not {what}")
