"""Users, their SCRAM-SHA-256 verifiers, and bearer tokens: the stored forms, without I/O.

How this works
--------------
A password is never stored. ``make_verifier(password)`` draws a random salt and keeps what
SCRAM-SHA-256 (RFC 5802 / 7677) needs to check a client's proof: the salt, the iteration
count, ``StoredKey`` and ``ServerKey``. Its text form is PostgreSQL's::

    SCRAM-SHA-256$<iterations>:<salt base64>$<StoredKey base64>:<ServerKey base64>

so a verifier can be written into a users file by hand (``halfmq user verifier`` prints
one). ``check_password`` recomputes the salted password for HTTP Basic logins (PBKDF2,
``iterations`` rounds) and compares ``StoredKey`` in constant time.

A :class:`User` is a name, a verifier and grants (:mod:`broker.security.rights`). Its
stored form (engine settings ``users/<name>``) is a plain map. A bearer token is
``hmq_<id>_<secret>``: the broker keeps ``tokens/<id>`` with the owner and the SHA-256 of
the secret, never the secret; a token acts with its owner's rights.

An :class:`AccessKey` is what RocketMQ 5 clients sign their gRPC requests with: an access
key and a secret key acting as a user. Their signature is an HMAC keyed by the secret, so
the broker must keep the secret itself (``akeys/<access key>``), not a hash of it: protect
the data directory, and revoke a key that may have leaked.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from scramp import ScramMechanism  # type: ignore[import-untyped]

from broker.security.rights import Grant, Rights

__all__ = [
    "MECHANISM",
    "ITERATIONS",
    "Verifier",
    "User",
    "Token",
    "make_verifier",
    "check_password",
    "validate_user_name",
    "new_token",
    "parse_token",
    "AccessKey",
    "new_access_key",
]

MECHANISM = "SCRAM-SHA-256"
#: PBKDF2 rounds of a new verifier (RFC 7677's minimum; what PostgreSQL uses).
ITERATIONS = 4096

_USER_RE = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
_TOKEN_RE = re.compile(r"^hmq_([0-9a-f]{12})_([A-Za-z0-9_-]{20,100})$")


def validate_user_name(name: object) -> str:
    """Return ``name`` if it is a valid user name (1-64 of ``A-Z a-z 0-9 _ . @ -``);
    raise ``ValueError`` otherwise."""
    if not isinstance(name, str) or not _USER_RE.match(name):
        raise ValueError(f"a user name is 1 to 64 characters of A-Z a-z 0-9 _ . @ - (got {name!r})")
    return name


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


@dataclass(frozen=True, slots=True)
class Verifier:
    """What the broker keeps of a password: enough to check a SCRAM proof, not to log in."""

    salt: bytes
    iterations: int
    stored_key: bytes
    server_key: bytes

    def auth_info(self) -> tuple[bytes, bytes, bytes, int]:
        """The tuple ``scramp`` asks for: (salt, StoredKey, ServerKey, iterations)."""
        return self.salt, self.stored_key, self.server_key, self.iterations

    def to_text(self) -> str:
        """PostgreSQL's text form (see the module docstring)."""
        return (f"{MECHANISM}${self.iterations}:{_b64(self.salt)}"
                f"${_b64(self.stored_key)}:{_b64(self.server_key)}")

    @classmethod
    def from_text(cls, text: str) -> Verifier:
        """Parse the text form; raises ``ValueError`` if it is not one."""
        try:
            mech, head, keys = text.split("$")
            iters, salt = head.split(":")
            stored, server = keys.split(":")
            if mech != MECHANISM:
                raise ValueError(f"not a {MECHANISM} verifier")
            v = cls(base64.b64decode(salt, validate=True), int(iters),
                    base64.b64decode(stored, validate=True), base64.b64decode(server, validate=True))
        except (ValueError, TypeError) as exc:
            raise ValueError(f"not a {MECHANISM} verifier ({MECHANISM}$ITER:SALT$STOREDKEY:SERVERKEY): {exc}") from None
        if v.iterations < ITERATIONS or len(v.stored_key) != 32 or len(v.server_key) != 32 or not v.salt:
            raise ValueError(f"not a usable {MECHANISM} verifier (at least {ITERATIONS} iterations, 32-byte keys)")
        return v


def make_verifier(password: str, *, iterations: int = ITERATIONS) -> Verifier:
    """A new verifier for ``password`` with a random 16-byte salt. Raises ``ValueError`` for
    an empty password."""
    if not isinstance(password, str) or not password:
        raise ValueError("the password must not be empty")
    salt, stored, server, iters = ScramMechanism(MECHANISM).make_auth_info(
        password, iteration_count=iterations, salt=secrets.token_bytes(16))
    return Verifier(salt, iters, stored, server)


