"""``JetStreamEngine``: the operations of ``broker.engines.base.Engine`` on a JetStream cluster.

How this works
--------------
A gateway keeps nothing that must survive: every call becomes engine reads and writes
through the data layer (``messages``, ``ledger``, ``groups``, ``checkback``), and the
answer goes back through the session once the engine has acknowledged what it stored.
The parts, one file each (mixins of this class, as the embedded engine does):

- here: start (the engine check, the connection, the shared streams), stop, sessions,
  producers and the check-back subjects they answer, SEND, END_TX, settings;
- ``delivering``: SUBSCRIBE / ACK / deliveries, one fetch loop per (group, topic) on this
  gateway shared by its members; ``fifo``: FIFO groups (one consumer per queue, one
  message out at a time) and per-group settings; ``pulling``: RECEIVE / SETTLE (leases
  with their own invisible duration, receipt handles valid on any gateway);
- ``txcheck``: the check-back loop, one TXCHECK fetch loop per topic;
- ``admin``: the admin API's reads and actions from stream and consumer state;
- ``scheduling``: scheduled and delayed messages (the engine's message scheduler), RECALL.

No task per message: SENDs of one loop iteration are stored by one task with one
``publish_many`` (each request answered when its own messages are acked), ACKs likewise.
END_TX runs one task per request: per transaction two or three engine round trips in
sequence (compare-and-set the decision, publish the pointer; read the half first unless
this gateway stored it — it remembers the last 100,000 halves' queue and tags, no
bodies); the transactions of one request (the SDK batches the outcomes of one loop
iteration) proceed side by side.

Errors: an engine that does not answer within ``send_deadline`` (15 s: a failover pauses
writes 4–9 s) gives ``BrokerUnavailableError`` (retriable: the SDK tries again, and the
``Nats-Msg-Id`` of a re-sent publish keeps it from being stored twice within one
gateway's retries).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, defaultdict
from typing import Any

import nats.errors

from broker.config import BrokerConfig
from broker.engines.base import Session, end_tx_item
from broker.engines.jetstream import naming
from broker.engines.jetstream.admin import JetStreamAdmin
from broker.engines.jetstream.check import check_engine
from broker.engines.jetstream.checkback import CheckRouter
from broker.engines.jetstream.client import (
    EngineAPIError,
    EngineClient,
    EngineUnavailableError,
    PubAck,
)
from broker.engines.jetstream.delivering import JetStreamDelivering
from broker.engines.jetstream.fifo import JetStreamFifo
from broker.engines.jetstream.groups import Groups
from broker.engines.jetstream.ledger import HalfRecord, TxLedger
from broker.engines.jetstream.messages import MessageWriter
from broker.engines.jetstream.pulling import JetStreamPulling
from broker.engines.jetstream.records import Kind, Record
from broker.engines.jetstream.scheduling import JetStreamScheduling
from broker.engines.jetstream.streams import StreamSet
from broker.engines.jetstream.txcheck import JetStreamTxCheck
from protocol import Op
from protocol.errors import (
    BrokerUnavailableError,
    HalfMQError,
    TopicNotFoundError,
)

__all__ = ["JetStreamEngine", "as_client_error"]

log = logging.getLogger("halfmq.engine")

#: halves remembered (tags and queue, no body) for END_TX on this gateway: ~20 MB at most
_RECENT_HALVES = 100_000


def as_client_error(exc: BaseException) -> HalfMQError:
    """The ``HalfMQError`` a client gets for an engine failure."""
    if isinstance(exc, HalfMQError):
        return exc
    if isinstance(exc, EngineUnavailableError | TimeoutError | nats.errors.Error):
        return BrokerUnavailableError(f"the engine did not answer in time: {exc}")
    if isinstance(exc, EngineAPIError):
        if exc.code == 503:  # "JetStream system temporarily unavailable": e.g. a meta leader election
            return BrokerUnavailableError(f"the engine is unavailable for now: {exc}")
        return HalfMQError(f"engine error: {exc}")
    return HalfMQError(f"internal error: {type(exc).__name__}: {exc}")


class JetStreamEngine(JetStreamDelivering, JetStreamFifo, JetStreamPulling, JetStreamScheduling,
                      JetStreamTxCheck, JetStreamAdmin):
    """The engine of cluster mode (see the module docstring).

    ``config``: the broker's options (timeouts, retry delays, queues, retention, limits).
    Keyword options: ``urls`` (engine client URLs, required), ``replicas`` (3), ``fsync``
    (``"always"``; ``"lazy"`` accepts JetStream's periodic sync), ``monitor_urls`` (the
    monitoring endpoints the engine check reads; default port 8222 of each host),
    ``check`` (run the engine check at start, default True), ``tx_retention`` (seconds
    decisions are kept, 3600), ``send_deadline`` (seconds a write may wait through a
    failover, 15).
    """

    def __init__(self, config: BrokerConfig, *, urls: list[str], replicas: int = 3,
                 fsync: str = "always", monitor_urls: list[str] | None = None, check: bool = True,
                 tx_retention: float = 3600.0, send_deadline: float = 15.0) -> None:
        self.config = config
        self.urls = list(urls)
        self.replicas = replicas
        self.fsync = fsync
        self.monitor_urls = monitor_urls
        self.run_check = check
        self.send_deadline = send_deadline
        self.data_dir = ""  # stateless: nothing on local disk
        self.client = EngineClient(self.urls, name="halfmq gateway")
        self.streams = StreamSet(self.client, replicas=replicas, retention=config.retention,
                                 tx_retention=tx_retention, max_topics=config.max_topics)
        self.ledger = TxLedger(self.client, self.streams)
        self.groups_api = Groups(self.client, self.streams, max_groups=config.max_groups)
        self.writer = MessageWriter(self.client, self.streams, queues=config.default_queues,
                                    deadline=send_deadline)
        # a producer may take as long to answer a check-back as on the embedded engine
        # (max(5 s, 2 intervals)); the TXCHECK lease is extended meanwhile
        self.router = CheckRouter(self.client, timeout=max(5.0, 2 * config.tx_check_interval))
        self.stats = {"sent": 0}
        self._stopping = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loops: list[asyncio.Task[Any]] = []
        self._sends: list[tuple[Session, int, str, list[list[Any]], bool]] = []
        # halves stored through this gateway, without bodies: END_TX need not read them back
        self._recent_halves: OrderedDict[str, HalfRecord] = OrderedDict()
        self._send_scheduled = False
        # producers on this gateway, and the check-back subscriptions they need
        self.producers_by_id: dict[str, Session] = {}
        self.producers_by_group: dict[str, set[Session]] = defaultdict(set)
        self._cb_subs: dict[str, Any] = {}
        self._init_delivering()
        self._init_pulling()
        self._init_txcheck()

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Check the engine, connect, create the shared streams, start the check-back loop.

        Raises ``EngineCheckError`` (refused engine) or ``EngineUnavailableError``."""
        if self.run_check:
            await check_engine(self.urls, replicas=self.replicas, fsync=self.fsync,
                               monitor_urls=self.monitor_urls)
        await self.client.connect()
        try:
            await self.streams.ensure_shared()
            self._loops.append(asyncio.create_task(self._txcheck_discovery(), name="halfmq-txcheck"))
        except BaseException:
            await self.client.close()
            raise

    async def stop(self) -> None:
        """Finish what is in flight (sends, outcomes, acks), stop the loops, disconnect."""
        if self._stopping:
            return
        self._stopping = True
        self._end_receives()  # long polls would hold the stop up
        if self._sends:
            self._flush_sends()
        pending = [t for t in self._tasks if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=self.send_deadline)
        for t in self._loops + [t for t in self._tasks if not t.done()]:
            t.cancel()
        # Python 3.11's wait_for can swallow a cancellation (gh-86296): the loops also check
        # _stopping, and nothing here waits for ever
        if self._loops:
            await asyncio.wait(self._loops, timeout=5.0)
        await self._close_delivering()
        await self._close_pulling()
        await asyncio.wait([asyncio.ensure_future(self.client.close())], timeout=10.0)

    # -- sessions and producers ---------------------------------------------------------

    def session_opened(self, s: Session) -> None:
        """A client connected (nothing to do until it says who it is)."""

    def session_closed(self, s: Session) -> None:
        """The connection is gone: no more deliveries or check-backs to it; leases expire later."""
        if s.client_id and self.producers_by_id.get(s.client_id) is s:
            del self.producers_by_id[s.client_id]
            self._unserve(f"i:{s.client_id}")
        if s.group and s in self.producers_by_group.get(s.group, ()):
            members = self.producers_by_group[s.group]
            members.discard(s)
            if not members:
                del self.producers_by_group[s.group]
                self._unserve(f"g:{s.group}")
        self._member_gone(s)
        self._drop_receives(s)

    def producer_hello(self, s: Session) -> None:
        """Answer check-backs for ``s`` (its instance id, and its group) from now on."""
        if s.client_id:
            known = self.producers_by_id.get(s.client_id)
            self.producers_by_id[s.client_id] = s
            if known is None:
                self._serve(f"i:{s.client_id}")
        if s.group:
            first = s.group not in self.producers_by_group
            self.producers_by_group[s.group].add(s)
            if first:
                self._serve(f"g:{s.group}")

    def _serve(self, key: str) -> None:
        kind, name = key[0], key[2:]

        async def handler(wire: list[Any]) -> asyncio.Future[Any] | None:
            if kind == "i":
                s = self.producers_by_id.get(name)
            else:
                s = next((p for p in self.producers_by_group.get(name, ()) if not p.closed), None)
            if s is None or s.closed:
                return None
            fut = s.request(Op.CHECK, {"m": wire})
            s.flush()
            return fut

        async def subscribe() -> None:
            if kind == "i":
                sub = await self.router.serve_instance(name, handler)
            else:
                sub = await self.router.serve_group(name, handler)
            old = self._cb_subs.pop(key, None)
            if old is not None:
                await old.unsubscribe()
            self._cb_subs[key] = sub

        self._track(subscribe(), f"check-back subscription {key}")

    def _unserve(self, key: str) -> None:
        async def unsubscribe() -> None:
            sub = self._cb_subs.pop(key, None)
            if sub is not None:
                await sub.unsubscribe()

        if not self._stopping:
            self._track(unsubscribe(), f"check-back unsubscription {key}")

    # -- SEND ---------------------------------------------------------------------------

    def send(self, s: Session, rid: int, topic: str, msgs: list[list[Any]], half: bool) -> None:
        """Store ``msgs``; reply ``{"p": prefix, "r": [[pos, queue, offset], ...]}`` once acked."""
        if self._stopping:
            raise BrokerUnavailableError("the broker is stopping")
        self._check_delays(msgs)
        self._sends.append((s, rid, topic, msgs, half))
        if not self._send_scheduled:
            self._send_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_sends)

    def _flush_sends(self) -> None:
        batch, self._sends = self._sends, []
        self._send_scheduled = False
        if batch:
            self._track(self._store_sends(batch), "send")

    async def _store_sends(self, batch: list[tuple[Session, int, str, list[list[Any]], bool]]) -> None:
        answered: set[int] = set()
        try:
            await self._store_batch(batch, answered)
        except BaseException as exc:  # never leave a request unanswered
            for i, (s, rid, *_rest) in enumerate(batch):
                if i not in answered and not s.closed:
                    s.error(rid, as_client_error(exc))
                    s.flush()
            if not isinstance(exc, Exception):
                raise

    async def _store_batch(self, batch: list[tuple[Session, int, str, list[list[Any]], bool]],
                           answered: set[int]) -> None:
        prefixes: dict[str, str | BaseException] = {}
        half_topics = {b[2] for b in batch if b[4]}
        sched_topics = {b[2] for b in batch if any(len(r) > 5 and r[5] and ("at" in r[5] or "delay" in r[5])
                                                   for r in b[3])}
        for topic in {b[2] for b in batch}:
            try:
                ts = (await self.streams.ensure_topic(topic) if self.config.auto_create_topics
                      else await self.streams.ensure_topic_if_exists(topic))
                prefixes[topic] = ts.prefix if ts is not None else TopicNotFoundError(
                    f"topic {topic!r} does not exist and auto-create is off")
                if ts is not None and topic in half_topics:  # before its first half is stored
                    await self.streams.mark_transactional(topic)
                if ts is not None and topic in sched_topics:
                    await self.streams.allow_schedules(ts)
            except Exception as exc:
                prefixes[topic] = exc
        items: list[tuple[str, bytes, dict[str, str] | None]] = []
        dues: list[tuple[int, str, int, str | None, int]] = []  # scheduled: (item, topic, queue, tags, due)
        spans: list[tuple[int, list[int]]] = []
        for s, _rid, topic, msgs, half in batch:
            start, queues = len(items), []
            if half:
                self._watch_topic(topic)  # check-backs of this topic from now on
            if isinstance(prefixes[topic], str):
                for row in msgs:
                    item, q = self.writer.prepare(topic, row, half=half, group=s.group,
                                                  instance=s.client_id)
                    items.append(item)
                    queues.append(q)
                    if not half and len(row) > 5 and row[5] and "at" in row[5]:
                        dues.append((len(items) - 1, topic, q, row[1], int(row[5]["at"])))
            spans.append((start, queues))
        acks: list[Any] = await self.client.publish_many(items, deadline=self.send_deadline) if items else []
        if dues:  # the parked messages are stored: now their schedules
            for i, err in (await self._schedule_parked(dues, acks)).items():
                acks[i] = err
        due_items = {d[0] for d in dues}
        for i, ((s, rid, topic, _msgs, half), (start, queues)) in enumerate(zip(batch, spans, strict=True)):
            answered.add(i)
            prefix = prefixes[topic]
            if s.closed:
                continue
            if not isinstance(prefix, str):
                s.error(rid, as_client_error(prefix))
                s.flush()
                continue
            rows: list[list[int]] = []
            failed: BaseException | None = None
            for j, (ack, q) in enumerate(zip(acks[start:start + len(queues)], queues, strict=True)):
                if not isinstance(ack, PubAck):
                    failed = ack
                    break
                rows.append([ack.seq, q, -1 if half or start + j in due_items else ack.seq])
            if failed is not None:
                s.error(rid, as_client_error(failed))
            else:
                if half:
                    self._remember_halves(topic, prefix, rows, _msgs, s.group)
                self.stats["sent"] += len(rows)
                s.reply(rid, {"p": prefix, "r": rows})
            s.flush()

    def _remember_halves(self, topic: str, prefix: str, rows: list[list[int]],
                         msgs: list[list[Any]], group: str | None) -> None:
        ts = self.streams.known_topic(topic)
        if ts is None:
            return
        now_ms = int(time.time() * 1000)
        recent = self._recent_halves
        for (seq, queue, _off), row in zip(rows, msgs, strict=True):
            msg_id = prefix + f"{seq:016X}"
            ext = {}
            if len(row) > 5 and row[5]:
                ext = {k: v for k, v in (("g", row[5].get("group")), ("d", row[5].get("delay"))) if v}
            recent[msg_id] = HalfRecord(msg_id, ts, seq, queue,
                                        Record(Kind.HALF, tags=row[1], producer_group=group, ext=ext), now_ms)
        while len(recent) > _RECENT_HALVES:
            recent.popitem(last=False)

    def route(self, topic: str) -> int:
        """Queues of ``topic``: every topic stream has ``--default-queues`` queue subjects
        (created on its first send)."""
        return self.config.default_queues

    # -- END_TX -------------------------------------------------------------------------

    def end_tx(self, s: Session, rid: int, items: list[tuple[str, str]], single: bool) -> None:
        """Record outcomes (T6); ``single``: ``{"state": ...}`` or an error, else
        ``{"r": [state | [code, message], ...]}``, once every changed outcome is durable."""
        if self._stopping:
            raise BrokerUnavailableError("the broker is stopping")
        self._track(self._end_tx(s, rid, items, single), "end_tx")

    async def _end_one(self, i: int, item: Any) -> str | HalfMQError:
        try:
            msg_id, outcome = end_tx_item(i, item)
            known = self._recent_halves.pop(msg_id, None)
            return (await self.ledger.end(msg_id, outcome, known=known)).state
        except Exception as exc:
            return as_client_error(exc)

    async def _end_tx(self, s: Session, rid: int, items: list[tuple[str, str]], single: bool) -> None:
        # the items of one request are independent transactions: their engine round trips
        # overlap (a producer's micro-batch of 64 outcomes took 64 x 2 round trips in series)
        if len(items) == 1:
            results = [await self._end_one(0, items[0])]
        else:
            results = list(await asyncio.gather(*(self._end_one(i, item) for i, item in enumerate(items))))
        if s.closed:
            return
        if single:
            r = results[0]
            if isinstance(r, HalfMQError):
                s.error(rid, r)
            else:
                s.reply(rid, {"state": r})
        else:
            s.reply(rid, {"r": [[r.code, str(r)] if isinstance(r, HalfMQError) else r for r in results]})
        s.flush()

    # -- settings -----------------------------------------------------------------------

    async def settings_get(self, key: str, default: Any = None) -> Any:
        """The value stored under ``key``, or ``default``."""
        return await self.streams.settings_get(key, default)

    async def settings_put(self, key: str, value: Any) -> None:
        """Store ``value`` under ``key`` (replicated, acked) before returning."""
        await self.streams.settings_put(key, value)

    async def settings_delete(self, key: str) -> None:
        """Remove ``key`` (no error if absent)."""
        await self.streams.settings_delete(key)

    async def settings_items(self, prefix: str) -> dict[str, Any]:
        """Every key starting with ``prefix``, with its value, in key order."""
        return await self.streams.settings_items(prefix)

    async def settings_watch(self, on_change: Any) -> None:
        """Call ``on_change(key)`` whenever any gateway changes a setting (users, rights,
        tokens written through another gateway): a core subscription to the settings
        subjects, whose puts every subscriber sees, and to the notice a delete publishes."""
        async def on_msg(msg: Any) -> None:
            try:
                key = naming.untoken(msg.data.decode() if msg.subject == naming.SETTINGS_CHANGED
                                     else msg.subject.split(".", 2)[2])
            except (UnicodeDecodeError, IndexError, ValueError):
                return
            on_change(key)

        await self.client.nc.subscribe(naming.SETTINGS_SUBJECTS, cb=on_msg)
        await self.client.nc.subscribe(naming.SETTINGS_CHANGED, cb=on_msg)

