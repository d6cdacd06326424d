"""The embedded engine: one data directory, the ``storage/`` log, and the cores around it.

How this works
--------------
``EmbeddedEngine`` opens the ``MessageStore`` (which recovers the log), rebuilds the
transaction table from the ``%HALF%`` and ``%OP%`` queues and the consumer groups from
their saved offsets and the ``%ACK%`` queue, then serves the calls of
:class:`broker.engines.base.Engine`. Its parts, one file each:

- **sending** (:mod:`.sending`): SENDs are turned into log records and appended in one
  ``store.append`` per loop iteration; replies go out from the append future's callback
  (after the fsync in ``--flush sync``), with no task per message.
- **transactions** (:mod:`.transactions`): a half message is an ``RT_HALF`` record indexed
  in ``%HALF%``; its state lives in ``HalfMessageTable`` (``broker.core.transactions``).
  COMMIT appends an outcome record plus an index entry in the real topic that points at
  the stored half record — the body is never written twice. A timer asks producers about
  old PREPARED ones (check-back) on their own connections.
- **delivering** (:mod:`.delivering`): one ``GroupDelivery`` per consumer group
  (``broker.core.delivery``) decides what goes to whom; this shell runs it when something
  changed, sends the deliveries, and appends the retry / dead-letter / ack records it
  returns.
- **pulling** (:mod:`.pulling`): pull requests (RECEIVE) with per-message leases and
  receipt handles (SETTLE), and per-group settings (FIFO, max attempts, retry delays).
- **scheduling** (:mod:`.scheduling`): delayed and scheduled messages: stored once, found
  again through a timer wheel whose chains live in the log (``broker.core.schedule``),
  released at their millisecond by an index entry in the topic's queue.
- **admin** (:mod:`.admin`): the read-only views and the operator's actions of the admin API.
- **tracing** (:mod:`.tracing`): ``--trace``'s delivery events and the trace of one message.

This file holds what they share: start, recovery, stop, topics and groups, sessions.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from broker.config import BrokerConfig, ConfigError
from broker.core.delivery import GroupDelivery
from broker.core.lifecycle import TxState
from broker.core.records import (
    H_KEYS,
    H_PCLIENT,
    H_PGROUP,
    H_QUEUE,
    H_TAGS,
    H_TOPIC,
    HALF_TOPIC,
    OP_TOPIC,
    RETRY_PREFIX,
    SCHED_TOPIC,
    TRACE_TOPIC,
    header_ext,
    record_msg_id,
    tag_hash,
    tx_ops,
)
from broker.core.transactions import HalfMessageTable
from broker.engines.base import Session
from broker.engines.embedded.admin import EmbeddedAdmin
from broker.engines.embedded.delivering import EmbeddedDelivering
from broker.engines.embedded.pulling import EmbeddedPulling
from broker.engines.embedded.scheduling import EmbeddedScheduling
from broker.engines.embedded.sending import EmbeddedSending
from broker.engines.embedded.tracing import EmbeddedTracing
from broker.engines.embedded.transactions import CODE_OUTCOMES, EmbeddedTransactions
from protocol import DLQ_PREFIX, FRAME_OVERHEAD, LimitExceededError, TopicNotFoundError
from storage import IndexTarget, MessageStore, NewBundle, NewRecord

__all__ = ["EmbeddedEngine"]

log = logging.getLogger("halfmq.broker")

#: ... at most this many resolved transactions stay in full (listed by the admin API).
#: Kept small: a long-lived object per transaction is what the garbage collector walks
#: (measured at 20,000 transactions/s with everything kept 60 s: gen0 pauses of 10-21 ms
#: and a 71 ms gen2 pause within 10 s; tx send->deliver p99 at half rate 23 -> 3.2 ms).
_RESOLVED_LISTED = 1000

#: A SEND of _BUNDLE_MIN to _BUNDLE_MAX plain messages with up to _BUNDLE_BYTES of bodies
#: in all is stored as one bundle record (see storage.framing) in one queue (see .sending).
_BUNDLE_BYTES = 1 << 20


class EmbeddedEngine(EmbeddedSending, EmbeddedTransactions, EmbeddedDelivering, EmbeddedPulling,
                     EmbeddedScheduling, EmbeddedAdmin, EmbeddedTracing):
    """The default engine: everything in one local data directory (see the module docstring)."""

    def __init__(self, config: BrokerConfig) -> None:
        self.config = config
        self.data_dir = str(Path(config.data_dir).resolve())
        self.store: MessageStore | None = None
        self.topics: dict[str, int] = {}
        self.groups: dict[str, GroupDelivery] = {}
        self.tx = HalfMessageTable(
            tx_timeout=config.tx_timeout,
            tx_check_interval=config.tx_check_interval,
            tx_check_max=config.tx_check_max,
            # final states kept to answer a repeated END_TX: ~30 MB at most
            forgotten_capacity=200_000,
            resolved_keep=_RESOLVED_LISTED,
        )
        self.producers_by_id: dict[str, Session] = {}
        self.producers_by_group: dict[str, set[Session]] = defaultdict(set)
        self.stats = {"sent": 0}
        # for the metrics: messages and bytes stored per topic (at most METRIC_TOPICS topics
        # by name, the rest under "_other"), and event counters (see admin.metrics_snapshot)
        self.topic_counts: dict[str, list[int]] = {}
        self.counters: Counter[str] = Counter()
        # --trace: delivery events waiting for the next append (see .tracing)
        self.trace = config.trace
        self._trace_buf: list[list[Any]] = []
        self._trace_nacked: set[tuple[str, str]] = set()  # (group, msg_id) nacked: its lease end is no expiry
        self._stopping = False
        self._tasks: list[asyncio.Task[Any]] = []
        self._saved_offsets: dict[str, dict[tuple[str, int], int]] = {}
        self._saving_starts: dict[str, asyncio.Task[None]] = {}  # group -> saving its new start
        self._joining: set[asyncio.Task[None]] = set()  # subscriptions waiting for that save
        # sending
        self._rr: dict[str, int] = defaultdict(int)
        self._send_records: list[NewRecord | NewBundle] = []
        self._send_entries: list[tuple[Any, ...]] = []
        self._send_count: int = 0  # messages (Stored rows) in _send_records
        self._bundle_bytes: int = _BUNDLE_BYTES
        self._sends_scheduled: bool = False
        self._loop: asyncio.AbstractEventLoop | None = None  # (the running loop, once looked up)
        self._targets: dict[tuple[str, int, int], IndexTarget] = {}  # shared, immutable
        # transactions: pending half message -> (queue, tag hash, size of its record)
        self._half_meta: dict[str, tuple[int, int, int]] = {}
        self._checks_in_flight: dict[str, asyncio.Future[Any]] = {}
        self._next_forget: float = 0.0
        # delivering
        self._consumers: dict[str, Session] = {}  # conn_id -> subscribed session
        self._subscriptions: dict[str, tuple[str, str]] = {}  # conn_id -> (group, topic)
        self._dispatch_scheduled: bool = False
        self._last_saved: dict[str, list[Any]] = {}
        self._last_marks: tuple[Any, ...] = ()
        self._acked_groups: set[GroupDelivery] = set()
        # recovery: acks (group -> [[topic, queue, offset], ...]) and dead letters (group ->
        # msg_id -> store time ms) logged since the saved group progress
        self._replay_acks: dict[str, list[Any]] = {}
        self._replay_dead: dict[str, dict[str, int]] = {}
        # pulling: pending pull requests (member id -> (session, rid, timer, group)), settings
        self._receivers: dict[str, tuple[Session, int, asyncio.TimerHandle, GroupDelivery]] = {}
        self._receiver_seq = 0
        self._group_settings: dict[str, dict[str, Any]] = {}
        self._init_scheduling()

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Open the store and recover. Raises ``DataDirLockedError`` if the directory is
        locked, ``ConfigError`` if its segments cannot hold the largest message."""
        cfg = self.config
        os.makedirs(self.data_dir, exist_ok=True)
        self.store = await MessageStore.open(
            self.data_dir,
            segment_size=cfg.segment_size,
            flush=cfg.flush,
            flush_interval=cfg.flush_interval,
            retention=cfg.retention,
            max_open_indexes=cfg.max_open_indexes,
        )
        # one record of the largest message must fit in a segment (whose size may also have
        # been kept from an older store): refuse to start rather than fail sends later
        seg = self.store.segment_size
        need = cfg.max_message_size + FRAME_OVERHEAD + 4096
        if seg < need:
            await self.store.close()
            self.store = None
            raise ConfigError(
                f"--segment-size {seg} (of the store in {self.data_dir}) cannot hold a message of "
                f"--max-message-size {cfg.max_message_size}: segments need at least {need} bytes; "
                "raise --segment-size (new stores only) or lower --max-message-size")
        # a bundle must fit in a segment too: it holds at most one SEND frame's messages
        # plus per-member framing (bounded by the bundle size), so bundles are only made
        # when a segment has room for two whole frames and that framing
        if seg < 2 * (cfg.max_message_size + FRAME_OVERHEAD) + (256 << 10):
            self._bundle_bytes = -1
            log.info("segments of %d bytes are too small to store send_batch messages as one "
                     "record: one record per message", seg)
        try:
            await self._recover()
            self.store.set_retention_guard(self._retention_guard)
            self._tasks = [
                asyncio.create_task(self._tick_loop(), name="halfmq-tick"),
                asyncio.create_task(self._tx_check_loop(), name="halfmq-tx-check"),
                asyncio.create_task(self._checkpoint_loop(), name="halfmq-checkpoint"),
                asyncio.create_task(self._schedule_persist_loop(), name="halfmq-schedule"),
            ]
            self._arm_walker()
        except BaseException:
            await self.store.close()
            raise

    async def stop(self) -> None:
        """Stop the timers, then finish and fsync the writes and persist group progress."""
        if self._stopping:
            return
        self._stopping = True
        if self._walk_handle is not None:
            self._walk_handle.cancel()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            try:
                await t
            except (asyncio.CancelledError, Exception):
                pass
        if self.store is not None:
            await self.store.flush()
            await self._persist_offsets()
            try:
                await self._persist_schedule()
            except Exception:
                log.exception("schedule: persisting the wheel at stop failed (the log has it)")
            await self.store.close()

    async def _recover(self) -> None:
        store = self.store
        assert store is not None
        md = store.metadata
        self.topics = dict(await md.get_topics())
        await self._recover_unlisted_topics()
        await self._load_group_settings()
        await self._load_offsets()
        # transactions: outcomes first, then halves
        outcomes: dict[str, tuple[TxState, float]] = {}
        for _o, rec in self._scan_queue(OP_TOPIC, 0):
            at = rec.store_time / 1000.0
            for msg_id, code, *_ in tx_ops(rec.header):
                outcomes[msg_id] = (CODE_OUTCOMES[code], at)
        lost = self._commits_without_outcome(outcomes)
        n_prepared = 0
        for _o, rec in self._scan_queue(HALF_TOPIC, 0):
            h = rec.header
            msg_id = record_msg_id(rec)
            self.tx.replay_prepared(
                msg_id, topic=h[H_TOPIC], group=h[H_PGROUP], producer_id=h[H_PCLIENT], keys=tuple(h[H_KEYS]),
                pos=rec.pos, prepared_at=rec.store_time / 1000.0,
            )
            if msg_id in outcomes:
                state, at = outcomes[msg_id]
                self.tx.replay_outcome(msg_id, state, at)
            else:
                n_prepared += 1
                self._half_meta[msg_id] = (h[H_QUEUE], tag_hash(h[H_TAGS]), rec.size)
                delay = (header_ext(h) or {}).get("d")  # type: ignore[arg-type]
                if delay:
                    self._half_delays[msg_id] = delay
        self.tx.after_replay(time.time())
        if lost:
            await self._record_recovered_commits(lost)
        for group in set(self._saved_offsets) | set(self._replay_acks):
            self._group(group)
        self._replay_dead.clear()
        if n_prepared:
            log.info("recovered %d unresolved half messages", n_prepared)
        await self._recover_schedule()

    def _scan_queue(self, topic: str, qid: int, start: int | None = None) -> Any:
        """Every ``(offset, record)`` of a queue from ``start`` (default: its first) on."""
        store = self.store
        assert store is not None
        end = store.queue_end(topic, qid)
        off = store.queue_start(topic, qid) if start is None else max(start, store.queue_start(topic, qid))
        while off < end:
            recs = store.read_queue_records(topic, qid, off, 1024)
            if not recs:
                entries = store.read_queue(topic, qid, off, 1024)
                if not entries:
                    return
                off = entries[-1][0] + 1  # records gone (retention): step over them
                continue
            for o, rec in recs:
                off = o + 1
                yield o, rec

    def _scan_entries(self, topic: str, qid: int, start: int, end: int) -> Any:
        """Every ``(offset, index entry)`` of a queue from ``start`` up to ``end``."""
        store = self.store
        assert store is not None
        off = start
        while off < end:
            entries = store.read_queue(topic, qid, off, min(1024, end - off))
            if not entries:
                return
            for o, entry in entries:
                off = o + 1
                yield o, entry

    def _retention_guard(self) -> int:
        assert self.store is not None
        low = self.store.end_pos
        p = self.tx.min_pending_pos()
        if p is not None:
            low = min(low, p)
        p = self._schedule_guard()
        if p is not None:
            low = min(low, p)
        for gd in self.groups.values():
            for (topic, qid), off in gd.committed_offsets().items():
                entries = self.store.read_queue(topic, qid, off, 1)
                if entries:
                    low = min(low, entries[0][1].pos)
                    if topic.startswith(RETRY_PREFIX):
                        rec = self.store.read(entries[0][1].pos)
                        low = min(low, rec.header.get("rp", low))
        return low

    # -- topics and groups ------------------------------------------------------------

    def queue_count(self, topic: str) -> int:
        """Queues of a topic (system topics included); 0 if it does not exist."""
        n = self.topics.get(topic)
        if n is not None:
            return n
        if topic.startswith(DLQ_PREFIX) or topic in (HALF_TOPIC, OP_TOPIC, SCHED_TOPIC, TRACE_TOPIC):
            return 1
        if topic.startswith(RETRY_PREFIX):
            return len(self.config.retry_delays) + 1
        return 0

    async def _recover_unlisted_topics(self) -> None:
        """List again the topics whose queue indexes exist but whose metadata row does not:
        an auto-created topic's row is written right after its first message is queued,
        and a crash in between left its messages unreachable (a send or subscription to it
        created it anew, or with ``--no-auto-create-topics`` was refused)."""
        assert self.store is not None
        found: dict[str, int] = {}
        for topic, q in self.store.queues():
            if topic not in self.topics and not topic.startswith("%"):
                found[topic] = max(found.get(topic, 0), q + 1)
        for topic, n in sorted(found.items()):
            n = self.topics[topic] = max(n, self.config.default_queues)
            await self.store.metadata.put_topic(topic, n)
            log.warning("recovered topic %s (%d queues) from its queue indexes: its metadata row "
                        "was lost in a crash", topic, n)

    def _ensure_topic(self, topic: str) -> int:
        n = self.topics.get(topic)
        if n is not None:
            return n
        if not self.config.auto_create_topics:
            raise TopicNotFoundError(f"topic {topic!r} does not exist and auto-create is off")
        n = self._add_topic(topic, self.config.default_queues, "")
        assert self.store is not None
        asyncio.get_running_loop().create_task(self.store.metadata.put_topic(topic, n))
        return n

    def _add_topic(self, topic: str, queues: int, by: str) -> int:
        """Register a new ``topic`` with ``queues`` queues (its metadata row is the caller's);
        raises ``LimitExceededError`` past ``--max-topics``. ``by``: who, for the log."""
        if len(self.topics) >= self.config.max_topics:
            raise LimitExceededError(
                f"topic {topic!r} not created: the broker holds --max-topics {self.config.max_topics} topics")
        self.topics[topic] = queues
        log.info("created topic %s with %d queues%s", topic, queues, by)
        for gd in self.groups.values():
            if topic in gd.topics():
                gd.ensure_topic(topic)
        return queues

    def _group(self, group: str) -> GroupDelivery:
        """The delivery state of ``group``, created if needed."""
        gd = self.groups.get(group)
        if gd is None:
            assert self.store is not None
            kw: dict[str, Any] = {"retry_delays": tuple(self.config.retry_delays),
                                  "max_leases": self.config.max_leases,
                                  **self._apply_group_settings(group)}
            gd = self.groups[group] = GroupDelivery(
                group,
                self.store,
                queue_counts=self.queue_count,
                ack_timeout=self.config.ack_timeout,
                offsets=self._saved_offsets.get(group),
                acked=self._replay_acks.pop(group, ()),
                dead=self._replay_dead.get(group),
                **kw,
            )
            saved = self._saved_offsets.get(group) or {}
            for t in {k[0] for k in saved}:
                if not t.startswith(RETRY_PREFIX):
                    gd.ensure_topic(t)
        return gd

    # -- sessions ---------------------------------------------------------------------

    def session_opened(self, s: Session) -> None:
        """A client connected (nothing to do until it says who it is)."""

    def session_closed(self, s: Session) -> None:
        """The connection is gone: its subscription ends, its leases expire later (C5)."""
        if s.client_id and self.producers_by_id.get(s.client_id) is s:
            del self.producers_by_id[s.client_id]
        if s.group:
            members = self.producers_by_group.get(s.group)
            if members is not None:
                members.discard(s)
                if not members:  # no empty set left behind per group name ever seen
                    del self.producers_by_group[s.group]
        self._consumers.pop(s.conn_id, None)
        if self._receivers:
            self._drop_receivers(s)
        sub = self._subscriptions.pop(s.conn_id, None)
        if sub is not None:
            gd = self.groups.get(sub[0])
            if gd is not None:
                gd.member_gone(s.conn_id)

    def producer_hello(self, s: Session) -> None:
        """Register a producer for check-backs (by instance id and by group)."""
        if s.client_id:
            self.producers_by_id[s.client_id] = s
        if s.group:
            self.producers_by_group[s.group].add(s)
