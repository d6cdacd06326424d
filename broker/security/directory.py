"""Users and tokens kept in the engine's settings: adding, granting, removing, loading.

How this works
--------------
Users live under the settings keys ``users/<name>`` and tokens under ``tokens/<id>``
(:mod:`broker.security.users` has their forms). The settings are the engine's
(``Engine.settings_*``: in the embedded engine, the data directory's metadata, so a later
cluster engine shares them between brokers) or, for the offline ``halfmq user`` command,
the same metadata opened directly under the data directory's lock. Every change writes
the settings first, then reloads them into the :class:`SecurityState`, so a running
broker applies it to every connection at once.

Users from a TOML users file (``--users-file``) are read at start and merged in; they are
changed by editing the file, not here::

    [users.bank1]
    verifier = "SCRAM-SHA-256$4096:...$...:..."     # halfmq user verifier < password
    grants = [["publish", "transfer", "producer_bank1"]]
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from typing import Any, Protocol

from broker.security.rights import Grant
from broker.security.state import SecurityState
from broker.security.users import (
    AccessKey,
    Token,
    User,
    Verifier,
    make_verifier,
    new_access_key,
    new_token,
    validate_user_name,
)

__all__ = ["UserDirectory", "DirectoryError", "SettingsStore", "load_users_file", "USERS_PREFIX", "TOKENS_PREFIX",
           "AKEYS_PREFIX"]

USERS_PREFIX = "users/"
TOKENS_PREFIX = "tokens/"
AKEYS_PREFIX = "akeys/"


class DirectoryError(ValueError):
    """A change that cannot be made (``status``: the HTTP status that fits: 400, 404, 409)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class SettingsStore(Protocol):
    """The settings part of :class:`broker.engines.base.Engine`."""

    async def settings_get(self, key: str, default: Any = None) -> Any: ...
    async def settings_put(self, key: str, value: Any) -> None: ...
    async def settings_delete(self, key: str) -> None: ...
    async def settings_items(self, prefix: str) -> dict[str, Any]: ...


def load_users_file(path: str) -> list[User]:
    """The users of a TOML users file (see the module docstring). Raises ``ValueError``
    naming the file and the user for anything malformed, ``OSError`` if unreadable."""
    with open(path, "rb") as f:
        try:
            doc = tomllib.load(f)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"users file {path!r} is not valid TOML: {exc}") from None
    unknown = set(doc) - {"users"}
    if unknown:
        raise ValueError(f"users file {path!r}: unexpected top-level keys {sorted(unknown)} (only [users.NAME] tables)")
    out = []
    for name, table in (doc.get("users") or {}).items():
        try:
            if not isinstance(table, dict) or set(table) - {"verifier", "grants"}:
                raise ValueError("a user table holds 'verifier' and 'grants'")
            out.append(User.from_stored(name, table, source="file"))
        except ValueError as exc:
            raise ValueError(f"users file {path!r}, user {name!r}: {exc}") from None
    return out


