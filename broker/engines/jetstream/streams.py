"""The engine's streams: one per topic, five shared ones, and the message-id prefixes.

How this works
--------------
``StreamSet.ensure_topic(topic)`` makes sure ``HMQ_T_<topic>`` exists (creating it if
not) and returns its ``TopicStream`` (name, topic, id prefix), cached for the process.
Every stream is a file stream with ``replicas`` copies, ``allow_direct`` (any replica
answers a get by sequence), ``discard: old``; topic streams keep messages ``retention``
seconds (``--retention``) and deduplicate ``Nats-Msg-Id`` over ``dedup_window`` (10 min:
long enough for any SDK retry; a retry later than that would store a second copy, which
is still at-least-once). ``HMQ_TX`` keeps decisions and check counts ``tx_retention``
seconds (1 h: it must outlast ``tx_timeout + tx_check_max × tx_check_interval``, 7.6 min
with the defaults, and stays short because the server holds every subject's state in
memory). ``HMQ_DLQ`` keeps dead letters ``retention`` seconds. ``HMQ_IDS`` keeps the
id-prefix registry forever (one tiny record per topic stream ever created), and
``hmqs.txt.<topic>`` for each topic that ever held a half message (the topics whose
check-backs every gateway runs).
``HMQ_SETTINGS`` is the engine's small key-value space (users, tokens, webhooks: shared
by every gateway): one subject per key, only its last value kept, msgpack values.
``HMQ_GROUPS`` holds one empty record per consumer group that ever had a consumer (its
count is what ``--max-groups`` limits; see ``groups.Groups``), kept forever.

Message-id prefixes: candidate ``k`` is ``naming.stream_id_prefix(stream, created, k)``.
``ensure_topic`` reads ``hmqs.ids.<candidate>`` from ``HMQ_IDS``: the same stream and
creation time → that is its prefix; nothing → claim it with a compare-and-set (expected
last subject sequence 0) and read again (another gateway may have claimed it first, for
the same stream or another); another stream → try ``k + 1``. Every gateway walks the same
candidates in the same order, so all agree without talking to each other.
``topic_of_prefix`` answers the reverse question with one leader read, cached.

Creating a stream that exists with the same configuration is a no-op for the server, so
gateways racing to create a topic's stream all succeed. A stream that exists with a
different configuration (retention changed between gateway runs) is used as it is.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

import msgpack  # type: ignore[import-untyped]

from broker.engines.jetstream import naming
from broker.engines.jetstream.client import (
    ERR_STREAM_NOT_FOUND,
    EngineAPIError,
    EngineClient,
    WrongLastSequenceError,
)
from protocol.errors import LimitExceededError

__all__ = ["StreamSet", "TopicStream"]

_NANOS = 1_000_000_000
ERR_STREAM_NAME_IN_USE = 10058
ERR_NO_PLACEMENT = 10005  # "no suitable peers for placement": a node is not seen online
_PLACEMENT_TRIES = 12  # 3 s


@dataclass(frozen=True, slots=True)
class TopicStream:
    """A topic's stream and the prefix of its message ids."""

    topic: str
    name: str
    prefix: str
    created: str


