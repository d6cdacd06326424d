"""Check-backs across gateways: core NATS request/reply to the producer's own gateway.

How this works
--------------
A producer's connection lives on one gateway; the half message's check-back may be run by
any gateway (whichever the TXCHECK consumer handed it to). So every gateway holding a
producer connection answers two subjects:

- ``hmq.cb.i.<instance>``: that producer instance (its HELLO ``client_id``, escaped into
  one token by ``naming.token``);
- ``hmq.cb.g.<group>``, in queue group ``gw``: any live producer of the group — the
  engine hands each request to one of the gateways subscribed.

``CheckRouter.check(half_wire, group=, instance=)`` asks the instance first, then the
group (SPEC T4: the producer that sent it first, then any live member). The request is
msgpack ``{"m": wire}``; the answer ``{"state": "COMMIT"|"ROLLBACK"|"UNKNOWN"}`` or
``{"reached": false}`` when the gateway no longer had that producer (it closed between
the engine routing the request and the gateway asking). "No responders" (no gateway has
such a producer) is not reached either. Only a check that reached a producer is counted
(``CheckResult.reached``); a timeout after it was routed counts (the producer got it and
did not answer in time), as the embedded broker counts one.

A handler is ``async def handler(wire) -> str | None`` (None: not reached here).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgpack  # type: ignore[import-untyped]
import nats.errors
from nats.aio.msg import Msg

from broker.engines.jetstream import naming
from broker.engines.jetstream.client import EngineClient

__all__ = ["CheckHandler", "CheckResult", "CheckRouter", "group_subject", "instance_subject"]

log = logging.getLogger("halfmq.engine")

CheckHandler = Callable[[list[Any]], Awaitable[str | None]]
_QUEUE = "gw"
_STATES = frozenset({"COMMIT", "ROLLBACK", "UNKNOWN"})


def instance_subject(instance: str) -> str:
    """Subject answered by the gateway holding producer instance ``instance``."""
    return f"hmq.cb.i.{naming.token(instance)}"


def group_subject(group: str) -> str:
    """Subject answered (queue group) by gateways holding a producer of ``group``."""
    return f"hmq.cb.g.{group}"


@dataclass(frozen=True, slots=True)
class CheckResult:
    """``reached``: a producer got the check; ``state``: its answer (None: none in time)."""

    reached: bool
    state: str | None = None
    via: str | None = None  # "instance" or "group"


class CheckRouter:
    """Serves and sends check-backs. ``timeout``: seconds a check may take (default 5)."""

    def __init__(self, client: EngineClient, *, timeout: float = 5.0) -> None:
        self.client = client
        self.timeout = timeout

    async def serve(self, subject: str, handler: CheckHandler, *, queue: bool) -> Any:
        """Answer check-backs on ``subject`` with ``handler``; returns the subscription
        (``await sub.unsubscribe()`` to stop)."""
        async def on_request(msg: Msg) -> None:
            try:
                wire = msgpack.unpackb(msg.data)["m"]
                state = await handler(wire)
            except Exception:  # a broken handler must not kill the subscription
                log.exception("check-back handler failed on %s", subject)
                state = None
            if state is None:
                answer: dict[str, Any] = {"reached": False}
            else:  # anything but COMMIT/ROLLBACK reached the producer without an outcome
                answer = {"state": state if state in _STATES else "UNKNOWN"}
            try:
                await msg.respond(msgpack.packb(answer))
            except nats.errors.Error:
                pass  # the asking gateway is gone; it will time out

        return await self.client.nc.subscribe(subject, queue=_QUEUE if queue else "", cb=on_request)

    async def serve_instance(self, instance: str, handler: CheckHandler) -> Any:
        """Answer check-backs for producer instance ``instance``."""
        return await self.serve(instance_subject(instance), handler, queue=False)

    async def serve_group(self, group: str, handler: CheckHandler) -> Any:
        """Answer check-backs for any producer of ``group`` (shared with other gateways)."""
        return await self.serve(group_subject(group), handler, queue=True)

    async def _ask(self, subject: str, payload: bytes) -> CheckResult | None:
        """None: nobody reached there; else the result."""
        try:
            msg = await self.client.nc.request(subject, payload, timeout=self.timeout)
        except nats.errors.NoRespondersError:
            return None
        except (nats.errors.TimeoutError, TimeoutError):
            return CheckResult(True, None)
        try:
            answer = msgpack.unpackb(msg.data)
        except Exception:
            return CheckResult(True, None)
        state = answer.get("state") if isinstance(answer, dict) else None
        if state in _STATES:
            return CheckResult(True, state)
        return None  # {"reached": false}

    async def check(self, half_wire: list[Any], *, group: str | None,
                    instance: str | None) -> CheckResult:
        """Ask the producer instance, then any producer of the group; see the module doc."""
        payload = msgpack.packb({"m": half_wire})
        if instance:
            got = await self._ask(instance_subject(instance), payload)
            if got is not None:
                return CheckResult(got.reached, got.state, "instance")
        if group:
            got = await self._ask(group_subject(group), payload)
            if got is not None:
                return CheckResult(got.reached, got.state, "group")
        return CheckResult(False)