class UserDirectory:
    """Changes to users and tokens, written to ``settings`` and reloaded into ``state``."""

    def __init__(self, settings: SettingsStore, state: SecurityState | None = None,
                 file_users: list[User] | None = None) -> None:
        self.settings = settings
        self.state = state if state is not None else SecurityState()
        self.file_users = {u.name: u for u in file_users or ()}
        #: Called after every (re)load: a running broker re-checks its connections.
        self.on_change: list[Callable[[], None]] = []

    async def load(self) -> SecurityState:
        """Read users and tokens from the settings (plus the file's users) into ``state``.
        Raises ``ValueError`` for a malformed stored record."""
        users = dict(self.file_users)
        for key, raw in (await self.settings.settings_items(USERS_PREFIX)).items():
            name = key[len(USERS_PREFIX):]
            if name not in users:
                users[name] = User.from_stored(name, raw)
        tokens = [Token.from_stored(key[len(TOKENS_PREFIX):], raw)
                  for key, raw in (await self.settings.settings_items(TOKENS_PREFIX)).items()]
        keys = [AccessKey.from_stored(key[len(AKEYS_PREFIX):], raw)
                for key, raw in (await self.settings.settings_items(AKEYS_PREFIX)).items()]
        self.state.replace(users.values(), tokens, keys)
        for callback in self.on_change:
            callback()
        return self.state

    # -- users ---------------------------------------------------------------------------

    def _stored_user(self, name: str) -> User:
        name = _checked_name(name)
        if name in self.file_users:
            raise DirectoryError(f"user {name!r} is defined in the users file: change it there", 409)
        user = self.state.users.get(name)
        if user is None:
            raise DirectoryError(f"no user {name!r}", 404)
        return user

    async def add_user(self, name: str, password: str) -> User:
        """Create user ``name`` with ``password`` (stored as a verifier) and no grants.
        ``DirectoryError`` (409) if it exists."""
        name = _checked_name(name)
        if name in self.state.users:
            raise DirectoryError(f"user {name!r} already exists", 409)
        try:
            user = User(name, make_verifier(password))
        except ValueError as exc:
            raise DirectoryError(str(exc)) from None
        await self._save(user)
        return user

    async def add_user_verifier(self, name: str, verifier_text: str) -> User:
        """Create user ``name`` from a verifier's text form (no password seen here)."""
        name = _checked_name(name)
        if name in self.state.users:
            raise DirectoryError(f"user {name!r} already exists", 409)
        try:
            user = User(name, Verifier.from_text(verifier_text))
        except ValueError as exc:
            raise DirectoryError(str(exc)) from None
        await self._save(user)
        return user

    async def set_password(self, name: str, password: str) -> None:
        """Give user ``name`` a new password (its grants stay)."""
        user = self._stored_user(name)
        try:
            user = User(user.name, make_verifier(password), list(user.grants))
        except ValueError as exc:
            raise DirectoryError(str(exc)) from None
        await self._save(user)

    async def remove_user(self, name: str) -> None:
        """Remove user ``name`` and its tokens (its connections lose every right at once)."""
        user = self._stored_user(name)
        for token in list(self.state.tokens.values()):
            if token.user == user.name:
                await self.settings.settings_delete(TOKENS_PREFIX + token.token_id)
        for key in list(self.state.access_keys.values()):
            if key.user == user.name:
                await self.settings.settings_delete(AKEYS_PREFIX + key.key_id)
        await self.settings.settings_delete(USERS_PREFIX + user.name)
        await self.load()

    async def grant(self, name: str, right: str, topic: str, group: str | None = None) -> Grant:
        """Add a grant to user ``name`` (nothing changes if it already has it)."""
        user = self._stored_user(name)
        try:
            g = Grant(right, topic, group)
        except ValueError as exc:
            raise DirectoryError(str(exc)) from None
        if g not in user.grants:
            await self._save(User(user.name, user.verifier, [*user.grants, g]))
        return g

    async def revoke(self, name: str, right: str, topic: str, group: str | None = None) -> None:
        """Remove a grant from user ``name``; ``DirectoryError`` (404) if it has no such grant."""
        user = self._stored_user(name)
        kept = [g for g in user.grants if not (g.right == right and g.topic == topic and g.group == group)]
        if len(kept) == len(user.grants):
            grant = f"{right} {topic}" + (f" group={group}" if group is not None else "")
            raise DirectoryError(f"user {name!r} has no grant {grant}", 404)
        await self._save(User(user.name, user.verifier, kept))

    def list_users(self) -> list[dict[str, Any]]:
        """Every user with its grants (never a verifier), by name."""
        return [self.state.users[n].describe() for n in sorted(self.state.users)]

    async def _save(self, user: User) -> None:
        await self.settings.settings_put(USERS_PREFIX + user.name, user.to_stored())
        await self.load()

    # -- tokens ----------------------------------------------------------------------------

    async def create_token(self, user: str) -> tuple[str, Token]:
        """A new bearer token acting as ``user``: ``(the token text, shown once; its record)``."""
        name = _checked_name(user)
        if name not in self.state.users:
            raise DirectoryError(f"no user {user!r}", 404)
        text, token = new_token(name)
        await self.settings.settings_put(TOKENS_PREFIX + token.token_id, token.to_stored())
        await self.load()
        return text, token

    async def revoke_token(self, token_id: str) -> None:
        """Remove a token; ``DirectoryError`` (404) if there is none with that id."""
        if token_id not in self.state.tokens:
            raise DirectoryError(f"no token {token_id!r}", 404)
        await self.settings.settings_delete(TOKENS_PREFIX + token_id)
        await self.load()

    def list_tokens(self) -> list[dict[str, Any]]:
        """Every token (id, owner, creation time; never the secret)."""
        return [self.state.tokens[t].describe() for t in sorted(self.state.tokens)]


    # -- access keys (RocketMQ 5 gRPC clients) ---------------------------------------------

    async def create_access_key(self, user: str) -> AccessKey:
        """A new gRPC access key and secret acting as ``user`` (the secret is shown once
        by the commands, but kept: signatures are checked with it)."""
        name = _checked_name(user)
        if name not in self.state.users:
            raise DirectoryError(f"no user {user!r}", 404)
        key = new_access_key(name)
        await self.settings.settings_put(AKEYS_PREFIX + key.key_id, key.to_stored())
        await self.load()
        return key

    async def revoke_access_key(self, key_id: str) -> None:
        """Remove an access key; ``DirectoryError`` (404) if there is none."""
        if key_id not in self.state.access_keys:
            raise DirectoryError(f"no access key {key_id!r}", 404)
        await self.settings.settings_delete(AKEYS_PREFIX + key_id)
        await self.load()

    def list_access_keys(self) -> list[dict[str, Any]]:
        """Every access key (key, user, created; never the secret)."""
        return [self.state.access_keys[k].describe() for k in sorted(self.state.access_keys)]


def _checked_name(name: str) -> str:
    try:
        return validate_user_name(name)
    except ValueError as exc:
        raise DirectoryError(str(exc)) from None
