"""The access-key signature of RocketMQ 5 clients, checked before an RPC reaches the engine.

How this works
--------------
Every RPC of an official client carries ``x-mq-date-time`` and an ``authorization`` header
``MQv2-HMAC-SHA1 Credential=<access key>, SignedHeaders=x-mq-date-time, Signature=<hex>``
where the signature is the HMAC-SHA1 of the date-time keyed by the secret key. The
broker recomputes it from the secret it holds for that access key, in constant time.

The service calls an :class:`Authenticator` (``check(metadata)``), a hook: without one
every request is accepted, as the native port with no users. :class:`AccessKeys` is the
implementation: it asks a lookup for ``(principal, secret)`` by access key — the place
where access keys map onto the broker's users (a user's gRPC access key and secret), —
refuses an unsigned request, an unknown key and a wrong signature with ``AuthError``
(answered UNAUTHORIZED), and returns the principal.

The date-time is the client's local time labelled ``Z`` (not UTC), so it cannot bound
a replay precisely; ``max_skew`` only refuses stamps more than a day off.

:class:`UserAccess` ties this to the broker's users: while no user exists every request is
served (as on the native port); once one does, a request must be signed with an access key
of a user (``halfmq user key-create NAME``), and every RPC is checked against that user's
rights, as the native front end checks its requests.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from hashlib import sha1
from typing import Any, Protocol

from protocol.errors import AuthError

__all__ = ["AccessKeys", "Authenticator", "UserAccess", "sign"]

_AUTH = re.compile(r"^MQv2-HMAC-SHA1 Credential=([^,\s]*), SignedHeaders=x-mq-date-time, Signature=([0-9a-fA-F]+)$")


class Authenticator(Protocol):
    """Checks the credentials of one RPC's metadata; raises ``AuthError``."""

    def check(self, metadata: Mapping[str, str]) -> str:
        """The principal the request acts as."""
        ...


def sign(secret: str, date_time: str) -> str:
    """The signature a client sends: hex HMAC-SHA1 of ``date_time`` keyed by ``secret``."""
    return hmac.new(secret.encode(), date_time.encode(), sha1).hexdigest()


class AccessKeys:
    """Checks signatures against ``lookup(access_key) -> (principal, secret) | None``."""

    def __init__(self, lookup: Callable[[str], tuple[str, str] | None], *,
                 max_skew: timedelta = timedelta(hours=26), clock: Callable[[], datetime] = datetime.now) -> None:
        self.lookup = lookup
        self.max_skew = max_skew
        self.clock = clock

    def check(self, metadata: Mapping[str, str]) -> str:
        """The principal of a correctly signed request; ``AuthError`` otherwise."""
        header = metadata.get("authorization", "")
        m = _AUTH.match(header)
        if m is None or not m.group(1):
            raise AuthError("this broker requires signed requests: configure the client's Credentials "
                            "with an access key and secret")
        ak, signature = m.groups()
        found = self.lookup(ak)
        date_time = metadata.get("x-mq-date-time", "")
        if found is None:
            raise AuthError(f"unknown access key {ak!r}")
        principal, secret = found
        if not hmac.compare_digest(sign(secret, date_time), signature.lower()):
            raise AuthError(f"wrong signature for access key {ak!r}")
        try:
            stamp = datetime.strptime(date_time, "%Y%m%dT%H%M%SZ")
        except ValueError:
            raise AuthError(f"malformed x-mq-date-time {date_time!r}") from None
        if abs(self.clock() - stamp) > self.max_skew:
            raise AuthError(f"x-mq-date-time {date_time!r} is too far from the broker's clock")
        return principal


class UserAccess:
    """Logins and rights of gRPC requests, from the broker's users (see the module docstring)."""

    def __init__(self, security: Any) -> None:
        self.security = security  # a broker.security.BrokerSecurity
        self.keys = AccessKeys(self._lookup)

    def _lookup(self, access_key: str) -> tuple[str, str] | None:
        key = self.security.state.access_keys.get(access_key)
        return None if key is None else (key.user, key.secret)

    def principal(self, metadata: Mapping[str, str]) -> str | None:
        """The user a request acts as (None while no user exists); ``AuthError`` for an
        unsigned or wrongly signed request once users exist."""
        if not self.security.login_required:
            return None
        return self.keys.check(metadata)

    def session(self, user: str | None) -> Any:
        """A per-client view of ``user``'s rights (``broker.security.state.SessionAccess``)."""
        return self.security.session(user)

    def check(self, access: Any, what: str, *args: Any) -> None:
        """Raise ``AuthError`` unless ``access`` may do ``what`` ("send", "subscribe",
        "settle", "recall", "active") with ``args`` (as ``BrokerSecurity.check_*``)."""
        getattr(self.security, f"check_{what}")(access, *args)
