"""Check-backs across gateways: core NATS request/reply to the producer's own gateway.

How this works
--------------
A producer's connection lives on one gateway; the half message's check-back may be run by
any gateway (whichever the TXCHECK consumer handed it to). So every gateway holding a
producer connection answers two subjects:

- ``hmqs.cb.i.<instance>``: that producer instance (its HELLO ``client_id``, escaped into
  one token by ``naming.token``);
- ``hmqs.cb.g.<group>``, in queue group ``gw``: any live producer of the group — the
  engine hands each request to one of the gateways subscribed.

``CheckRouter.check(half_wire, group=, instance=)`` asks the instance first, then the
group (SPEC T4: the producer that sent it first, then any live member). Only a check that
reached a producer counts, so "reached" must be known, not guessed from a timeout: a
subscription that was just removed can still attract requests for a moment (interest
travels between servers asynchronously, and a request routed to a server that no longer
has the subscriber is dropped without a word). Hence three messages, all msgpack, on the
asking gateway's own reply subject:

1. the request ``{"m": wire}``;
2. a receipt ``{"got": true}``, sent by the answering gateway once its producer has been
   asked (the CHECK is written to that producer's connection);
3. the answer ``{"state": "COMMIT"|"ROLLBACK"|"UNKNOWN"}``, or ``{"reached": false}``
   when that gateway had no such producer any more.

No receipt within ``receipt_timeout``, "no responders", or ``{"reached": false}``: not
reached here, try the next subject (and in the end, not counted). A receipt and then no
answer within ``timeout``: reached, no state (counted, as the embedded broker counts a
producer that does not answer in time).

A handler is ``async def handler(wire) -> Awaitable[str] | None``: None when it has no
such producer, else an awaitable of the producer's answer, returned once the producer
has been asked (what ``Session.request(Op.CHECK, ...)`` gives back).
"""

from __future__ import annotations

import asyncio
import itertools
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

CheckHandler = Callable[[list[Any]], Awaitable[Awaitable[Any] | None]]
_QUEUE = "gw"
_STATES = frozenset({"COMMIT", "ROLLBACK", "UNKNOWN"})
_RECEIPT = msgpack.packb({"got": True})
_UNREACHED = msgpack.packb({"reached": False})


def instance_subject(instance: str) -> str:
    """Subject answered by the gateway holding producer instance ``instance``."""
    return f"hmqs.cb.i.{naming.token(instance)}"


def group_subject(group: str) -> str:
    """Subject answered (queue group) by gateways holding a producer of ``group``."""
    return f"hmqs.cb.g.{group}"


@dataclass(frozen=True, slots=True)
class CheckResult:
    """``reached``: a producer got the check; ``state``: its answer (None: none in time)."""

    reached: bool
    state: str | None = None
    via: str | None = None  # "instance" or "group"


class _Ask:
    __slots__ = ("receipt", "answer")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.receipt: asyncio.Future[None] = loop.create_future()
        self.answer: asyncio.Future[dict[str, Any] | None] = loop.create_future()


class CheckRouter:
    """Serves and sends check-backs. ``timeout``: seconds a producer may take to answer
    (default 5); ``receipt_timeout``: seconds to wait for the answering gateway's receipt (2)."""

    def __init__(self, client: EngineClient, *, timeout: float = 5.0,
                 receipt_timeout: float = 2.0) -> None:
        self.client = client
        self.timeout = timeout
        self.receipt_timeout = receipt_timeout
        self._prefix: str | None = None
        self._asks: dict[str, _Ask] = {}
        self._tokens = itertools.count(1)

    # -- answering -------------------------------------------------------------------

    async def serve(self, subject: str, handler: CheckHandler, *, queue: bool) -> Any:
        """Answer check-backs on ``subject`` with ``handler``; returns the subscription
        (``await sub.unsubscribe()`` to stop)."""
        timeout = self.timeout

        async def on_request(msg: Msg) -> None:
            answer: dict[str, Any]
            try:
                wire = msgpack.unpackb(msg.data)["m"]
                pending = await handler(wire)
                if pending is None:
                    answer = {"reached": False}
                else:
                    await msg.respond(_RECEIPT)
                    try:
                        state = await asyncio.wait_for(pending, timeout)
                    except Exception:  # timeout, producer gone, an error answer: no state
                        state = None
                    if isinstance(state, dict):
                        state = state.get("state")
                    answer = {"state": state if state in _STATES else "UNKNOWN"} if state else {}
            except Exception:  # a broken handler must not kill the subscription
                log.exception("check-back handler failed on %s", subject)
                answer = {}
            if answer:
                try:
                    await msg.respond(msgpack.packb(answer))
                except nats.errors.Error:
                    pass  # the asking gateway is gone; it times out

        return await self.client.nc.subscribe(subject, queue=_QUEUE if queue else "", cb=on_request)

    async def serve_instance(self, instance: str, handler: CheckHandler) -> Any:
        """Answer check-backs for producer instance ``instance``."""
        return await self.serve(instance_subject(instance), handler, queue=False)

    async def serve_group(self, group: str, handler: CheckHandler) -> Any:
        """Answer check-backs for any producer of ``group`` (shared with other gateways)."""
        return await self.serve(group_subject(group), handler, queue=True)

    # -- asking ----------------------------------------------------------------------

    async def _start(self) -> str:
        prefix = self.client.nc.new_inbox() + "."
        skip = len(prefix)
        asks = self._asks

        async def on_reply(msg: Msg) -> None:
            ask = asks.get(msg.subject[skip:])
            if ask is None:
                return
            if not msg.data:  # "no responders" (status 503) or another status
                if not ask.receipt.done():
                    ask.receipt.set_exception(LookupError("no responders"))
                return
            try:
                body = msgpack.unpackb(msg.data)
            except Exception:
                body = None
            if isinstance(body, dict) and body.get("got"):
                if not ask.receipt.done():
                    ask.receipt.set_result(None)
                return
            if not ask.answer.done():
                ask.answer.set_result(body if isinstance(body, dict) else None)
            if not ask.receipt.done():
                ask.receipt.set_result(None)

        await self.client.nc.subscribe(prefix + "*", cb=on_reply)
        self._prefix = prefix
        return prefix

    async def _ask(self, subject: str, payload: bytes) -> CheckResult | None:
        """None: nobody reached there; else the result."""
        prefix = self._prefix or await self._start()
        token = str(next(self._tokens))
        ask = _Ask(asyncio.get_running_loop())
        self._asks[token] = ask
        try:
            await self.client.nc.publish(subject, payload, reply=prefix + token)
            try:
                await asyncio.wait_for(asyncio.shield(ask.receipt), self.receipt_timeout)
            except (TimeoutError, LookupError):
                if not ask.answer.done():
                    return None
            try:
                body = await asyncio.wait_for(asyncio.shield(ask.answer), self.timeout)
            except TimeoutError:
                return CheckResult(True, None)
            state = body.get("state") if body else None
            if state in _STATES:
                return CheckResult(True, state)
            if body and body.get("reached") is False:
                return None
            return CheckResult(True, None)
        finally:
            del self._asks[token]
            for f in (ask.receipt, ask.answer):
                if not f.done():
                    f.cancel()
                elif not f.cancelled():
                    f.exception()  # retrieved

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
