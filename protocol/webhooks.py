"""The webhook request: its headers and its signature (shared by the broker and receivers).

How this works
--------------
A webhook delivers each message as one HTTP ``POST`` whose body is the message body,
unchanged. Three headers let the receiver check where it comes from and refuse a replay:

- ``halfmq-id``: the message id (the same on every attempt of that message);
- ``halfmq-timestamp``: when this attempt was signed, milliseconds since the Unix epoch
  (every attempt has its own);
- ``halfmq-signature``: ``v1=<hex>``, the HMAC-SHA256 of the *signed string* with the
  webhook's secret (the UTF-8 bytes of it) as the key, in lower-case hex. While a secret is
  being rotated the header holds one signature per active secret, comma-separated
  (``v1=<hex>,v1=<hex>``); a receiver accepts the request if any of them matches a secret
  it knows. Versions other than ``v1`` are ignored, so the scheme can change later.

The signed string is the id, a dot, the timestamp (decimal digits), a dot, then the raw
body bytes::

    signed = halfmq-id + "." + halfmq-timestamp + "." + body

The id is signed with the timestamp and body, so a captured request cannot be sent again
under another id within the timestamp tolerance (which would slip past a receiver that
remembers ids).

Informational headers, *not* signed (do not trust them over plain HTTP): ``halfmq-topic``,
``halfmq-webhook`` (the webhook's name), ``halfmq-attempt`` (1 on the first attempt),
``halfmq-tags`` and ``halfmq-keys`` (each value percent-encoded, keys comma-separated).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from urllib.parse import quote, unquote

__all__ = [
    "HEADER_ATTEMPT",
    "HEADER_ID",
    "HEADER_KEYS",
    "HEADER_SIGNATURE",
    "HEADER_TAGS",
    "HEADER_TIMESTAMP",
    "HEADER_TOPIC",
    "HEADER_WEBHOOK",
    "SIGNATURE_VERSION",
    "decode_list",
    "encode_list",
    "parse_signature_header",
    "sign",
    "signature_header",
    "signed_bytes",
]

HEADER_ID = "halfmq-id"
HEADER_TIMESTAMP = "halfmq-timestamp"
HEADER_SIGNATURE = "halfmq-signature"
HEADER_TOPIC = "halfmq-topic"
HEADER_WEBHOOK = "halfmq-webhook"
HEADER_ATTEMPT = "halfmq-attempt"
HEADER_TAGS = "halfmq-tags"
HEADER_KEYS = "halfmq-keys"

SIGNATURE_VERSION = "v1"


def _key(secret: str | bytes) -> bytes:
    return secret.encode("utf-8") if isinstance(secret, str) else secret


def signed_bytes(msg_id: str, timestamp_ms: int, body: bytes) -> bytes:
    """The bytes that are signed: ``f"{msg_id}.{timestamp_ms}."`` (ASCII) followed by ``body``."""
    return f"{msg_id}.{timestamp_ms}.".encode() + body


def sign(secret: str | bytes, msg_id: str, timestamp_ms: int, body: bytes) -> str:
    """The HMAC-SHA256 of :func:`signed_bytes` with ``secret``, in lower-case hex."""
    return hmac.new(_key(secret), signed_bytes(msg_id, timestamp_ms, body), hashlib.sha256).hexdigest()


def signature_header(secrets: Iterable[str | bytes], msg_id: str, timestamp_ms: int, body: bytes) -> str:
    """The ``halfmq-signature`` value: ``v1=<hex>`` per secret, comma-separated."""
    data = signed_bytes(msg_id, timestamp_ms, body)
    return ",".join(f"{SIGNATURE_VERSION}={hmac.new(_key(s), data, hashlib.sha256).hexdigest()}"
                    for s in secrets)


def parse_signature_header(value: str) -> list[str]:
    """The ``v1`` signatures (hex strings) of a ``halfmq-signature`` value; other versions
    and malformed parts are skipped (an empty list if none is usable)."""
    out = []
    for part in value.split(","):
        version, sep, digest = part.strip().partition("=")
        if sep and version == SIGNATURE_VERSION and len(digest) == 64:
            out.append(digest.lower())
    return out


def encode_list(values: Iterable[str]) -> str:
    """Strings as one header value: each percent-encoded (UTF-8), comma-separated."""
    return ",".join(quote(v, safe="") for v in values)


def decode_list(value: str) -> tuple[str, ...]:
    """The strings of an :func:`encode_list` value (``()`` for an empty value)."""
    return tuple(unquote(v) for v in value.split(",")) if value else ()
