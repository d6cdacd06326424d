"""The broker shell: sockets, timers and the store around the cores.

How this works
--------------
``Broker`` opens the ``MessageStore`` (which recovers the log), rebuilds the transaction
table from the ``%HALF%`` and ``%OP%`` queues, loads consumer offsets, and listens on the
native port (``ClientConnection`` per client) and the admin HTTP port.

- **Sends** are validated, turned into log records and appended in one ``store.append``
  per SEND frame; the reply goes out from the append future's callback (after the fsync
  in ``--flush sync``), with no task per message.
- **Transactions**: a half message is an ``RT_HALF`` record indexed in ``%HALF%``; its
  state lives in ``HalfMessageTable`` (the core in ``broker.transactions``). COMMIT appends
  an outcome record to ``%OP%`` plus an index entry in the real topic that points at the
  stored half record — the body is never written twice. A timer asks producers about old
  PREPARED ones (check-back) on their own connections.
- **Deliveries** are decided by one ``GroupDelivery`` per consumer group (``broker.delivery``);
  the shell runs ``poll`` when something changed (new records, acks, a tick), sends
  DELIVER frames, appends the retry / dead-letter records it returns, and persists
  committed offsets every second and at shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

from broker.config import BrokerConfig, ConfigError
from broker.connection import ClientConnection
from broker.delivery import (
    H_EPOCH,
    H_KEYS,
    H_PCLIENT,
    H_PGROUP,
    H_QUEUE,
    H_TAGS,
    H_TOPIC,
    RETRY_PREFIX,
    RT_COMMIT_REF,
    RT_HALF,
    RT_MSG,
    RT_RETRY,
    RT_TX_OP,
    GroupDelivery,
    retry_topic,
    tag_hash,
)
from broker.lifecycle import TxState
from broker.transactions import HalfMessageTable
from protocol import (
    DLQ_PREFIX,
    FRAME_OVERHEAD,
    PROTOCOL_VERSION,
    BadRequestError,
    BrokerUnavailableError,
    MessageTooLargeError,
    Op,
    RequestTimeoutError,
    TopicNotFoundError,
    TransactionStateError,
    validate_name,
    validate_send_topic,
    validate_subscribe_topic,
)
from protocol.errors import HalfMQError
from storage import BundleTarget, IndexTarget, MessageStore, NewBundle, NewRecord, Record

__all__ = ["Broker", "make_msg_id", "parse_msg_id", "HALF_TOPIC", "OP_TOPIC"]

log = logging.getLogger("halfmq.broker")

#: Seconds a resolved transaction stays in full before only its final state and check
#: count are kept (enough for a repeated END_TX and the admin API) ...
_RESOLVED_KEPT = 60.0
#: ... and at most this many resolved transactions stay in full (listed by the admin API).
#: Kept small: a long-lived object per transaction is what the garbage collector walks
#: (measured at 20,000 transactions/s with everything kept 60 s: gen0 pauses of 10-21 ms
#: and a 71 ms gen2 pause within 10 s; tx send->deliver p99 at half rate 23 -> 3.2 ms).
_RESOLVED_LISTED = 1000

HALF_TOPIC = "%HALF%"
OP_TOPIC = "%OP%"
_OUTCOME_CODES = {TxState.COMMITTED: "C", TxState.ROLLED_BACK: "R", TxState.ABANDONED: "A"}
_CODE_OUTCOMES = {v: k for k, v in _OUTCOME_CODES.items()}
_REPLY_STATES = {TxState.COMMITTED: "COMMITTED", TxState.ROLLED_BACK: "ROLLED_BACK", TxState.ABANDONED: "ABANDONED"}


#: A SEND of _BUNDLE_MIN to _BUNDLE_MAX plain messages (a send_batch, a big micro-batch) with
#: up to _BUNDLE_BYTES of bodies in all is stored as one bundle record (see storage.log), in
#: one queue; otherwise one record per message, round robin over the queues. (Measured:
#: for a few messages per SEND, bundling gains nothing.)
_BUNDLE_MIN = 16
_BUNDLE_MAX = 1000
_BUNDLE_BYTES = 1 << 20


def _time_out(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_exception(RequestTimeoutError("no answer to the check-back in time"))


def make_msg_id(epoch: int, pos: int) -> str:
    """A message id: the store epoch and the log position of the record, in hex."""
    return f"{epoch:08X}{pos:016X}"


def parse_msg_id(msg_id: str) -> int:
    """The log position encoded in a message id; ``ValueError`` if malformed."""
    if not isinstance(msg_id, str) or len(msg_id) != 24:
        raise ValueError(f"malformed message id {msg_id!r}")
    return int(msg_id[8:], 16)


def record_msg_id(rec: Record) -> str:
    """The id of the message stored in ``rec`` (an RT_MSG or RT_HALF record)."""
    return make_msg_id(rec.header[H_EPOCH], rec.pos)


def build_wire(rec: Record, topic: str, qid: int, off: int, reconsume: int, _unused: Any = None) -> list[Any]:
    """The wire form of the message in ``rec`` as delivered from ``topic``."""
    t, g, k, props, born, epoch = rec.header[:6]
    if topic != t:
        props = {**props, "ORIGIN_TOPIC": t}
    return [f"{epoch:08X}{rec.pos:016X}", topic, rec.body, g, k, props, born, rec.store_time, qid, off, reconsume]


class Broker:
    """A halfmq broker; ``async with Broker(BrokerConfig(...)) as b`` runs it in this loop."""

    def __init__(self, config: BrokerConfig | None = None) -> None:
        self.config = config or BrokerConfig()
        self.store: MessageStore | None = None
        self.topics: dict[str, int] = {}
        self.groups: dict[str, GroupDelivery] = {}
        self.tx = HalfMessageTable(
            tx_timeout=self.config.tx_timeout,
            tx_check_interval=self.config.tx_check_interval,
            tx_check_max=self.config.tx_check_max,
            # final states kept to answer a repeated END_TX: ~30 MB at most
            forgotten_capacity=200_000,
            resolved_keep=_RESOLVED_LISTED,
        )
        self.connections: set[ClientConnection] = set()
        self.producers_by_id: dict[str, ClientConnection] = {}
        self.producers_by_group: dict[str, set[ClientConnection]] = defaultdict(set)
        self._saved_offsets: dict[str, dict[tuple[str, int], int]] = {}
        self._rr: dict[str, int] = defaultdict(int)
        self._server: asyncio.AbstractServer | None = None
        self._http: Any = None
        self._tasks: list[asyncio.Task] = []
        self._dispatch_scheduled = False
        self._conn_seq = 0
        self._stopping = False
        self.address = ""
        self.http_url = ""
        self.port = 0
        self.http_port = 0
        self.data_dir = str(Path(self.config.data_dir).resolve())
        self.broker_id = uuid.uuid4().hex[:12]
        self.stats = {"sent": 0, "connections": 0}
        self._last_saved: dict[str, list] = {}
        self._valid_topics: set[str] = set()
        self._send_records: list[NewRecord | NewBundle] = []
        self._send_entries: list[tuple] = []
        self._send_count = 0  # messages (Stored rows) in _send_records
        self._bundle_bytes = _BUNDLE_BYTES
        self._sends_scheduled = False
        # pending half message -> (queue, tag hash, size of its record)
        self._half_meta: dict[str, tuple[int, int, int]] = {}
        self._checks_in_flight: dict[str, asyncio.Future] = {}
        self._targets: dict[tuple[str, int, int], IndexTarget] = {}  # shared, immutable
        self._next_forget = 0.0

    # -- lifecycle ----------------------------------------------------------------------

    async def __aenter__(self) -> Broker:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Open the store, recover, and start listening. Raises ``DataDirLockedError`` if locked."""
        cfg = self.config
        os.makedirs(self.data_dir, exist_ok=True)
        self.store = await MessageStore.open(
            self.data_dir,
            segment_size=cfg.segment_size,
            flush=cfg.flush,
            flush_interval=cfg.flush_interval,
            retention=cfg.retention,
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
        # plus per-member framing (bounded by _BUNDLE_MAX members), so bundles are only
        # made when a segment has room for two whole frames and that framing
        if seg >= 2 * (cfg.max_message_size + FRAME_OVERHEAD) + (256 << 10):
            self._bundle_bytes = _BUNDLE_BYTES
        else:
            self._bundle_bytes = -1
            log.info("segments of %d bytes are too small to store send_batch messages as one "
                     "record: one record per message", seg)
        try:
            await self._recover()
            self.store.set_retention_guard(self._retention_guard)
            loop = asyncio.get_running_loop()
            self._server = await loop.create_server(
                lambda: ClientConnection(self, cfg.max_message_size + FRAME_OVERHEAD),
                cfg.host,
                cfg.port,
                reuse_address=True,
            )
            sock = self._server.sockets[0].getsockname()
            self.port = sock[1]
            self.address = f"{cfg.host}:{self.port}"
            from broker.admin_http import start_admin_http

            self._http, self.http_port = await start_admin_http(self, cfg.host, cfg.http_port)
            self.http_url = f"http://{cfg.host}:{self.http_port}"
            self._tasks = [
                asyncio.create_task(self._tick_loop(), name="halfmq-tick"),
                asyncio.create_task(self._tx_check_loop(), name="halfmq-tx-check"),
                asyncio.create_task(self._checkpoint_loop(), name="halfmq-checkpoint"),
            ]
        except BaseException:
            await self.store.close()
            raise
        log.info("broker started tcp=%s http=%s data=%s flush=%s", self.address, self.http_url, self.data_dir, cfg.flush)

    async def stop(self) -> None:
        """Graceful stop: no new connections, writes finished and fsynced, progress persisted."""
        if self._stopping:
            return
        self._stopping = True
        if self._server is not None:
            self._server.close()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            try:
                await t
            except (asyncio.CancelledError, Exception):
                pass
        for c in list(self.connections):
            c.close()
        if self._http is not None:
            await self._http.cleanup()
        if self.store is not None:
            await self.store.flush()
            await self._persist_offsets()
            await self.store.close()
        log.info("broker stopped")

    async def _recover(self) -> None:
        store = self.store
        assert store is not None
        md = store.metadata
        self.topics = dict(await md.get_topics())
        for key, value in (await md.items("off/")).items():
            group = key[4:]
            self._saved_offsets[group] = {(t, q): o for t, q, o in value}
        # transactions: outcomes first, then halves
        outcomes: dict[str, tuple[TxState, float]] = {}
        end = store.queue_end(OP_TOPIC, 0)
        off = store.queue_start(OP_TOPIC, 0)
        while off < end:
            for o, rec in store.read_queue_records(OP_TOPIC, 0, off, 1024):
                off = o + 1
                outcomes[rec.header["id"]] = (_CODE_OUTCOMES[rec.header["s"]], rec.store_time / 1000.0)
        end = store.queue_end(HALF_TOPIC, 0)
        off = store.queue_start(HALF_TOPIC, 0)
        n_prepared = 0
        while off < end:
            for o, rec in store.read_queue_records(HALF_TOPIC, 0, off, 1024):
                off = o + 1
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
        self.tx.after_replay(time.time())
        for group in self._saved_offsets:
            self._group(group)
        if n_prepared:
            log.info("recovered %d unresolved half messages", n_prepared)

    def _retention_guard(self) -> int:
        assert self.store is not None
        low = self.store.end_pos
        p = self.tx.min_pending_pos()
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
        if topic.startswith(DLQ_PREFIX) or topic in (HALF_TOPIC, OP_TOPIC):
            return 1
        if topic.startswith(RETRY_PREFIX):
            return len(self.config.retry_delays) + 1
        return 0

    def _ensure_topic(self, topic: str) -> int:
        n = self.topics.get(topic)
        if n is not None:
            return n
        if not self.config.auto_create_topics:
            raise TopicNotFoundError(f"topic {topic!r} does not exist and auto-create is off")
        n = self.topics[topic] = self.config.default_queues
        assert self.store is not None
        asyncio.get_running_loop().create_task(self.store.metadata.put_topic(topic, n))
        log.info("created topic %s with %d queues", topic, n)
        for gd in self.groups.values():
            if topic in gd.topics():
                gd.ensure_topic(topic)
        return n

    def _group(self, group: str) -> GroupDelivery:
        gd = self.groups.get(group)
        if gd is None:
            assert self.store is not None
            gd = self.groups[group] = GroupDelivery(
                group,
                self.store,
                queue_counts=self.queue_count,
                retry_delays=tuple(self.config.retry_delays),
                ack_timeout=self.config.ack_timeout,
                offsets=self._saved_offsets.get(group),
            )
            saved = self._saved_offsets.get(group) or {}
            for t in {k[0] for k in saved}:
                if not t.startswith(RETRY_PREFIX):
                    gd.ensure_topic(t)
        return gd

    # -- connections ------------------------------------------------------------------

    def connection_opened(self, conn: ClientConnection) -> None:
        """Called by a new connection."""
        if self._stopping:
            conn.close()
            return
        self._conn_seq += 1
        conn.conn_id = f"c{self._conn_seq}"
        self.connections.add(conn)
        self.stats["connections"] += 1

    def connection_closed(self, conn: ClientConnection) -> None:
        """Called when a connection is gone: its subscription ends, its leases expire later."""
        self.connections.discard(conn)
        if conn.client_id and self.producers_by_id.get(conn.client_id) is conn:
            del self.producers_by_id[conn.client_id]
        if conn.group:
            self.producers_by_group.get(conn.group, set()).discard(conn)
        if conn.subscription is not None:
            gd = self.groups.get(conn.subscription[0])
            if gd is not None:
                gd.member_gone(conn.conn_id)
        log.info("connection %s (%s) closed", conn.peer, conn.client_id)

    def handle_frame(self, conn: ClientConnection, op: int, rid: int, p: Any) -> None:
        """Dispatch one request frame (raises HalfMQError for the client)."""
        if op == Op.SEND:
            self._on_send(conn, rid, p)
        elif op == Op.ACK:
            self._on_ack(conn, rid, p)
        elif op == Op.HELLO:
            self._on_hello(conn, rid, p)
        elif conn.client_id is None:
            raise BadRequestError("the first frame must be HELLO")
        elif op == Op.END_TX:
            self._on_end_tx(conn, rid, p)
        elif op == Op.SUBSCRIBE:
            self._on_subscribe(conn, rid, p)
        elif op == Op.UNSUBSCRIBE:
            if conn.subscription is not None:
                self._group(conn.subscription[0]).unsubscribe(conn.conn_id)
            conn.reply(rid, {})
        elif op == Op.PING:
            conn.reply(rid, {})
        else:
            raise BadRequestError(f"unknown operation {op}")

    def _on_hello(self, conn: ClientConnection, rid: int, p: dict) -> None:
        if p.get("version") != PROTOCOL_VERSION:
            raise BadRequestError(f"unsupported protocol version {p.get('version')!r}; this broker speaks {PROTOCOL_VERSION}")
        client_id = p.get("client_id")
        if not isinstance(client_id, str) or not client_id or len(client_id) > 256:
            raise BadRequestError("client_id must be a non-empty string")
        role = p.get("role")
        if role not in ("producer", "consumer"):
            raise BadRequestError("role must be 'producer' or 'consumer'")
        group = p.get("group")
        if group is not None:
            validate_name(group, "group")
        conn.client_id, conn.role, conn.group = client_id, role, group
        log.info("%s %s connected from %s%s", role, client_id, conn.peer, f" (group {group})" if group else "")
        if role == "producer":
            self.producers_by_id[client_id] = conn
            if group:
                self.producers_by_group[group].add(conn)
        conn.reply(rid, {"version": PROTOCOL_VERSION, "max_message_size": self.config.max_message_size})

    # -- sending ----------------------------------------------------------------------

    def _on_send(self, conn: ClientConnection, rid: int, p: dict) -> None:
        """Validate a SEND and queue its records; ``_flush_sends`` appends them all at once."""
        if conn.client_id is None:
            raise BadRequestError("the first frame must be HELLO")
        topic = p["topic"]
        msgs = p["msgs"]
        half = bool(p.get("half", False))
        if topic not in self._valid_topics:
            validate_send_topic(topic)
            if len(self._valid_topics) < 100_000:
                self._valid_topics.add(topic)
        if type(msgs) is not list or not msgs:
            raise BadRequestError("msgs must be a non-empty list")
        if half and not conn.group:
            raise BadRequestError("half messages need a producer group in the handshake")
        limit = self.config.max_message_size
        for m in msgs:
            body, tags, keys, props, born = m
            if (type(body) is bytes and len(body) <= limit and (tags is None or type(tags) is str)
                    and type(keys) is list and not keys and type(props) is dict and not props and type(born) is int):
                continue  # the common case, checked at once
            if type(body) is not bytes:
                raise BadRequestError("body must be bytes")
            if len(body) > limit:
                raise MessageTooLargeError(f"body of {len(body)} bytes exceeds --max-message-size {limit}")
            if tags is not None and type(tags) is not str:
                raise BadRequestError("tags must be a string or nil")
            if type(keys) is not list:
                raise BadRequestError("keys must be a list of strings")
            for k in keys:
                if type(k) is not str:
                    raise BadRequestError("keys must be a list of strings")
            if type(props) is not dict:
                raise BadRequestError("properties must map strings to strings")
            for k, v in props.items():
                if type(k) is not str or type(v) is not str:
                    raise BadRequestError("properties must map strings to strings")
            if type(born) is not int:
                raise BadRequestError("born timestamp must be an integer")
        # everything is valid: only now may the topic be created and records queued
        nq = self._ensure_topic(topic)
        assert self.store is not None
        epoch = self.store.epoch
        records = self._send_records
        targets = self._targets
        if len(targets) > 100_000:
            targets.clear()
        first = self._send_count
        self._send_count = first + len(msgs)
        rr = self._rr[topic]
        if (not half and _BUNDLE_MIN <= len(msgs) <= _BUNDLE_MAX
                and sum(map(len, bodies := [m[0] for m in msgs])) <= self._bundle_bytes):
            # one record for the lot, in one queue (as a RocketMQ batch): one encoding, one CRC
            qid = rr % nq
            rr += 1
            records.append(NewBundle(
                RT_MSG,
                [[topic, tags, keys, props, born, epoch] for _b, tags, keys, props, born in msgs],
                bodies,
                BundleTarget(topic, qid, [tag_hash(m[1]) for m in msgs]),
            ))
            qids = [qid] * len(msgs)
        else:
            qids = []
            for body, tags, keys, props, born in msgs:
                qid = rr % nq
                rr += 1
                if half:
                    header = [topic, tags, keys, props, born, epoch, conn.group, conn.client_id, qid]
                    records.append(NewRecord(RT_HALF, header, body, IndexTarget(HALF_TOPIC, 0)))
                else:
                    header = [topic, tags, keys, props, born, epoch]
                    th = tag_hash(tags) if tags else 0
                    target = targets.get((topic, qid, th))
                    if target is None:
                        target = targets[(topic, qid, th)] = IndexTarget(topic, qid, th)
                    records.append(NewRecord(RT_MSG, header, body, target))
                qids.append(qid)
        self._rr[topic] = rr
        self._send_entries.append((conn, rid, half, topic, first, qids, msgs))
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        """Have ``_flush_sends`` run once, at the end of this loop iteration."""
        if not self._sends_scheduled:
            self._sends_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_sends)

    def _flush_sends(self) -> None:
        """Append every SEND queued in this loop iteration (all connections) in one store call;
        reply to each when the records are durable."""
        self._sends_scheduled = False
        records, entries = self._send_records, self._send_entries
        if not records:
            return
        self._send_records, self._send_entries = [], []
        self._send_count = 0
        store = self.store
        assert store is not None
        try:
            stored, fut = store.append(records)
        except Exception as exc:
            log.exception("store append failed")
            for conn, rid, *_ in entries:
                conn.error(rid, HalfMQError(f"store failed: {exc}"))
            return
        prefix = f"{store.epoch:08X}"
        replies = []
        any_plain = False
        now = 0.0
        waiters: list[Any] = []
        for conn, rid, half, topic, first, qids, msgs in entries:
            if conn is None:  # records of a transaction outcome: ``rid`` is its future
                waiters.append(rid)
                continue
            part = stored[first : first + len(qids)]
            if half:
                now = now or time.time()
                result = []
                for st, qid, m in zip(part, qids, msgs, strict=True):
                    msg_id = f"{prefix}{st.pos:016X}"
                    self.tx.add(msg_id, topic=topic, group=conn.group, producer_id=conn.client_id,
                                keys=tuple(m[2]), pos=st.pos, now=now)
                    self._half_meta[msg_id] = (qid, tag_hash(m[1]), st.size)
                    result.append([st.pos, qid, -1])
            else:
                any_plain = True
                # rows carry the position; the client makes the id (prefix + 16 hex digits)
                result = [[st.pos, qid, st.queue_offset] for st, qid in zip(part, qids, strict=True)]
            replies.append((conn, rid, {"p": prefix, "r": result}))
        self.stats["sent"] += sum(len(e[5]) for e in entries)

        def done(f: asyncio.Future) -> None:
            exc = f.exception()
            answered: set[ClientConnection] = set()
            for w in waiters:
                if type(w) is tuple:  # a client's END_TX: (conn, rid, reply)
                    if exc is None:
                        w[0].reply(w[1], w[2])
                    else:
                        w[0].error(w[1], HalfMQError(f"store failed: {exc}"))
                    answered.add(w[0])
                elif not w.done():
                    if exc is None:
                        w.set_result(None)
                    else:
                        w.set_exception(exc)
            if exc is not None:
                for conn, rid, _ in replies:
                    conn.error(rid, HalfMQError(f"store failed: {exc}"))
                return
            for conn, rid, reply in replies:
                conn.reply(rid, reply)
                answered.add(conn)
            if (any_plain or waiters) and not self._stopping:
                self.dispatch(flush=True)
            # Write the replies now rather than at the end of the iteration: a callback
            # queued for later can run after the next batch's write, which blocks the loop
            # for an fdatasync (measured: a reply then waited a whole fsync, p50 0.2-1.2 ms).
            for conn in answered:
                conn.flush()

        fut.add_done_callback(done)

    # -- transactions -----------------------------------------------------------------

    def _on_end_tx(self, conn: ClientConnection, rid: int, p: dict) -> None:
        items = p.get("items")
        if items is not None:
            self._on_end_tx_items(conn, rid, items)
            return
        msg_id = p["msg_id"]
        outcome = p["outcome"]
        if outcome not in ("COMMIT", "ROLLBACK"):
            raise BadRequestError("outcome must be COMMIT or ROLLBACK")
        if not isinstance(msg_id, str):
            raise BadRequestError("msg_id must be a string")
        state = TxState.COMMITTED if outcome == "COMMIT" else TxState.ROLLED_BACK
        reply = {"state": _REPLY_STATES[state]}
        recorded, changed = self.tx.resolve(msg_id, state, time.time())
        if changed:
            self._append_outcome(msg_id, recorded, reply_to=(conn, rid, reply))  # replies when durable
        else:
            conn.reply(rid, reply)

    def _on_end_tx_items(self, conn: ClientConnection, rid: int, items: Any) -> None:
        """Many outcomes in one request: ``[[msg_id, outcome], ...]``; the reply ``{"r": [...]}``
        holds, per item, the recorded state or ``[code, message]`` for that item's error.
        Sent once every changed outcome is durable (they share this iteration's append)."""
        if type(items) is not list or not items:
            raise BadRequestError("items must be a non-empty list of [msg_id, outcome]")
        results: list[Any] = []
        reply = {"r": results}
        last_changed: tuple[str, TxState] | None = None
        now = time.time()
        for item in items:
            try:
                msg_id, outcome = item
                if outcome not in ("COMMIT", "ROLLBACK") or not isinstance(msg_id, str):
                    raise BadRequestError("each item must be [msg_id, 'COMMIT' | 'ROLLBACK']")
                state = TxState.COMMITTED if outcome == "COMMIT" else TxState.ROLLED_BACK
                recorded, changed = self.tx.resolve(msg_id, state, now)
            except HalfMQError as exc:
                results.append([exc.code, str(exc)])
                continue
            except (TypeError, ValueError) as exc:
                results.append([BadRequestError.code, f"malformed item: {exc!r}"])
                continue
            results.append(_REPLY_STATES[recorded])
            if changed:
                if last_changed is not None:
                    self._append_outcome(*last_changed, reply_to=False)
                last_changed = (msg_id, recorded)
        if last_changed is None:
            conn.reply(rid, reply)
        else:  # the last record of the batch carries the reply: all share one append
            self._append_outcome(*last_changed, reply_to=(conn, rid, reply))

    def resolve_transaction(self, msg_id: str, state: TxState) -> asyncio.Future | None:
        """Record an outcome once (T6). Returns the append future, or None if nothing changed.

        Raises ``TransactionStateError`` for an unknown id or a conflicting outcome.
        """
        recorded, changed = self.tx.resolve(msg_id, state, time.time())
        if not changed:
            return None
        return self._append_outcome(msg_id, recorded)

    def _append_outcome(self, msg_id: str, state: TxState,
                        reply_to: tuple[ClientConnection, int, dict] | None | bool = None) -> asyncio.Future | None:
        """Queue the outcome record (and, for COMMIT, the index entry pointing at the stored
        half record) into this loop iteration's append. When durable: the client request
        ``reply_to`` is answered, or (without one) the returned future resolves."""
        hm = self.tx.get(msg_id)
        assert hm is not None and self.store is not None
        records = [NewRecord(RT_TX_OP, {"id": msg_id, "s": _OUTCOME_CODES[state], "hp": hm.pos}, b"",
                             IndexTarget(OP_TOPIC, 0))]
        meta = self._half_meta.pop(msg_id, None)
        if state is TxState.COMMITTED:
            topic = hm.topic
            if meta is None:  # not remembered (e.g. recovered from an older log): read the header
                half = self.store.read(hm.pos)
                meta = (half.header[H_QUEUE], tag_hash(half.header[H_TAGS]), half.size)
            nq = self._ensure_topic(topic)
            records.append(NewRecord(RT_COMMIT_REF, {"id": msg_id}, b"",
                                     IndexTarget(topic, meta[0] % nq, meta[1], ref_pos=hm.pos, ref_size=meta[2])))
        fut = asyncio.get_running_loop().create_future() if reply_to is None else None
        self._send_records.extend(records)
        self._send_count += len(records)
        if reply_to is not False:  # False: another outcome of the same request replies
            self._send_entries.append((None, reply_to or fut, False, "", 0, (), ()))
        self._schedule_flush()
        return fut

    async def _tx_check_loop(self) -> None:
        interval = self.config.tx_check_interval
        while True:
            # wake at the next due check (so a check comes soon after --tx-timeout), at
            # least every --tx-check-interval
            due = self.tx.next_due_at()
            delay = interval if due is None else min(interval, max(0.01, due - time.time()))
            await asyncio.sleep(delay)
            try:
                now = time.time()
                if now >= self._next_forget:
                    # resolved transactions keep only their final state after a minute
                    # (enough to answer a repeated END_TX), so memory does not grow per message
                    self.tx.forget_resolved(now - _RESOLVED_KEPT)
                    self._next_forget = now + _RESOLVED_KEPT / 2
                self.run_tx_checks()
            except Exception:
                log.exception("transaction check failed")

    def run_tx_checks(self) -> None:
        """One check-back scan: abandon overdue ones, ask producers about due ones.

        At most one check per transaction is outstanding; a check is counted when it was
        answered (UNKNOWN or a listener failure) or went unanswered for ``_check_timeout``
        on a live connection -- never merely for being sent, so a slow producer is not
        flooded and a late but real answer is not overtaken by abandonment.
        """
        now = time.time()
        for hm in self.tx.abandon_overdue(now):
            self._abandoned(hm.msg_id)
        for hm in self.tx.due_checks(now):
            if hm.msg_id in self._checks_in_flight:
                continue
            conn = self.producers_by_id.get(hm.producer_id)
            if conn is None or conn.closed:
                live = [c for c in self.producers_by_group.get(hm.group, ()) if not c.closed]
                conn = live[0] if live else None
            # the next check is scheduled now; it is counted only when answered
            self.tx.check_unreached(hm.msg_id, now)
            if conn is None:
                continue
            try:
                rec = self.store.read(hm.pos)  # type: ignore[union-attr]
            except Exception:
                log.exception("cannot read half message %s", hm.msg_id)
                continue
            wire = build_wire(rec, hm.topic, rec.header[H_QUEUE], -1, 0)
            fut = conn.request(Op.CHECK, {"m": wire})
            timer = asyncio.get_running_loop().call_later(self._check_timeout, _time_out, fut)
            self._checks_in_flight[hm.msg_id] = fut
            fut.add_done_callback(lambda f, mid=hm.msg_id, t=timer: self._check_answered(mid, f, t))

    @property
    def _check_timeout(self) -> float:
        """How long a check-back may go unanswered before it counts as an UNKNOWN answer."""
        return max(5.0, 2 * self.config.tx_check_interval)

    def _check_answered(self, msg_id: str, fut: asyncio.Future, timer: asyncio.TimerHandle | None = None) -> None:
        if timer is not None:
            timer.cancel()
        self._checks_in_flight.pop(msg_id, None)
        now = time.time()
        state = None
        exc = None if fut.cancelled() else fut.exception()
        if fut.cancelled() or isinstance(exc, BrokerUnavailableError):
            return  # the connection went away: the check did not reach anyone, not counted
        if exc is None:
            answer = fut.result()
            state = answer.get("state") if isinstance(answer, dict) else None
        # answered (or timed out on a live connection): one check that reached a producer
        self.tx.check_reached(msg_id, now)
        try:
            if state == "COMMIT":
                self.resolve_transaction(msg_id, TxState.COMMITTED)
                return
            if state == "ROLLBACK":
                self.resolve_transaction(msg_id, TxState.ROLLED_BACK)
                return
        except TransactionStateError as err:
            recorded = self.tx.state_of(msg_id)
            if recorded is TxState.ABANDONED:
                log.warning("check-back answered %s for %s after it was abandoned: the outcome "
                            "stays ABANDONED (%s)", state, msg_id, err)
            return  # resolved meanwhile by an END_TX: the recorded outcome stands
        # UNKNOWN, a failing listener, or no answer in time
        if self.tx.check_unknown(msg_id, now) is TxState.ABANDONED:
            self._abandoned(msg_id)

    def _abandoned(self, msg_id: str) -> None:
        hm = self.tx.get(msg_id)
        log.warning("transaction %s abandoned after %d check-backs (topic %s, group %s): never delivered",
                    msg_id, hm.checks if hm else -1, hm.topic if hm else "?", hm.group if hm else "?")
        self._append_outcome(msg_id, TxState.ABANDONED)

    # -- consuming --------------------------------------------------------------------

    def _on_subscribe(self, conn: ClientConnection, rid: int, p: dict) -> None:
        group = validate_name(p["group"], "group")
        topic = validate_subscribe_topic(p["topic"])
        tags = p.get("tags", "*")
        if tags is not None and not isinstance(tags, str):
            raise BadRequestError("tags must be a string")
        start = p.get("start", "earliest")
        if start not in ("earliest", "latest"):
            raise BadRequestError("start must be 'earliest' or 'latest'")
        prefetch = int(p.get("prefetch", 64))
        max_re = int(p.get("max_reconsume_times", 16))
        if prefetch < 1 or max_re < 0:
            raise BadRequestError("prefetch must be >= 1 and max_reconsume_times >= 0")
        if conn.subscription is not None:
            raise BadRequestError("this connection already has a subscription")
        if not topic.startswith("%"):
            self._ensure_topic(topic)
        gd = self._group(group)
        gd.subscribe(conn.conn_id, topic, tags=tags, prefetch=prefetch, max_reconsume_times=max_re, start=start)
        conn.subscription = (group, topic)
        log.info("consumer %s (%s) subscribed: group %s, topic %s, tags %s, start %s, prefetch %d",
                 conn.client_id, conn.peer, group, topic, tags, start, prefetch)
        conn.reply(rid, {})
        self.schedule_dispatch()

    def _on_ack(self, conn: ClientConnection, rid: int, p: dict) -> None:
        if conn.subscription is None:
            raise BadRequestError("ACK without a subscription")
        gd = self.groups[conn.subscription[0]]
        now = time.time()
        pending = []
        for token, ok in p["a"]:
            r = gd.ack(conn.conn_id, token, bool(ok), now)
            if r is not None:
                pending.append(r)
        if pending:
            fut = self._append_pending(gd, pending)
            if rid:
                fut.add_done_callback(lambda f: conn.reply(rid, {}))
        else:
            conn.reply(rid, {})
        self.schedule_dispatch()

    def _append_pending(self, gd: GroupDelivery, pending: list) -> asyncio.Future:
        assert self.store is not None
        _, fut = self.store.append([pr.record for pr in pending])

        def done(f: asyncio.Future) -> None:
            if f.exception() is None:
                for pr in pending:
                    gd.record_durable(pr.qkey, pr.offset)
            self.schedule_dispatch()

        fut.add_done_callback(done)
        return fut

    def schedule_dispatch(self) -> None:
        """Run ``dispatch`` soon (once per loop iteration however often it is asked)."""
        if not self._dispatch_scheduled and not self._stopping:
            self._dispatch_scheduled = True
            asyncio.get_running_loop().call_soon(self.dispatch)

    def dispatch(self, flush: bool = False) -> None:
        """Lease what can be delivered to every group's members with room; with ``flush``,
        write the deliveries now instead of at the end of the loop iteration."""
        self._dispatch_scheduled = False
        now = time.time()
        by_id = {c.conn_id: c for c in self.connections if c.subscription is not None}
        for gd in self.groups.values():
            if not gd.members:
                continue
            try:
                out, _wake = gd.poll(now, build_wire)
            except Exception:
                log.exception("delivery poll failed for group %s", gd.group)
                continue
            if not out:
                continue
            per_conn: dict[str, list] = defaultdict(list)
            for member_id, token, wire in out:
                per_conn[member_id].append([token, wire])
            for member_id, items in per_conn.items():
                c = by_id.get(member_id)
                if c is not None:
                    c.send_frame(Op.DELIVER, 0, {"d": items})
                    if flush:
                        c.flush()

    async def _tick_loop(self) -> None:
        """Expire leases and release due retries; cheap when idle."""
        while True:
            await asyncio.sleep(0.05)
            now = time.time()
            for gd in list(self.groups.values()):
                expired = gd.expire(now)
                if expired:
                    self._append_pending(gd, expired)
            self.dispatch()

    async def _checkpoint_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            try:
                await self._persist_offsets()
            except Exception:
                log.exception("checkpoint failed")

    async def _persist_offsets(self) -> None:
        assert self.store is not None
        items = {}
        for name, gd in self.groups.items():
            offs = gd.committed_offsets()
            value = [[t, q, o] for (t, q), o in offs.items()]
            if self._last_saved.get(name) != value:
                items[f"off/{name}"] = value
                self._last_saved[name] = value
        if items:
            await self.store.metadata.put_many(items)

    # -- admin helpers ----------------------------------------------------------------

    def read_message(self, msg_id: str) -> Record:
        """The stored record of a message id; KeyError if there is none."""
        assert self.store is not None
        try:
            pos = parse_msg_id(msg_id)
            rec = self.store.read(pos)
        except (ValueError, KeyError, OSError) as exc:
            raise KeyError(msg_id) from exc
        if rec.rtype not in (RT_MSG, RT_HALF) or record_msg_id(rec) != msg_id:
            raise KeyError(msg_id)
        return rec

    def resend_from_dlq(self, group: str, msg_id: str) -> asyncio.Future:
        """Send a dead-lettered message back to its original topic for ``group`` only."""
        assert self.store is not None
        validate_name(group, "group")
        dlq = DLQ_PREFIX + group
        found = None
        end = self.store.queue_end(dlq, 0)
        off = self.store.queue_start(dlq, 0)
        while off < end and found is None:
            for o, entry in self.store.read_queue(dlq, 0, off, 1024):
                off = o + 1
                rec = self.store.read(entry.pos)
                if record_msg_id(rec) == msg_id:
                    found = rec
                    break
        if found is None:
            raise KeyError(msg_id)
        h = found.header
        topic = h[H_TOPIC]
        level = len(self.config.retry_delays)
        rec = NewRecord(RT_RETRY, {"id": msg_id, "rp": found.pos, "rt": 0, "ot": topic, "oq": h[H_QUEUE] if len(h) > H_QUEUE else 0,
                                   "oo": -1, "g": group, "resent": True},
                        b"", IndexTarget(retry_topic(group), level, tag_hash(h[H_TAGS])))
        self._group(group)
        _, fut = self.store.append([rec])
        fut.add_done_callback(lambda f: self.schedule_dispatch())
        return fut
