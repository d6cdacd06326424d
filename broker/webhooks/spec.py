"""What a webhook is: its definition, the checks on it, and how it is stored.

How this works
--------------
``WebhookSpec.parse(fields, ...)`` turns what an operator asked for (the admin API's JSON,
the CLI's flags) into a checked definition, or raises :class:`WebhookSpecError` naming the
first field that is wrong — nothing is stored or started for a refused definition.
``to_settings`` / ``from_settings`` are its stored form (a msgpack-able dict kept by the
engine under ``webhooks/<name>``); ``public`` is what the API shows (never the secrets).

Secrets: the newest first, each with the time until which it still signs (``None``:
for good). ``rotated`` adds a new secret and keeps the previous one for an overlap, so a
receiver can switch secrets without refusing anything.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlsplit

from broker.config import parse_duration
from protocol.errors import HalfMQError
from protocol.names import WEBHOOK_GROUP_PREFIX, validate_name, validate_send_topic

__all__ = [
    "DEFAULT_BREAKER_COOLDOWN",
    "DEFAULT_BREAKER_FAILURES",
    "DEFAULT_CONCURRENCY",
    "DEFAULT_MAX_ATTEMPTS",
    "DEFAULT_TIMEOUT",
    "MAX_CONCURRENCY",
    "MIN_SECRET_LENGTH",
    "WebhookSpec",
    "WebhookSpecError",
    "check_secret",
    "check_url",
]

DEFAULT_MAX_ATTEMPTS = 17  # as a consumer group's default: 16 redeliveries, each retry delay used once
DEFAULT_TIMEOUT = 5.0
DEFAULT_CONCURRENCY = 8
DEFAULT_BREAKER_FAILURES = 5
DEFAULT_BREAKER_COOLDOWN = 30.0
MAX_ATTEMPTS = 100
MAX_CONCURRENCY = 256
MAX_TIMEOUT = 300.0
MIN_SECRET_LENGTH = 16
MAX_SECRET_LENGTH = 1024
MAX_URL_LENGTH = 2048
MAX_TAGS_LENGTH = 1024
#: Secrets that sign at once (the current one and those kept for a rotation's overlap).
MAX_SECRETS = 3

_FIELDS = {"name", "topic", "url", "secret", "tags", "max_attempts", "timeout", "concurrency",
           "start", "breaker_failures", "breaker_cooldown", "fifo"}


class WebhookSpecError(HalfMQError):
    """A webhook definition that cannot be used (the message names the field)."""


def _int(fields: dict[str, Any], name: str, default: int, low: int, high: int) -> int:
    value = fields.get(name, default)
    if value is None:
        return default
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if type(value) is not int or not low <= value <= high:
        raise WebhookSpecError(f"{name} must be an integer from {low} to {high}, got {value!r}")
    return value


def _duration(fields: dict[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = fields.get(name, default)
    if value is None:
        return default
    try:
        seconds = parse_duration(value)
    except ValueError as exc:
        raise WebhookSpecError(f"{name}: {exc}") from None
    if not low <= seconds <= high:
        raise WebhookSpecError(f"{name} must be from {low:g}s to {high:g}s, got {value!r}")
    return seconds


def check_secret(secret: Any) -> str:
    """``secret`` if it can sign; ``WebhookSpecError`` otherwise."""
    if not isinstance(secret, str) or not MIN_SECRET_LENGTH <= len(secret) <= MAX_SECRET_LENGTH:
        raise WebhookSpecError(
            f"secret must be a string of {MIN_SECRET_LENGTH} to {MAX_SECRET_LENGTH} characters")
    return secret


def check_url(url: Any) -> str:
    """``url`` if it is an absolute http(s) URL; ``WebhookSpecError`` otherwise."""
    if not isinstance(url, str) or not url or len(url) > MAX_URL_LENGTH or any(c.isspace() for c in url):
        raise WebhookSpecError(f"url must be an http:// or https:// URL of at most {MAX_URL_LENGTH} characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise WebhookSpecError(f"url {url!r} is malformed: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise WebhookSpecError(f"url must be an http:// or https:// URL with a host, got {url!r}")
    del port
    return url


@dataclass(frozen=True, slots=True)
class WebhookSpec:
    """One webhook: every message of ``topic`` (matching ``tags``) is POSTed to ``url``."""

    name: str
    topic: str
    url: str
    secrets: tuple[tuple[str, int | None], ...]  # (secret, signs until ms or None), newest first
    tags: str | None = None
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    timeout: float = DEFAULT_TIMEOUT
    concurrency: int = DEFAULT_CONCURRENCY
    start: str = "latest"
    breaker_failures: int = DEFAULT_BREAKER_FAILURES
    breaker_cooldown: float = DEFAULT_BREAKER_COOLDOWN
    fifo: bool = False  # the group is FIFO: each message group delivered in order
    created_at: int = field(default_factory=lambda: int(time.time() * 1000))

    @property
    def group(self) -> str:
        """The webhook's consumer group, ``webhook:<name>``: outside the pattern of client
        groups, so it never collides with one."""
        return WEBHOOK_GROUP_PREFIX + self.name

    @classmethod
    def parse(cls, fields: Any, *, ack_timeout: float, max_prefetch: int) -> WebhookSpec:
        """A checked definition from the operator's fields (see ``_FIELDS``).

        ``ack_timeout``: the broker's lease of a delivery, which the timeout must be
        shorter than; ``max_prefetch``: the highest concurrency the broker's prefetch
        limit allows.
        Raises :class:`WebhookSpecError`.
        """
        if not isinstance(fields, dict):
            raise WebhookSpecError("a webhook definition must be a JSON object")
        unknown = set(fields) - _FIELDS
        if unknown:
            raise WebhookSpecError(f"unknown field(s): {', '.join(sorted(map(str, unknown)))}")
        try:
            name = validate_name(fields.get("name"), "webhook name")
            topic = validate_send_topic(fields.get("topic"))
        except HalfMQError as exc:
            raise WebhookSpecError(str(exc)) from None
        url = check_url(fields.get("url"))
        secret = check_secret(fields.get("secret"))
        tags = fields.get("tags")
        if tags is not None and (not isinstance(tags, str) or len(tags) > MAX_TAGS_LENGTH):
            raise WebhookSpecError(f"tags must be a tag expression of at most {MAX_TAGS_LENGTH} characters")
        if tags is not None and tags.strip() in ("", "*"):
            tags = None
        start = fields.get("start", "latest") or "latest"
        if start not in ("earliest", "latest"):
            raise WebhookSpecError("start must be 'earliest' or 'latest'")
        timeout = _duration(fields, "timeout", DEFAULT_TIMEOUT, 0.01, MAX_TIMEOUT)
        if timeout >= ack_timeout:
            raise WebhookSpecError(
                f"timeout {timeout:g}s must be shorter than the broker's --ack-timeout {ack_timeout:g}s "
                "(the lease of a delivery)")
        concurrency = _int(fields, "concurrency", DEFAULT_CONCURRENCY, 1, min(MAX_CONCURRENCY, max_prefetch))
        fifo = fields.get("fifo", False)
        if type(fifo) is not bool:
            raise WebhookSpecError("fifo must be true or false")
        return cls(
            name=name, topic=topic, url=url, secrets=((secret, None),), tags=tags,
            max_attempts=_int(fields, "max_attempts", DEFAULT_MAX_ATTEMPTS, 1, MAX_ATTEMPTS),
            timeout=timeout, concurrency=concurrency, start=start,
            breaker_failures=_int(fields, "breaker_failures", DEFAULT_BREAKER_FAILURES, 1, 10_000),
            breaker_cooldown=_duration(fields, "breaker_cooldown", DEFAULT_BREAKER_COOLDOWN, 0.01, 86_400.0),
            fifo=fifo,
        )

    def signing_secrets(self, now_ms: int) -> list[str]:
        """The secrets that sign a request made at ``now_ms``."""
        return [s for s, until in self.secrets if until is None or until > now_ms]

    def rotated(self, secret: str, *, overlap: float, now_ms: int) -> WebhookSpec:
        """This webhook with ``secret`` as its new secret; the current one keeps signing for
        ``overlap`` seconds (an older one still in its own overlap keeps it; ``overlap`` 0:
        every old secret stops now). Raises :class:`WebhookSpecError`."""
        check_secret(secret)
        if overlap < 0:
            raise WebhookSpecError("overlap must not be negative")
        kept: list[tuple[str, int | None]] = [(secret, None)]
        for i, (old, until) in enumerate(self.secrets if overlap > 0 else ()):
            if old == secret:
                continue
            if i == 0:
                kept.append((old, now_ms + int(overlap * 1000)))
            elif until is not None and until > now_ms:
                kept.append((old, until))
        return replace(self, secrets=tuple(kept[:MAX_SECRETS]))

    def to_settings(self) -> dict[str, Any]:
        """The stored form (msgpack-able)."""
        return {
            "name": self.name, "topic": self.topic, "url": self.url,
            "secrets": [[s, until] for s, until in self.secrets], "tags": self.tags,
            "max_attempts": self.max_attempts, "timeout": self.timeout, "concurrency": self.concurrency,
            "start": self.start, "breaker_failures": self.breaker_failures,
            "breaker_cooldown": self.breaker_cooldown, "fifo": self.fifo, "created_at": self.created_at,
        }

    @classmethod
    def from_settings(cls, value: dict[str, Any]) -> WebhookSpec:
        """The definition in its stored form (``KeyError``/``TypeError`` if it is not one)."""
        return cls(
            name=value["name"], topic=value["topic"], url=value["url"],
            secrets=tuple((s, until) for s, until in value["secrets"]), tags=value.get("tags"),
            max_attempts=int(value["max_attempts"]), timeout=float(value["timeout"]),
            concurrency=int(value["concurrency"]), start=value.get("start", "latest"),
            breaker_failures=int(value.get("breaker_failures", DEFAULT_BREAKER_FAILURES)),
            breaker_cooldown=float(value.get("breaker_cooldown", DEFAULT_BREAKER_COOLDOWN)),
            fifo=bool(value.get("fifo", False)),
            created_at=int(value.get("created_at", 0)),
        )

    def public(self, now_ms: int) -> dict[str, Any]:
        """What the admin API shows: everything but the secrets (only how many sign now)."""
        return {
            "name": self.name, "group": self.group, "topic": self.topic, "url": self.url,
            "tags": self.tags, "max_attempts": self.max_attempts, "timeout": self.timeout,
            "concurrency": self.concurrency, "start": self.start,
            "breaker_failures": self.breaker_failures, "breaker_cooldown": self.breaker_cooldown,
            "fifo": self.fifo, "created_at": self.created_at, "signing_secrets": len(self.signing_secrets(now_ms)),
        }
