"""The broker's side of one SCRAM-SHA-256 login (RFC 5802 / 7677), without I/O.

How this works
--------------
``ScramLogin(lookup, dummy_key)`` wraps ``scramp``'s server. ``first(client_first)`` reads
the client's first message (``n,,n=<user>,r=<client nonce>``), looks the user's verifier
up, and returns the server-first message (``r=<client nonce + fresh server nonce>,s=<salt>,
i=<iterations>``). ``final(client_final)`` checks the client's proof over the whole
exchange and returns the server-final message (``v=<server signature>``), with which the
client checks that the broker knows its verifier. A replayed client-final fails: the
proof covers the server nonce, which is new for every login.

An unknown user gets a made-up verifier (salt derived from the user name and the broker's
``dummy_key``), so the exchange runs to the end and fails exactly as a wrong password does:
the answer does not tell which users exist. Every failure raises ``AuthError`` with the
same message; ``reason`` keeps the detail for the broker's log.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable

from scramp import ScramException, ScramMechanism  # type: ignore[import-untyped]

from broker.security.users import ITERATIONS, MECHANISM, Verifier
from protocol.errors import AuthError

__all__ = ["ScramLogin", "LOGIN_FAILED"]

#: What a client is told when a login fails, whatever the reason.
LOGIN_FAILED = "authentication failed: unknown user or wrong password"

_MECH = ScramMechanism(MECHANISM)


class ScramLogin:
    """One login in progress: ``first()``, then ``final()`` (see the module docstring)."""

    def __init__(self, lookup: Callable[[str], Verifier | None], dummy_key: bytes) -> None:
        self._lookup = lookup
        self._dummy_key = dummy_key
        self.user: str | None = None
        self.known = False
        self.reason = ""
        self._server = _MECH.make_server(self._auth_info)

    def _auth_info(self, user: str) -> tuple[bytes, bytes, bytes, int]:
        self.user = user
        verifier = self._lookup(user)
        if verifier is not None:
            self.known = True
            return verifier.auth_info()
        seed = hmac.new(self._dummy_key, user.encode("utf-8", "replace"), hashlib.sha256).digest()
        return seed[:16], hashlib.sha256(seed).digest(), seed, ITERATIONS

    def first(self, client_first: object) -> str:
        """The server-first message for the client's first one; ``AuthError`` if malformed."""
        if not isinstance(client_first, str) or len(client_first) > 1024:
            self.reason = "malformed client-first message"
            raise AuthError(LOGIN_FAILED)
        try:
            self._server.set_client_first(client_first)
            return str(self._server.get_server_first())
        except ScramException as exc:
            self.reason = f"client-first refused: {exc}"
            raise AuthError(LOGIN_FAILED) from None

    def final(self, client_final: object) -> str:
        """The server-final message if the client's proof holds; ``AuthError`` otherwise."""
        if not isinstance(client_final, str) or len(client_final) > 1024:
            self.reason = "malformed client-final message"
            raise AuthError(LOGIN_FAILED)
        try:
            self._server.set_client_final(client_final)
            out = str(self._server.get_server_final())
        except ScramException as exc:
            self.reason = "unknown user" if not self.known else f"wrong password ({exc})"
            raise AuthError(LOGIN_FAILED) from None
        if not self.known:  # a made-up verifier can only fail; never let it pass
            self.reason = "unknown user"
            raise AuthError(LOGIN_FAILED)
        return out
