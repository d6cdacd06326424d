"""The webhooks of a broker: defined by operators, kept by the engine, run in the broker.

How this works
--------------
``Webhooks`` holds one :class:`~broker.webhooks.endpoint.WebhookEndpoint` per webhook.
``add`` checks the definition, subscribes its endpoint, and only then stores the
definition with ``engine.settings_put("webhooks/<name>", ...)``: a refused webhook leaves
nothing behind. ``start`` restores every stored webhook (with its saved delivery record);
``remove`` stops the endpoint and deletes the definition and the record — the webhook's
consumer group stays in the engine like any group, so a webhook added again under the
same name resumes where the old one stopped, and its DLQ stays resendable.

A background task runs every ``SAVE_INTERVAL`` seconds: it saves the changed pages of each
delivery record (``webhook-log/<name>/<page>``, see :mod:`.deliveries`), logs one line per
webhook that dead-lettered messages since the last run, and tries again to subscribe the
webhooks the engine refused at start (say, a topic that does not exist yet while
auto-create is off). Nothing here runs per message.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from broker.core.records import parse_tags
from broker.webhooks.deliveries import DeliveryLog
from broker.webhooks.endpoint import PREFETCH_FACTOR, WebhookEndpoint
from broker.webhooks.spec import WebhookSpec
from protocol.errors import HalfMQError

if TYPE_CHECKING:
    from broker.config import BrokerConfig
    from broker.engines.base import Engine

__all__ = ["LOG_PREFIX", "MAX_WEBHOOKS", "SETTINGS_PREFIX", "WebhookConflictError", "Webhooks"]

log = logging.getLogger("halfmq.webhooks")

SETTINGS_PREFIX = "webhooks/"
LOG_PREFIX = "webhook-log/"
#: Webhooks one broker runs at most.
MAX_WEBHOOKS = 100
SAVE_INTERVAL = 2.0
#: How often a webhook the engine refused is subscribed again (seconds).
RETRY_INTERVAL = 10.0

#: The broker's group states (``admin_message``) as a webhook's delivery states.
_GROUP_STATES = {"acked": "delivered", "in_flight": "in_flight", "retrying": "retrying",
                 "dead_lettered": "dead_lettered", "pending": "pending"}


class WebhookConflictError(HalfMQError):
    """The webhook exists already, or the broker holds as many as it may (HTTP 409)."""


class Webhooks:
    """Every webhook of one broker (see the module docstring)."""

    def __init__(self, engine: Engine, config: BrokerConfig, *, clock: Callable[[], float] = time.time) -> None:
        self.engine = engine
        self.config = config
        self.clock = clock
        self.specs: dict[str, WebhookSpec] = {}
        self.endpoints: dict[str, WebhookEndpoint] = {}
        self._logs: dict[str, DeliveryLog] = {}
        self._inactive: dict[str, str] = {}  # name -> why the engine refused it
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._last_retry = 0.0

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Restore and start every stored webhook; a definition that cannot be read or
        subscribed is logged (and, in the second case, retried) — start never fails for it."""
        stored = await self.engine.settings_items(SETTINGS_PREFIX)
        for key, value in stored.items():
            try:
                spec = WebhookSpec.from_settings(value)
            except (KeyError, TypeError, ValueError) as exc:
                log.error("webhook definition %s cannot be read (%r): skipped", key, exc)
                continue
            if spec.timeout >= self.config.ack_timeout:
                log.warning("webhook %s: its timeout %gs is not shorter than --ack-timeout %gs: "
                            "deliveries may be given out again while a request is under way",
                            spec.name, spec.timeout, self.config.ack_timeout)
            self.specs[spec.name] = spec
            self._logs[spec.name] = dlog = DeliveryLog()
            pages = await self.engine.settings_items(f"{LOG_PREFIX}{spec.name}/")
            try:
                dlog.load({int(k.rsplit("/", 1)[1]): rows for k, rows in pages.items()})
            except (IndexError, TypeError, ValueError) as exc:
                log.error("webhook %s: its saved delivery record cannot be read (%r): starting afresh",
                          spec.name, exc)
                self._logs[spec.name] = DeliveryLog()
            await self._activate(spec)
        if self.specs:
            log.info("webhooks restored: %s", ", ".join(sorted(self.specs)))
        self._task = asyncio.get_running_loop().create_task(self._background(), name="halfmq-webhooks")

    async def stop(self) -> None:
        """Stop every endpoint (requests under way finish, results stored) and save the
        delivery records."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await asyncio.gather(*(ep.stop() for ep in self.endpoints.values()), return_exceptions=True)
        self._report_dead_letters()
        self.endpoints.clear()
        await self._save()

    async def _activate(self, spec: WebhookSpec) -> None:
        """Start the endpoint of a stored webhook; remember why if the engine refuses it."""
        endpoint = WebhookEndpoint(self.engine, spec, lease_timeout=self.config.ack_timeout,
                                   deliveries=self._logs[spec.name], clock=self.clock)
        try:
            await endpoint.start()
        except (HalfMQError, TimeoutError) as exc:
            if self._inactive.get(spec.name) != str(exc):
                log.error("webhook %s cannot subscribe to topic %s: %s (tried again every %gs)",
                          spec.name, spec.topic, exc, RETRY_INTERVAL)
            self._inactive[spec.name] = str(exc)
            return
        if self._inactive.pop(spec.name, None) is not None:
            log.info("webhook %s subscribed to topic %s", spec.name, spec.topic)
        self.endpoints[spec.name] = endpoint

    async def _background(self) -> None:
        while True:
            await asyncio.sleep(SAVE_INTERVAL)
            try:
                await self._save()
                self._report_dead_letters()
                now = time.monotonic()
                if self._inactive and now - self._last_retry >= RETRY_INTERVAL:
                    self._last_retry = now
                    async with self._lock:
                        for name in list(self._inactive):
                            if name in self.specs and name not in self.endpoints:
                                await self._activate(self.specs[name])
            except Exception:
                log.exception("webhooks: background work failed")

    def _report_dead_letters(self) -> None:
        """One line per webhook that dead-lettered messages since the last report."""
        for name, ep in self.endpoints.items():
            n, last = ep.take_dead_letters()
            if n and last is not None:
                log.warning("webhook %s: %d message(s) dead-lettered to %%DLQ%%%s after %d attempts "
                            "(last: %s, %s)", name, n, ep.spec.group, ep.spec.max_attempts, last[0], last[1])

    async def _save(self) -> None:
        """Write the changed pages of every delivery record."""
        for name, dlog in list(self._logs.items()):
            for page, rows in dlog.take_changes().items():
                key = f"{LOG_PREFIX}{name}/{page:012d}"
                if rows is None:
                    await self.engine.settings_delete(key)
                else:
                    await self.engine.settings_put(key, rows)

    async def _delete_log(self, name: str) -> None:
        for key in await self.engine.settings_items(f"{LOG_PREFIX}{name}/"):
            await self.engine.settings_delete(key)

    # -- operations (the admin API and the CLI) ------------------------------------------------

    async def add(self, fields: Any) -> dict[str, Any]:
        """Define and start a webhook from the operator's ``fields`` (see
        :meth:`WebhookSpec.parse`; without ``secret`` one is generated and returned once).

        Returns what :meth:`show` returns. Raises ``WebhookSpecError`` (a bad field),
        :class:`WebhookConflictError` (the name exists, or too many webhooks) or what the
        engine refuses the subscription with (``LimitExceededError``...); nothing is stored then.
        """
        generated = None
        if isinstance(fields, dict) and fields.get("secret") is None:
            generated = secrets.token_urlsafe(32)
            fields = {**fields, "secret": generated}
        spec = WebhookSpec.parse(fields, ack_timeout=self.config.ack_timeout,
                                 max_prefetch=self.config.max_prefetch // PREFETCH_FACTOR)
        async with self._lock:
            if spec.name in self.specs:
                raise WebhookConflictError(f"webhook {spec.name!r} exists (remove it first)")
            if len(self.specs) >= MAX_WEBHOOKS:
                raise WebhookConflictError(f"webhook {spec.name!r} not added: the broker holds {MAX_WEBHOOKS} webhooks")
            await self._delete_log(spec.name)  # what a removal cut short may have left
            dlog = DeliveryLog()
            endpoint = WebhookEndpoint(self.engine, spec, lease_timeout=self.config.ack_timeout,
                                       deliveries=dlog, clock=self.clock)
            await self._configure_group(spec)
            await endpoint.start()
            try:
                await self.engine.settings_put(SETTINGS_PREFIX + spec.name, spec.to_settings())
            except BaseException:
                await endpoint.stop()
                raise
            self.specs[spec.name], self.endpoints[spec.name], self._logs[spec.name] = spec, endpoint, dlog
        log.info("webhook %s added: topic %s%s -> %s (group %s, concurrency %d, timeout %gs, %d attempts)",
                 spec.name, spec.topic, f" tags {spec.tags}" if spec.tags else "", spec.url, spec.group,
                 spec.concurrency, spec.timeout, spec.max_attempts)
        out = self.show(spec.name)
        if generated is not None:
            out["secret"] = generated
        return out

    async def _configure_group(self, spec: WebhookSpec) -> None:
        """Make the webhook's group FIFO or not, as the definition says, where the engine
        has group settings (the group of an earlier webhook of that name may differ; a new
        group takes it from the subscription)."""
        get = getattr(self.engine, "admin_group_settings", None)
        put = getattr(self.engine, "admin_set_group_settings", None)
        if get is not None and put is not None and bool((await get(spec.group)).get("fifo")) != spec.fifo:
            await put(spec.group, fifo=spec.fifo)

    async def remove(self, name: str) -> None:
        """Stop the webhook and delete its definition and delivery record (its group, with
        its progress and DLQ, stays). Raises ``KeyError`` if there is no such webhook."""
        async with self._lock:
            if name not in self.specs:
                raise KeyError(name)
            endpoint = self.endpoints.pop(name, None)
            if endpoint is not None:
                await endpoint.stop()
            await self.engine.settings_delete(SETTINGS_PREFIX + name)
            del self.specs[name]
            self._inactive.pop(name, None)
            self._logs.pop(name, None)
            await self._delete_log(name)
        log.info("webhook %s removed", name)

    async def rotate(self, name: str, secret: str | None = None, *, overlap: float = 86_400.0) -> dict[str, Any]:
        """Sign with a new secret (generated and returned when None); the current one keeps
        signing for ``overlap`` seconds. Raises ``KeyError``, ``WebhookSpecError``."""
        generated = secrets.token_urlsafe(32) if secret is None else None
        async with self._lock:
            spec = self.specs.get(name)
            if spec is None:
                raise KeyError(name)
            new = spec.rotated(secret or generated or "", overlap=overlap, now_ms=int(self.clock() * 1000))
            await self.engine.settings_put(SETTINGS_PREFIX + name, new.to_settings())
            self.specs[name] = new
            if name in self.endpoints:
                self.endpoints[name].spec = new
        log.info("webhook %s: secret rotated (the previous one signs for %gs more)", name, overlap)
        out = self.show(name)
        if generated is not None:
            out["secret"] = generated
        return out

    def show(self, name: str) -> dict[str, Any]:
        """A webhook's definition (without secrets) and state. Raises ``KeyError``."""
        spec = self.specs[name]
        out = spec.public(int(self.clock() * 1000))
        endpoint = self.endpoints.get(name)
        if endpoint is not None:
            out["status"] = endpoint.status()
        else:
            out["status"] = {"subscribed": False, "error": self._inactive.get(name)}
        return out

    def list(self) -> list[dict[str, Any]]:
        """Every webhook, as :meth:`show` returns it."""
        return [self.show(name) for name in sorted(self.specs)]

    async def delivery(self, name: str, msg_id: str) -> dict[str, Any] | None:
        """Whether and when message ``msg_id`` was delivered by webhook ``name``: from the
        webhook's delivery record, else from the broker's view of the webhook's group.
        Returns None if the broker knows no such message; raises ``KeyError`` if there is
        no such webhook."""
        spec = self.specs[name]
        out: dict[str, Any] = {"webhook": name, "msg_id": msg_id}
        rec = self._logs[name].get(msg_id)
        if rec is not None:
            out.update(rec.public(), source="record")
            return out
        view_of = getattr(self.engine, "admin_message", None)
        view = await view_of(msg_id) if view_of is not None else None
        if view is None:
            return None
        wanted = parse_tags(spec.tags)
        group_state = view.get("groups", {}).get(spec.group)
        if view.get("topic") != spec.topic or (wanted is not None and view.get("tags") not in wanted):
            state = "not_for_this_webhook"
        elif spec.start == "latest" and view.get("store_timestamp", 0) < spec.created_at:
            state = "before_this_webhook"
        elif group_state is None:
            state = "pending"
        else:
            state = _GROUP_STATES.get(group_state.get("state"), "pending")
        out.update(state=state, delivered=state == "delivered",
                   attempts=group_state.get("deliveries", 0) if group_state else 0,
                   last_status=None, last_error=None, first_attempt_at=None, last_attempt_at=None,
                   delivered_at=None, source="broker")
        if group_state and "retry_at" in group_state:
            out["retry_at"] = int(group_state["retry_at"] * 1000)
        return out

