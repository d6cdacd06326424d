"""Credentials and TLS for a client connection (both SDKs and the CLI).

How this works
--------------
``credentials(user, password)`` takes the arguments or, where one is None, the
environment (``HALFMQ_USER``, ``HALFMQ_PASSWORD``). ``tls_context(tls)`` turns the SDKs'
``tls=`` argument into an ``ssl.SSLContext``: True checks the broker's certificate
against the system's CAs, a context is used as given. ``ClientLogin`` is the client's
side of the SCRAM-SHA-256 exchange (``scramp`` does the protocol): the HELLO carries
``first()``, the broker's reply goes to ``final()``, whose message the AUTH frame
carries, and ``verify()`` checks the broker's last message, which proves that the broker
knows this user's verifier (a broker that does not is not the one we meant).
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping

from scramp import ScramClient, ScramException  # type: ignore[import-untyped]

from protocol.errors import AuthError

__all__ = ["credentials", "tls_context", "ClientLogin", "MECHANISM", "USER_ENV", "PASSWORD_ENV"]

MECHANISM = "SCRAM-SHA-256"
USER_ENV = "HALFMQ_USER"
PASSWORD_ENV = "HALFMQ_PASSWORD"


def credentials(user: str | None, password: str | None,
                env: Mapping[str, str] | None = None) -> tuple[str, str] | None:
    """``(user, password)`` from the arguments or the environment, or None for none.
    Raises ``ValueError`` for a user without a password or a password without a user."""
    environ = os.environ if env is None else env
    user = user if user is not None else (environ.get(USER_ENV) or None)
    password = password if password is not None else (environ.get(PASSWORD_ENV) or None)
    if user is None and password is None:
        return None
    if not user or not password:
        raise ValueError(f"a login needs both a user and a password (user=/password= or {USER_ENV}/{PASSWORD_ENV})")
    return user, password


def tls_context(tls: bool | ssl.SSLContext | None) -> ssl.SSLContext | None:
    """The context for ``tls=``: None/False for plain TCP, True for the system's CAs."""
    if tls is None or tls is False:
        return None
    if tls is True:
        return ssl.create_default_context()
    if isinstance(tls, ssl.SSLContext):
        return tls
    raise TypeError(f"tls must be a bool or an ssl.SSLContext, not {type(tls).__name__}")


class ClientLogin:
    """One SCRAM-SHA-256 login as the client (see the module docstring)."""

    def __init__(self, user: str, password: str) -> None:
        self.user = user
        self._client = ScramClient([MECHANISM], user, password)

    def first(self) -> dict[str, str]:
        """The HELLO's ``auth`` map (the client-first message)."""
        return {"mechanism": MECHANISM, "message": self._client.get_client_first()}

    def final(self, reply_auth: object) -> dict[str, str]:
        """The AUTH frame's payload for the HELLO reply's ``auth`` map (server-first)."""
        message = reply_auth.get("message") if isinstance(reply_auth, dict) else None
        try:
            self._client.set_server_first(message)
            return {"message": self._client.get_client_final()}
        except (ScramException, TypeError, AttributeError) as exc:
            raise AuthError(f"the broker's login reply is not valid SCRAM: {exc}") from None

    def verify(self, reply_auth: object) -> None:
        """Check the broker's server-final message; ``AuthError`` if it does not prove
        that the broker knows this user's verifier."""
        message = reply_auth.get("message") if isinstance(reply_auth, dict) else None
        try:
            self._client.set_server_final(message)
        except (ScramException, TypeError, AttributeError) as exc:
            raise AuthError(f"the broker could not prove it knows user {self.user!r}: {exc}") from None
