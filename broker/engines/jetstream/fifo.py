"""FIFO consumer groups and per-group settings on the JetStream engine.

How this works
--------------
A producer's message group picks its queue (``messages``: CRC-32 of the group name,
modulo the topic's queues), so all messages of one group are on one queue subject, in
send order. A FIFO consumer group gets one durable consumer *per queue*,
``F<queue>_<group>``, filtered on that queue and created with ``max_ack_pending: 1``:
the engine itself hands out the next message of a queue only once the previous one is
acked or terminated (dead-lettered). A failing message is NAKed with its retry delay and
stays the one pending message of its queue, so nothing overtakes it; a lease that
expires (its consumer or gateway died) is redelivered before anything after it. This
holds across gateways (they all pull from the same consumers), gateway crashes and
engine fail-overs, because the rule lives in the replicated consumer, not in a gateway.

Here, one *lane* task per queue (per FIFO group and topic on this gateway, not per
message) fetches one message at a time and hands it to a member with room, as the plain
pump does; ACKs go through the same path (``delivering``). Different queues go on in
parallel, to any member.

What this costs compared with the embedded engine (README, "Cluster mode differences"):
the unit of order is the *queue*, not the message group — message groups that hash to
the same queue wait for each other (a failing message holds every group of its queue),
and the parallelism of one FIFO group is the topic's queue count (``--default-queues``).

**Group settings** (FIFO, max delivery attempts, retry delays) live in the engine's
settings (``groups/<name>``, shared by every gateway), read with a short cache. A
subscription asking for FIFO makes a *new* group FIFO; an existing non-FIFO group is
refused (change it through the admin API).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import TYPE_CHECKING, Any

from broker.core.groupsettings import GROUP_SETTINGS_PREFIX, merge_group_settings
from broker.engines.jetstream.parts import EngineParts
from protocol.errors import BadRequestError, TopicNotFoundError

if TYPE_CHECKING:
    from broker.engines.jetstream.delivering import _Pump

__all__ = ["JetStreamFifo"]

log = logging.getLogger("halfmq.engine")

_CONF_TTL = 2.0  # seconds a gateway trusts its copy of a group's settings
_LANE_WAIT = 2.0


class JetStreamFifo(EngineParts):
    """FIFO lanes and group settings of :class:`JetStreamEngine` (see the module docstring)."""

    _group_confs: dict[str, tuple[float, dict[str, Any]]]

    async def _group_conf(self, group: str) -> dict[str, Any]:
        """The group's settings (``fifo``, ``max_attempts``, ``retry_delays``), cached briefly."""
        confs = self.__dict__.setdefault("_group_confs", {})
        cached = confs.get(group)
        now = time.monotonic()
        if cached is not None and now - cached[0] < _CONF_TTL:
            return cached[1]
        conf = await self.settings_get(GROUP_SETTINGS_PREFIX + group, None) or {}
        confs[group] = (now, conf)
        return conf

    async def admin_group_settings(self, group: str) -> dict[str, Any]:
        """A group's settings: ``fifo``, ``max_attempts`` (None: per subscription, default
        17), ``retry_delays`` (None: the broker's ``--retry-delays``)."""
        st = await self.settings_get(GROUP_SETTINGS_PREFIX + group, None) or {}
        return {"group": group, "fifo": bool(st.get("fifo")), "max_attempts": st.get("max_attempts"),
                "retry_delays": st.get("retry_delays")}

    async def admin_set_group_settings(self, group: str, *, fifo: bool | None = None,
                                       max_attempts: int | None = None,
                                       retry_delays: list[float] | None = None) -> dict[str, Any]:
        """Change a group's settings (None leaves one as it is), for every gateway; members
        subscribing from then on follow them. Raises ``BadRequestError`` for bad values."""
        st = merge_group_settings(await self.settings_get(GROUP_SETTINGS_PREFIX + group, None) or {},
                                  fifo=fifo, max_attempts=max_attempts, retry_delays=retry_delays)
        await self.settings_put(GROUP_SETTINGS_PREFIX + group, st)
        self.__dict__.setdefault("_group_confs", {})[group] = (time.monotonic(), st)
        log.info("group %s settings: %s", group, st)
        return await self.admin_group_settings(group)

    # -- setting a group's consumers up -------------------------------------------------

    async def _setup_pump(self, pump: _Pump) -> None:
        """Make the consumer(s) of a (group, topic) pump ready: FIFO lanes or the plain one."""
        spec = pump.spec
        if (not spec.is_dlq and not self.config.auto_create_topics
                and await self.streams.ensure_topic_if_exists(spec.topic) is None):
            raise TopicNotFoundError(f"topic {spec.topic!r} does not exist and auto-create is off")
        conf = {} if spec.is_dlq else await self._group_conf(spec.group)
        if conf.get("max_attempts"):
            spec = pump.spec = dataclasses.replace(spec, max_reconsume_times=int(conf["max_attempts"]) - 1)
        if conf.get("retry_delays"):
            pump.delays = tuple(float(d) for d in conf["retry_delays"])
        fifo = bool(conf.get("fifo"))
        if pump.ask_fifo and not fifo:
            if await self.groups_api.exists(spec):
                raise BadRequestError(f"group {spec.group!r} exists and is not FIFO: make it FIFO with "
                                      "the admin API (halfmq admin group-settings GROUP --fifo on)")
            await self.admin_set_group_settings(spec.group, fifo=True)
            fifo = True
        if not fifo:
            pump.handle = await self.groups_api.subscribe(spec)
            return
        handles = [await self.groups_api.subscribe(spec, fifo_queue=q) for q in range(self.route(spec.topic))]
        loop = asyncio.get_running_loop()
        pump.lanes = [(h, loop.create_task(self._lane_loop(pump, h))) for h in handles]

    async def _lane_loop(self, pump: _Pump, handle: Any) -> None:
        """One queue of a FIFO group: fetch its one pending message, hand it out, repeat
        (the engine gives the next only after an ack or a terminate)."""
        while pump.members and not self._stopping:
            try:
                self._hand_out(pump)
                if pump.room() - len(pump.waiting) <= 0:
                    pump.wake.clear()
                    await pump.wake.wait()
                    continue
                for d in await handle.fetch(1, timeout=_LANE_WAIT):
                    wire = await d.resolve()
                    if wire is None:
                        await d.terminate()
                    elif d.attempt > pump.spec.max_reconsume_times:  # lease expired past the limit
                        await d.dead_letter(wire)
                    else:
                        pump.waiting.append((d, wire))
                        self._hand_out(pump)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the engine is failing over: wait, then go on
                log.warning("FIFO deliveries of %s/%s paused: %r", pump.spec.group, pump.spec.topic, exc)
                await asyncio.sleep(0.5)

    if TYPE_CHECKING:  # provided by the other parts of JetStreamEngine
        def _hand_out(self, pump: _Pump) -> None: ...

        def route(self, topic: str) -> int: ...

        async def settings_get(self, key: str, default: Any = None) -> Any: ...

        async def settings_put(self, key: str, value: Any) -> None: ...
