"""Pull consumers and per-group settings on the embedded engine.

How this works
--------------
**RECEIVE** is a long poll: the request becomes a one-shot member of its group
(``GroupDelivery.add_receiver``) asking for up to ``max`` messages, each leased for its
own invisible duration. The next dispatch that leases anything to it answers the request
with ``[[receipt handle, message], ...]`` and removes it; a timer answers ``[]`` after
``wait_ms``. Nothing here is per connection: a receipt handle names a lease of the group,
so **SETTLE** (ack, nack, change the invisible duration) works from any connection of the
group. Its answer, like an ACK barrier's, waits for this iteration's append, so an ack the
client saw confirmed is durable.

**Group settings** — FIFO, max delivery attempts, retry delays — are kept with the
engine's settings (``groups/<name>``), applied to the group's ``GroupDelivery`` at once,
and restored at start before any group is rebuilt. A push consumer subscribing with
``fifo`` makes a *new* group FIFO; an existing group changes only through the admin API.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from broker.core.delivery import GroupDelivery, StaleHandleError
from broker.core.groupsettings import GROUP_SETTINGS_PREFIX, merge_group_settings
from broker.engines.base import Session
from protocol import BadRequestError, LimitExceededError
from protocol.errors import StaleReceiptError

if TYPE_CHECKING:
    from broker.engines.embedded.engine import EmbeddedEngine

__all__ = ["EmbeddedPulling", "GROUP_SETTINGS_PREFIX"]

log = logging.getLogger("halfmq.broker")



class EmbeddedPulling:
    """Pull requests, receipt handles and group settings of :class:`EmbeddedEngine`."""

    def receive(self: EmbeddedEngine, s: Session, rid: int, *, group: str, topic: str, tags: str | None,
                max_messages: int, invisible_ms: int, wait_ms: int) -> None:
        """Lease up to ``max_messages`` messages of ``topic`` to ``group``, each for
        ``invisible_ms``; answer as soon as there are some, or with none after ``wait_ms``."""
        self._check_group_room(group)
        if not topic.startswith("%"):
            self._ensure_topic(topic)
        gd = self._group(group)
        self._receiver_seq += 1
        mid = f"r{self._receiver_seq}"
        gd.add_receiver(mid, topic, tags=tags, max_messages=max_messages, invisible=invisible_ms / 1000.0)
        timer = asyncio.get_running_loop().call_later(wait_ms / 1000.0, self._receive_timed_out, mid)
        self._receivers[mid] = (s, rid, timer, gd)
        self.schedule_dispatch()

    def _answer_receiver(self: EmbeddedEngine, gd: GroupDelivery, mid: str, items: list[list[Any]]) -> None:
        s, rid, timer, _gd = self._receivers.pop(mid)
        timer.cancel()
        gd.member_gone(mid)
        s.reply(rid, {"m": [[gd.handle(token), wire] for token, wire in items]})

    def _receive_timed_out(self: EmbeddedEngine, mid: str) -> None:
        entry = self._receivers.pop(mid, None)
        if entry is not None:
            s, rid, _timer, gd = entry
            gd.member_gone(mid)
            s.reply(rid, {"m": []})
            s.flush()

    def cancel_receive(self: EmbeddedEngine, s: Session, rid: int) -> None:
        """The client gave up on its pull request ``rid`` (call cancelled, deadline passed):
        drop it without an answer, so nothing is leased to it any more."""
        for mid, entry in self._receivers.items():
            if entry[0] is s and entry[1] == rid:
                del self._receivers[mid]
                entry[2].cancel()
                entry[3].member_gone(mid)
                return

    def route(self: EmbeddedEngine, topic: str) -> int:
        """The number of queues of ``topic``, created first if auto-create is on (a client
        asking for a topic's route is about to use it). Raises ``TopicNotFoundError`` or
        ``LimitExceededError``."""
        if topic.startswith("%"):
            return max(1, self.queue_count(topic))
        return self._ensure_topic(topic)

    def _drop_receivers(self: EmbeddedEngine, s: Session) -> None:
        """The session closed: its pending pull requests go (their leases stay)."""
        for mid in [mid for mid, entry in self._receivers.items() if entry[0] is s]:
            _s, _rid, timer, gd = self._receivers.pop(mid)
            timer.cancel()
            gd.member_gone(mid)

    def settle(self: EmbeddedEngine, s: Session, rid: int, group: str, items: list[Any]) -> None:
        """Ack / nack / change the invisible duration of leases by receipt handle; reply
        ``{"r": [...]}`` (per item ``True``, the new handle, or ``[code, message]``) once
        the acks are durable."""
        gd = self.groups.get(group)
        now = time.time()
        if self.trace and gd is not None:
            self._trace_settles(gd, items, now)
        results: list[Any] = []
        pending = []
        for item in items:
            try:
                handle, action, ms = item
                if gd is None:
                    raise StaleHandleError(f"stale receipt handle: group {group!r} has no leases")
                if type(ms) is not int:
                    raise BadRequestError("the milliseconds of a settle item must be an integer")
                pr, new_handle = gd.settle(handle, action, ms, now)
            except StaleHandleError as exc:
                results.append([StaleReceiptError.code, str(exc)])
                continue
            except BadRequestError as exc:
                results.append([exc.code, str(exc)])
                continue
            except (TypeError, ValueError) as exc:
                results.append([BadRequestError.code, f"malformed settle item: {exc}"])
                continue
            if pr is not None:
                pending.append(pr)
            results.append(new_handle if new_handle is not None else True)
        if gd is not None:
            if gd.acked:
                self._acked_groups.add(gd)
            if pending:
                self._append_pending(gd, pending)
        self._queue_records([], (s, rid, {"r": results}) if rid else None)
        self.schedule_dispatch()

    # -- group settings ---------------------------------------------------------------

    def _check_group_room(self: EmbeddedEngine, group: str) -> None:
        if group not in self.groups and len(self.groups) >= self.config.max_groups:
            raise LimitExceededError(f"group {group!r} not created: the broker holds "
                                     f"--max-groups {self.config.max_groups} groups")

    def _group_is_fifo(self: EmbeddedEngine, group: str) -> bool:
        return bool(self._group_settings.get(group, {}).get("fifo"))

    async def _load_group_settings(self: EmbeddedEngine) -> None:
        n = len(GROUP_SETTINGS_PREFIX)
        items = await self.settings_items(GROUP_SETTINGS_PREFIX)
        self._group_settings = {k[n:]: v for k, v in items.items()}

    def _apply_group_settings(self: EmbeddedEngine, group: str) -> dict[str, Any]:
        """The keyword arguments of ``GroupDelivery`` that the group's settings give."""
        st = self._group_settings.get(group, {})
        kw: dict[str, Any] = {"fifo": bool(st.get("fifo"))}
        if st.get("max_attempts") is not None:
            kw["max_reconsume_times"] = int(st["max_attempts"]) - 1
        if st.get("retry_delays"):
            kw["retry_delays"] = tuple(float(d) for d in st["retry_delays"])
        return kw

    def _set_group_settings_now(self: EmbeddedEngine, group: str, changes: dict[str, Any]) -> None:
        """Apply ``changes`` at once and persist them in the background (a subscription
        asking for a new FIFO group)."""
        st = {**self._group_settings.get(group, {}), **changes}
        self._group_settings[group] = st
        task = asyncio.get_running_loop().create_task(self.settings_put(GROUP_SETTINGS_PREFIX + group, st))
        task.add_done_callback(_log_failure)

    async def admin_group_settings(self: EmbeddedEngine, group: str) -> dict[str, Any]:
        """A group's settings: ``fifo``, ``max_attempts`` (None: per subscription, default
        17), ``retry_delays`` (None: the broker's ``--retry-delays``)."""
        st = self._group_settings.get(group, {})
        return {"group": group, "fifo": bool(st.get("fifo")), "max_attempts": st.get("max_attempts"),
                "retry_delays": st.get("retry_delays")}

    async def admin_set_group_settings(self: EmbeddedEngine, group: str, *, fifo: bool | None = None,
                                       max_attempts: int | None = None,
                                       retry_delays: list[float] | None = None) -> dict[str, Any]:
        """Change a group's settings (None leaves one as it is); they apply at once and
        survive restarts. Raises ``BadRequestError`` for out-of-range values."""
        st = merge_group_settings(self._group_settings.get(group, {}), fifo=fifo,
                                  max_attempts=max_attempts, retry_delays=retry_delays)
        if group not in self.groups:
            self._check_group_room(group)
        await self.settings_put(GROUP_SETTINGS_PREFIX + group, st)
        self._group_settings[group] = st
        gd = self.groups.get(group)
        if gd is not None:
            gd.configure(fifo=fifo, retry_delays=None if retry_delays is None else tuple(retry_delays),
                         max_reconsume_times=-1 if max_attempts is None else max_attempts - 1)
        log.info("group %s settings: %s", group, st)
        return await self.admin_group_settings(group)


def _log_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("saving group settings failed: %s", task.exception())