def check_password(verifier: Verifier, password: str) -> bool:
    """True if ``password`` is the one ``verifier`` was made from (PBKDF2, constant-time compare)."""
    try:
        salted = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), verifier.salt, verifier.iterations)
    except (UnicodeError, AttributeError):
        return False
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    return hmac.compare_digest(hashlib.sha256(client_key).digest(), verifier.stored_key)


@dataclass(slots=True)
class User:
    """A user: name, verifier, grants, and where it is defined (``"store"`` or ``"file"``)."""

    name: str
    verifier: Verifier
    grants: list[Grant] = field(default_factory=list)
    source: str = "store"

    @property
    def rights(self) -> Rights:
        """The user's grants as a :class:`Rights`."""
        return Rights(self.grants)

    def to_stored(self) -> dict[str, Any]:
        """The stored form (settings ``users/<name>``)."""
        return {"verifier": self.verifier.to_text(), "grants": [g.to_list() for g in self.grants]}

    @classmethod
    def from_stored(cls, name: str, raw: Any, source: str = "store") -> User:
        """Read the stored form; raises ``ValueError`` if malformed."""
        if not isinstance(raw, dict) or not isinstance(raw.get("verifier"), str):
            raise ValueError(f"user {name!r}: stored record is malformed")
        grants = [Grant.from_list(g) for g in raw.get("grants") or []]
        return cls(validate_user_name(name), Verifier.from_text(raw["verifier"]), grants, source)

    def describe(self) -> dict[str, Any]:
        """What ``user list`` shows (never the verifier)."""
        return {"user": self.name, "source": self.source, "grants": [str(g) for g in self.grants]}


@dataclass(frozen=True, slots=True)
class Token:
    """A stored bearer token: its id, owner, SHA-256 of the secret, creation time."""

    token_id: str
    user: str
    secret_sha256: str
    created: float

    def matches(self, secret: str) -> bool:
        """True if ``secret`` is this token's (constant-time)."""
        digest = hashlib.sha256(secret.encode("utf-8")).hexdigest()
        return hmac.compare_digest(digest, self.secret_sha256)

    def to_stored(self) -> dict[str, Any]:
        """The stored form (settings ``tokens/<id>``)."""
        return {"user": self.user, "sha256": self.secret_sha256, "created": self.created}

    @classmethod
    def from_stored(cls, token_id: str, raw: Any) -> Token:
        """Read the stored form; raises ``ValueError`` if malformed."""
        if not isinstance(raw, dict) or not isinstance(raw.get("user"), str) or not isinstance(raw.get("sha256"), str):
            raise ValueError(f"token {token_id!r}: stored record is malformed")
        return cls(token_id, raw["user"], raw["sha256"], float(raw.get("created", 0)))

    def describe(self) -> dict[str, Any]:
        """What ``token list`` shows (never the secret)."""
        return {"id": self.token_id, "user": self.user, "created": self.created}


def new_token(user: str, *, now: float | None = None) -> tuple[str, Token]:
    """A new token for ``user``: ``(the token text to give out once, its stored form)``."""
    token_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    stored = Token(token_id, user, hashlib.sha256(secret.encode()).hexdigest(),
                   time.time() if now is None else now)
    return f"hmq_{token_id}_{secret}", stored


@dataclass(frozen=True)
class AccessKey:
    """A gRPC access key acting as ``user``, with its secret key (kept as is)."""

    key_id: str
    user: str
    secret: str
    created: float

    def to_stored(self) -> dict[str, Any]:
        """The stored form (settings ``akeys/<access key>``)."""
        return {"user": self.user, "secret": self.secret, "created": self.created}

    @classmethod
    def from_stored(cls, key_id: str, raw: Any) -> AccessKey:
        """Read the stored form; raises ``ValueError`` if malformed."""
        if not isinstance(raw, dict) or not isinstance(raw.get("user"), str) or not isinstance(raw.get("secret"), str):
            raise ValueError(f"access key {key_id!r}: stored record is malformed")
        return cls(key_id, raw["user"], raw["secret"], float(raw.get("created", 0)))

    def describe(self) -> dict[str, Any]:
        """What ``user key-list`` shows (never the secret)."""
        return {"access_key": self.key_id, "user": self.user, "created": self.created}


def new_access_key(user: str, *, now: float | None = None) -> AccessKey:
    """A new access key for ``user`` (``HMQ`` + 20 hex digits) and a random secret key."""
    return AccessKey("HMQ" + secrets.token_hex(10).upper(), user, secrets.token_urlsafe(30),
                     time.time() if now is None else now)


def parse_token(text: str) -> tuple[str, str] | None:
    """``(id, secret)`` of a token's text, or None if it is not one."""
    m = _TOKEN_RE.match(text)
    return (m.group(1), m.group(2)) if m else None
