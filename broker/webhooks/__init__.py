"""Webhooks: the broker POSTs every message of a topic to an HTTP endpoint (best-effort
notification), signed, retried on the delivery ladder, dead-lettered after N attempts.

Each webhook is a consumer group of its own, ``webhook:<name>`` (``:`` is outside the
pattern of client group names, so it never collides with one), run inside the broker by
an in-process engine session (:mod:`.endpoint`): the same code serves every engine, and
retries, DLQ, resend and the admin views are those of any group. Definitions are kept in
the engine's settings (:mod:`.service`); the request format is in :mod:`protocol.webhooks`
and receivers check it with ``consumer_sdk.WebhookVerifier``.

Parts: :mod:`.spec` (a definition and its checks), :mod:`.breaker` (the circuit breaker),
:mod:`.deliveries` (the bounded delivery record), :mod:`.endpoint` (one webhook's session
and workers), :mod:`.service` (all of them), :mod:`.routes` (admin HTTP API),
:mod:`.cli` (``halfmq webhook``).
"""

from broker.webhooks.service import WebhookConflictError, Webhooks
from broker.webhooks.spec import WebhookSpec, WebhookSpecError

__all__ = ["WebhookConflictError", "WebhookSpec", "WebhookSpecError", "Webhooks"]
