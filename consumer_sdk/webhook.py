"""Receiving halfmq webhooks: check a request's signature and timestamp, refuse replays.

How this works
--------------
The broker signs every webhook request (the format is in :mod:`protocol.webhooks`):
``halfmq-signature`` is the HMAC-SHA256 of ``halfmq-id + "." + halfmq-timestamp + "." +
body`` with the webhook's secret. ``WebhookVerifier.verify(headers, body)`` accepts the
request only if

1. a signature matches one of the secrets given (several while a secret is rotated);
2. its timestamp is within ``tolerance`` of the receiver's clock (either way), so a
   request captured long ago is refused;
3. the same request — the same ``(halfmq-id, halfmq-timestamp)`` — was not accepted
   before within that window: a replay of a captured request is refused.

A retry of a message carries the same ``halfmq-id`` with a new timestamp and is accepted:
replay protection is not de-duplication. Delivery is at least once, so apply the effect
once by the message id (``consumer_sdk.apply_once(conn, request.msg_id, work)``).

The pairs remembered are bounded (``max_remembered``): past that many within the window,
the oldest is forgotten and every request signed at or before its timestamp is refused as
stale from then on, so a forgotten pair can never be replayed (a request refused this way
is retried by the broker with a new timestamp).

    verifier = WebhookVerifier(secret, tolerance=300)

    async def handle(request):                     # an aiohttp handler
        body = await request.read()
        try:
            hook = verifier.verify(request.headers, body)
        except WebhookVerificationError as exc:
            return web.Response(status=401, text=str(exc))
        ...                                        # apply once by hook.msg_id
        return web.Response(status=204)
"""

from __future__ import annotations

import hmac
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from protocol.webhooks import (
    HEADER_ATTEMPT,
    HEADER_ID,
    HEADER_KEYS,
    HEADER_SIGNATURE,
    HEADER_TAGS,
    HEADER_TIMESTAMP,
    HEADER_TOPIC,
    HEADER_WEBHOOK,
    decode_list,
    parse_signature_header,
    sign,
)

__all__ = ["WebhookRequest", "WebhookVerificationError", "WebhookVerifier"]


class WebhookVerificationError(ValueError):
    """A webhook request that must be refused. ``reason`` says why: ``"missing_header"``,
    ``"bad_timestamp"``, ``"stale"``, ``"bad_signature"`` or ``"replayed"``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class WebhookRequest:
    """A verified request. ``msg_id``, ``timestamp_ms`` and ``body`` are signed; the other
    fields come from unsigned headers (informational)."""

    msg_id: str
    timestamp_ms: int
    body: bytes
    topic: str | None
    webhook: str | None
    attempt: int | None
    tags: str | None
    keys: tuple[str, ...]


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is None:  # a plain dict may hold another spelling
        lowered = {k.lower(): v for k, v in headers.items()}
        value = lowered.get(name)
    return value


class WebhookVerifier:
    """Checks halfmq webhook requests (see the module docstring).

    ``secrets``: the webhook's secret, or several (old and new while rotating).
    ``tolerance`` (default 300 s): how far the request's timestamp may be from ``clock()``.
    ``max_remembered`` (default 100,000): accepted requests remembered to refuse replays.
    ``clock`` (default ``time.time``): seconds since the epoch. Thread-safe.
    """

    def __init__(self, secrets: str | bytes | Sequence[str | bytes], *, tolerance: float = 300.0,
                 max_remembered: int = 100_000, clock: Callable[[], float] = time.time) -> None:
        self.secrets: tuple[str | bytes, ...] = (
            (secrets,) if isinstance(secrets, (str, bytes)) else tuple(secrets))
        if not self.secrets or not all(self.secrets):
            raise ValueError("at least one non-empty secret is needed")
        if tolerance <= 0 or max_remembered < 1:
            raise ValueError("tolerance must be > 0 and max_remembered >= 1")
        self.tolerance = tolerance
        self.max_remembered = max_remembered
        self.clock = clock
        self._seen: OrderedDict[tuple[str, int], int] = OrderedDict()
        self._floor = -1  # requests signed at or before this (ms) are refused (see the module docstring)
        self._lock = threading.Lock()

    def verify(self, headers: Mapping[str, str], body: bytes) -> WebhookRequest:
        """Check one request; return it as a :class:`WebhookRequest`.

        Raises :class:`WebhookVerificationError` (answer 4xx, nothing applied) if a header is
        missing or malformed, the timestamp is outside the tolerance, no signature matches,
        or the same request was accepted before.
        """
        msg_id = _header(headers, HEADER_ID)
        ts_text = _header(headers, HEADER_TIMESTAMP)
        sig_text = _header(headers, HEADER_SIGNATURE)
        if not msg_id or not ts_text or not sig_text:
            raise WebhookVerificationError(
                "missing_header", f"{HEADER_ID}, {HEADER_TIMESTAMP} and {HEADER_SIGNATURE} are required")
        if not ts_text.isdigit() or len(ts_text) > 18:
            raise WebhookVerificationError("bad_timestamp", f"{HEADER_TIMESTAMP} must be milliseconds since the epoch")
        ts = int(ts_text)
        now_ms = int(self.clock() * 1000)
        tolerance_ms = int(self.tolerance * 1000)
        if abs(now_ms - ts) > tolerance_ms:
            raise WebhookVerificationError(
                "stale", f"timestamp {ts} is {abs(now_ms - ts) / 1000:.1f}s from now (tolerance {self.tolerance}s)")
        given = parse_signature_header(sig_text)
        if not any(hmac.compare_digest(sign(secret, msg_id, ts, body), digest)
                   for secret in self.secrets for digest in given):
            raise WebhookVerificationError("bad_signature", "no signature matches a known secret")
        key = (msg_id, ts)
        with self._lock:
            seen = self._seen
            while seen:  # forget what left the window (insertion order is about time order)
                first_key, first_ts = next(iter(seen.items()))
                if first_ts >= now_ms - tolerance_ms:
                    break
                del seen[first_key]
            if ts <= self._floor:
                raise WebhookVerificationError(
                    "stale", "too many requests within the tolerance: this one is older than the oldest remembered")
            if key in seen:
                raise WebhookVerificationError("replayed", f"request {msg_id} at {ts} was already accepted")
            seen[key] = ts
            while len(seen) > self.max_remembered:
                _k, old_ts = seen.popitem(last=False)
                self._floor = max(self._floor, old_ts)
        attempt = _header(headers, HEADER_ATTEMPT)
        tags = _header(headers, HEADER_TAGS)
        return WebhookRequest(
            msg_id=msg_id, timestamp_ms=ts, body=body, topic=_header(headers, HEADER_TOPIC),
            webhook=_header(headers, HEADER_WEBHOOK),
            attempt=int(attempt) if attempt and attempt.isdigit() else None,
            tags=decode_list(tags)[0] if tags else None,
            keys=decode_list(_header(headers, HEADER_KEYS) or ""),
        )