class StreamSet:
    """The engine's streams, created on demand. Keyword options: ``replicas`` (3),
    ``retention`` (72 h, seconds), ``tx_retention`` (3600 s), ``dedup_window`` (600 s),
    ``max_topics`` (None: no limit; else a topic stream is not created once the engine holds
    that many: ``LimitExceededError``)."""

    def __init__(self, client: EngineClient, *, replicas: int = 3, retention: float = 72 * 3600.0,
                 tx_retention: float = 3600.0, dedup_window: float = 600.0,
                 max_topics: int | None = None) -> None:
        self.client = client
        self.replicas = replicas
        self.max_topics = max_topics
        self.retention = retention
        self.tx_retention = tx_retention
        self.dedup_window = min(dedup_window, retention)
        self._topics: dict[str, TopicStream] = {}
        self._by_prefix: dict[str, TopicStream] = {}
        self._creating: dict[str, asyncio.Future[TopicStream]] = {}
        self._shared_ready = False
        self._transactional: set[str] = set()
        self._schedulable: set[str] = set()

    def _config(self, name: str, subjects: list[str], max_age: float,
                dedup: float | None = None) -> dict[str, object]:
        return {
            "name": name, "subjects": subjects, "storage": "file", "retention": "limits",
            "num_replicas": self.replicas, "max_age": int(max_age * _NANOS), "discard": "old",
            "duplicate_window": int((dedup if dedup is not None else min(self.dedup_window, max_age)) * _NANOS),
            "allow_direct": True, "max_msgs": -1, "max_bytes": -1, "max_msg_size": -1,
            "max_msgs_per_subject": -1, "max_consumers": -1,
        }

    async def _ensure(self, config: dict[str, object], topic: str | None = None) -> dict[str, object]:
        """Stream info of ``config['name']``, creating the stream if it does not exist (a
        ``topic``'s stream only within ``max_topics``)."""
        name = config["name"]
        try:
            return await self.client.api(f"STREAM.INFO.{name}")
        except EngineAPIError as exc:
            if exc.err_code != ERR_STREAM_NOT_FOUND:
                raise
        if topic is not None and self.max_topics is not None:
            await self._check_room(topic, self.max_topics)
        for attempt in range(_PLACEMENT_TRIES):
            try:
                return await self.client.api(f"STREAM.CREATE.{name}", config)
            except EngineAPIError as exc:
                if exc.err_code == ERR_NO_PLACEMENT and attempt + 1 < _PLACEMENT_TRIES:
                    await asyncio.sleep(0.25)  # a node not yet (or briefly not) seen online
                    continue
                if exc.err_code != ERR_STREAM_NAME_IN_USE:
                    raise
                break
        return await self.client.api(f"STREAM.INFO.{name}")

    async def _check_room(self, topic: str, limit: int) -> None:
        """Raise ``LimitExceededError`` if the engine already holds ``limit`` topic streams
        (counted by the engine: one request, whatever the number). Gateways creating topics
        at the same moment can each pass the check, so the limit can be passed by as many
        streams as topics are created at once."""
        resp = await self.client.api("STREAM.NAMES", {"subject": naming.TOPIC_SUBJECTS})
        if int(resp.get("total", 0)) >= limit:
            raise LimitExceededError(
                f"topic {topic!r} not created: the engine holds --max-topics {limit} topics")

    async def ensure_shared(self) -> None:
        """Create ``HMQ_TX``, ``HMQ_DLQ``, ``HMQ_IDS``, ``HMQ_SETTINGS`` and ``HMQ_GROUPS`` if missing."""
        await self._ensure(self._config(naming.TX_STREAM, ["hmqs.tx.>"], self.tx_retention))
        await self._ensure(self._config(naming.DLQ_STREAM, ["hmqs.dlq.>"], self.retention))
        await self._ensure(self._config(naming.IDS_STREAM, ["hmqs.ids.*", "hmqs.txt.*"], 0, dedup=60.0))
        await self._ensure({**self._config(naming.SETTINGS_STREAM, [naming.SETTINGS_SUBJECTS], 0, dedup=0.0),
                            "max_msgs_per_subject": 1})
        await self._ensure({**self._config(naming.GROUPS_STREAM, [naming.GROUPS_SUBJECTS], 0, dedup=0.0),
                            "max_msgs_per_subject": 1})
        self._shared_ready = True

    def known_topic(self, topic: str) -> TopicStream | None:
        """The topic's stream if this process has already ensured it (no I/O)."""
        return self._topics.get(topic)

    async def ensure_topic(self, topic: str) -> TopicStream:
        """The topic's stream, created if needed; raises ``EngineAPIError``/``EngineUnavailableError``."""
        known = self._topics.get(topic)
        if known is not None:
            return known
        pending = self._creating.get(topic)
        if pending is not None:
            return await asyncio.shield(pending)
        fut: asyncio.Future[TopicStream] = asyncio.get_running_loop().create_future()
        self._creating[topic] = fut
        try:
            ts = await self._ensure_topic(topic)
            self._topics[topic] = ts
            self._by_prefix[ts.prefix] = ts
            fut.set_result(ts)
            return ts
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # retrieved: waiters get it through shield
            raise
        finally:
            del self._creating[topic]

    async def _ensure_topic(self, topic: str) -> TopicStream:
        if not self._shared_ready:  # the id registry must exist before a prefix is claimed
            await self.ensure_shared()
        name = naming.topic_stream(topic)
        # (the engine's message scheduler is turned on by ``allow_schedules``, at a topic's
        # first scheduled message: with it, a stream's fail-over was measured slower)
        info = await self._ensure(self._config(name, [f"hmq.{topic}.>"], self.retention), topic)
        config = info.get("config")
        if isinstance(config, dict) and config.get("allow_msg_schedules"):
            self._schedulable.add(name)
        created = str(info["created"])
        want = {"stream": name, "created": created}
        for salt in range(64):
            prefix = naming.stream_id_prefix(name, created, salt)
            subject = naming.id_subject(prefix)
            for _ in range(2):
                found = await self.client.get_last(naming.IDS_STREAM, subject)
                if found is not None:
                    if json.loads(found.data) == want:
                        return TopicStream(topic, name, prefix, created)
                    break  # taken by another stream: next candidate
                try:
                    await self.client.publish(subject, json.dumps(want).encode(),
                                              expected_last_subject_seq=0)
                except WrongLastSequenceError:
                    continue  # someone claimed it meanwhile: read who
                return TopicStream(topic, name, prefix, created)
        raise RuntimeError(f"no free message-id prefix for stream {name}")  # 64 collisions: never

    async def allow_schedules(self, ts: TopicStream) -> None:
        """Make sure the engine's message scheduler runs on ``ts`` (``allow_msg_schedules``;
        a stream created before scheduled messages existed is updated once)."""
        if ts.name in self._schedulable:
            return
        info = await self.client.api(f"STREAM.INFO.{ts.name}")
        config = info["config"]
        if not config.get("allow_msg_schedules"):
            await self.client.api(f"STREAM.UPDATE.{ts.name}", {**config, "allow_msg_schedules": True})
        self._schedulable.add(ts.name)

    async def mark_transactional(self, topic: str) -> None:
        """Record (once, durably) that ``topic`` holds half messages: every gateway then
        runs its check-backs (``transactional_topics``)."""
        if topic in self._transactional:
            return
        await self.client.publish(naming.transactional_subject(topic), b"", msg_id=f"txt:{topic}")
        self._transactional.add(topic)

    async def transactional_topics(self) -> list[str]:
        """Topics that ever held half messages, sorted."""
        info = await self.client.api(f"STREAM.INFO.{naming.IDS_STREAM}", {"subjects_filter": "hmqs.txt.*"})
        return sorted(subject.split(".", 2)[2] for subject in (info["state"].get("subjects") or {}))

    async def topic_of_prefix(self, prefix: str) -> TopicStream | None:
        """The topic stream a message-id prefix names, or None if none (or it was deleted)."""
        known = self._by_prefix.get(prefix)
        if known is not None:
            return known
        found = await self.client.get_last(naming.IDS_STREAM, naming.id_subject(prefix))
        if found is None:
            return None
        entry = json.loads(found.data)
        topic = naming.topic_of_stream(entry["stream"])
        if topic is None:
            return None
        current = await self.ensure_topic_if_exists(topic)
        if current is None or current.created != entry["created"]:
            return None  # the stream was deleted (and maybe made again): its old ids are gone
        return current

    async def ensure_topic_if_exists(self, topic: str) -> TopicStream | None:
        """The topic's stream if it exists (never creates it)."""
        known = self._topics.get(topic)
        if known is not None:
            return known
        try:
            await self.client.api(f"STREAM.INFO.{naming.topic_stream(topic)}")
        except EngineAPIError as exc:
            if exc.err_code == ERR_STREAM_NOT_FOUND:
                return None
            raise
        return await self.ensure_topic(topic)

    # -- settings: one subject per key, the last value kept (SETTINGS_STREAM) ----------

    async def settings_get(self, key: str, default: Any = None) -> Any:
        """The value stored under ``key`` (leader read), or ``default``."""
        found = await self.client.get_last(naming.SETTINGS_STREAM, naming.settings_subject(key))
        return msgpack.unpackb(found.data) if found is not None else default

    async def settings_put(self, key: str, value: Any) -> None:
        """Store ``value`` (msgpack-able) under ``key``; returns once replicated."""
        await self.client.publish(naming.settings_subject(key), msgpack.packb(value))

    async def settings_delete(self, key: str) -> None:
        """Remove ``key`` (a purge of its subject; no error if absent)."""
        await self.client.api(f"STREAM.PURGE.{naming.SETTINGS_STREAM}",
                              {"filter": naming.settings_subject(key)})
        # a purge is no message: tell watching gateways (settings_watch) in one
        await self.client.nc.publish(naming.SETTINGS_CHANGED, naming.token(key).encode())

    async def settings_items(self, prefix: str) -> dict[str, Any]:
        """Every key starting with ``prefix``, with its value, in key order."""
        info = await self.client.api(f"STREAM.INFO.{naming.SETTINGS_STREAM}", {"subjects_filter": naming.SETTINGS_SUBJECTS})
        keys = sorted(k for subject in (info["state"].get("subjects") or {})
                      if (k := naming.untoken(subject.split(".", 2)[2])).startswith(prefix))
        out = {}
        for k in keys:
            found = await self.client.get_last(naming.SETTINGS_STREAM, naming.settings_subject(k))
            if found is not None:
                out[k] = msgpack.unpackb(found.data)
        return out

    async def topics(self) -> list[str]:
        """Every topic that has a stream, sorted."""
        out: list[str] = []
        offset = 0
        while True:
            resp = await self.client.api("STREAM.NAMES", {"offset": offset})
            names = resp.get("streams") or []
            out.extend(t for n in names if (t := naming.topic_of_stream(n)) is not None)
            offset += len(names)
            if not names or offset >= int(resp.get("total", 0)):
                return sorted(out)
