"""What the broker knows about users at this moment, and one connection's view of it.

How this works
--------------
``SecurityState`` holds the users and tokens (loaded from the engine's settings and the
users file, see :mod:`broker.security.directory`) and a ``version`` that changes with
every change, so a change made through the admin API applies to every connection at
once. With no users the broker is *open*: clients need no credentials and may do
everything (the zero-setup default on loopback, or ``--allow-anonymous``). Once a user
exists, every client must log in and what is not granted is refused.

``SessionAccess`` is one connection's (or HTTP request's) view: who logged in and the
answers already given, cached per ``version`` so a check on the hot path is one dict
lookup (the cache is bounded).
"""

from __future__ import annotations

from collections.abc import Iterable

from broker.security.rights import ALL_RIGHTS, Rights
from broker.security.users import AccessKey, Token, User, Verifier, check_password, parse_token

__all__ = ["SecurityState", "SessionAccess"]

_CACHE_MAX = 1024


class SecurityState:
    """Users and tokens in memory (see the module docstring). No I/O."""

    def __init__(self, users: Iterable[User] = (), tokens: Iterable[Token] = ()) -> None:
        self.users: dict[str, User] = {u.name: u for u in users}
        self.tokens: dict[str, Token] = {t.token_id: t for t in tokens}
        self.access_keys: dict[str, AccessKey] = {}
        self.version = 0
        self._basic_ok: dict[tuple[str, str], int] = {}  # (user, password) -> version checked

    def replace(self, users: Iterable[User], tokens: Iterable[Token], access_keys: Iterable[AccessKey] = ()) -> None:
        """Take a new set of users, tokens and access keys (after a change); bumps ``version``."""
        self.users = {u.name: u for u in users}
        self.tokens = {t.token_id: t for t in tokens}
        self.access_keys = {k.key_id: k for k in access_keys if k.user in self.users}
        self.version += 1
        self._basic_ok.clear()

    @property
    def open(self) -> bool:
        """True while no user exists: no credentials needed, everything allowed."""
        return not self.users

    def verifier(self, name: str) -> Verifier | None:
        """The verifier of user ``name``, or None if there is no such user."""
        user = self.users.get(name)
        return None if user is None else user.verifier

    def rights_of(self, user: str | None) -> Rights | None:
        """The rights of ``user`` (None: an anonymous client), or None if it has none at
        all (an unknown user; anonymous once users exist)."""
        if user is None:
            return ALL_RIGHTS if self.open else None
        found = self.users.get(user)
        return None if found is None else found.rights

    def check_basic(self, name: str, password: str) -> User | None:
        """The user if ``password`` is its password (HTTP Basic), else None. Successful
        checks are remembered until the next change, so PBKDF2 runs once per login."""
        user = self.users.get(name)
        if user is None:
            return None
        key = (name, password)
        if self._basic_ok.get(key) == self.version:
            return user
        if not check_password(user.verifier, password):
            return None
        if len(self._basic_ok) >= _CACHE_MAX:
            self._basic_ok.clear()
        self._basic_ok[key] = self.version
        return user

    def check_bearer(self, text: str) -> User | None:
        """The owner of the bearer token ``text`` if it is valid, else None."""
        parsed = parse_token(text)
        if parsed is None:
            return None
        token = self.tokens.get(parsed[0])
        if token is None or not token.matches(parsed[1]):
            return None
        return self.users.get(token.user)


class SessionAccess:
    """One client's rights, checked against the current :class:`SecurityState`."""

    __slots__ = ("state", "user", "_cache", "_version")

    def __init__(self, state: SecurityState, user: str | None) -> None:
        self.state = state
        self.user = user
        self._cache: dict[tuple[str, ...], bool] = {}
        self._version = state.version

    def rights(self) -> Rights | None:
        """The client's rights now (None: none at all)."""
        return self.state.rights_of(self.user)

    def allowed(self, key: tuple[str, ...]) -> bool | None:
        """The cached answer for ``key``, or None if not known for the current version."""
        if self._version != self.state.version:
            self._cache.clear()
            self._version = self.state.version
        return self._cache.get(key)

    def remember(self, key: tuple[str, ...], ok: bool) -> bool:
        """Cache and return ``ok`` for ``key``."""
        if len(self._cache) >= _CACHE_MAX:
            self._cache.clear()
        self._cache[key] = ok
        return ok
