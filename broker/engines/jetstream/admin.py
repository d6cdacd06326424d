"""The admin views and actions of the JetStream engine, from the engine's own state.

How this works
--------------
Nothing is kept for the admin API: topics and their counts come from stream info
(``subjects_filter`` gives per-subject counts, summed per queue), groups from consumer
info (delivered, ack floor, ack pending = in flight, redelivered, pending = lag), a
message by id is one get. Views that must look through records are bounded scans, said
so in their docstrings: ``admin_find`` (keys are not subjects, reference 4.3: at most
``scan_limit`` records from the newest back) and ``admin_transactions`` (prepared ones:
the halves still held by a TXCHECK consumer; resolved ones: the newest ``scan_limit``
decisions). The actions go through the data plane's paths (``ledger.end``,
``groups.resend``).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from broker.core.records import wire_json
from broker.engines.jetstream import naming
from broker.engines.jetstream.ledger import STATES
from broker.engines.jetstream.parts import EngineParts
from broker.engines.jetstream.records import Kind, decode_record
from protocol import DLQ_PREFIX, validate_name
from protocol.errors import BadRequestError

__all__ = ["JetStreamAdmin"]

log = logging.getLogger("halfmq.engine")

SCAN_LIMIT = 10_000
#: Pending schedules read at most per topic for its ``next_due``.
NEXT_DUE_BUDGET = 1_000


class JetStreamAdmin(EngineParts):
    """The admin part of :class:`JetStreamEngine` (see the module docstring)."""

    if TYPE_CHECKING:  # provided by ``scheduling``
        async def _pending_schedules(self, ts: Any, budget: int) -> tuple[int, list[tuple[int, int]]]: ...

        async def _schedule_state(self, ts: Any, seq: int, due: int) -> dict[str, Any]: ...

    async def admin_stats(self) -> dict[str, Any]:
        """Messages sent through this gateway, and the engine's account usage."""
        info = await self.client.api("INFO")
        return {"engine": "jetstream", "sent": self.stats.get("sent", 0),
                "engine_account": {k: info.get(k) for k in ("memory", "storage", "streams", "consumers")}}

    async def _subject_counts(self, stream: str, filt: str) -> dict[str, int]:
        info = await self.client.api(f"STREAM.INFO.{stream}", {"subjects_filter": filt})
        return dict(info["state"].get("subjects") or {})

    async def admin_topics(self) -> list[dict[str, Any]]:
        """Topics with visible messages per queue (and their halves), ``%DLQ%`` ones too."""
        out = []
        for topic in await self.streams.topics():
            counts = await self._subject_counts(naming.topic_stream(topic), f"hmq.{topic}.>")
            per_queue: dict[int, int] = {}
            halves = scheduled = 0
            for subject, n in counts.items():
                if subject.startswith(f"hmq.{topic}.s."):  # a pending schedule (``scheduling``)
                    scheduled += 1
                    continue
                if subject.startswith(f"hmq.{topic}.x."):  # a recall marker
                    continue
                kind, _g, queue, _t = naming.parse_topic_subject(subject)
                if kind == "h":
                    halves += n
                elif kind != "p":  # parked scheduled messages count when due, as pointers
                    per_queue[queue] = per_queue.get(queue, 0) + n
            queues = [{"queue_id": q, "messages": per_queue.get(q, 0)}
                      for q in range(max(self.config.default_queues, max(per_queue, default=-1) + 1))]
            row = {"topic": topic, "queues": queues, "messages": sum(per_queue.values()),
                   "half_messages": halves, "scheduled": scheduled}
            if scheduled:
                _n, pending = await self._pending_schedules(await self.streams.ensure_topic(topic), NEXT_DUE_BUDGET)
                row["next_due"] = min(due for due, _seq in pending) if pending else None
            out.append(row)
        for subject, n in sorted((await self._subject_counts(naming.DLQ_STREAM, "hmqs.dlq.>")).items()):
            out.append({"topic": DLQ_PREFIX + subject.split(".", 2)[2],
                        "queues": [{"queue_id": 0, "messages": n}], "messages": n})
        return out

    async def admin_create_topic(self, topic: str, queues: int | None) -> dict[str, Any]:
        """Create ``topic``'s stream (the name checked by the caller), whether or not topics
        are auto-created; one that exists is left as it is. Every topic of a cluster has
        ``--default-queues`` queues: another count raises ``BadRequestError``. Returns
        ``{"topic", "queues", "created"}``."""
        # (imported here: the engine module imports this one)
        from broker.engines.jetstream.engine import as_client_error

        n = self.config.default_queues
        if queues is not None and queues != n:
            raise BadRequestError(f"topic {topic!r} not created: every topic of a cluster has "
                                  f"--default-queues ({n}) queues")
        try:
            created = await self.streams.ensure_topic_if_exists(topic) is None
            if created:
                await self.streams.ensure_topic(topic)
        except Exception as exc:
            raise as_client_error(exc) from exc
        if created:
            log.info("created topic %s (admin API)", topic)
        return {"topic": topic, "queues": n, "created": created}

    async def admin_groups(self) -> list[dict[str, Any]]:
        """Per group: topics, members on this gateway, delivered, acked, in flight,
        redelivered, lag (summed over its topics' consumers)."""
        groups: dict[str, dict[str, Any]] = {}
        for topic in await self.streams.topics():
            resp = await self.client.api(f"CONSUMER.LIST.{naming.topic_stream(topic)}", {"offset": 0})
            for info in resp.get("consumers") or []:
                name = info["name"]
                group = _group_of_consumer(name)
                if group is None:
                    continue
                g = groups.setdefault(group, {"group": group, "topics": [], "members": 0, "delivered": 0,
                                              "acked": 0, "in_flight": 0, "redelivered": 0, "lag": 0})
                if topic not in g["topics"]:  # (a FIFO group has a consumer per queue)
                    g["topics"].append(topic)
                g["delivered"] += int(info["delivered"]["stream_seq"] and info["delivered"]["consumer_seq"])
                g["acked"] += int(info["ack_floor"]["consumer_seq"])
                g["in_flight"] += int(info.get("num_ack_pending", 0))
                g["redelivered"] += int(info.get("num_redelivered", 0))
                g["lag"] += int(info.get("num_pending", 0))
        for group, g in groups.items():
            pumps = [self._pumps.get((group, t)) for t in g["topics"]]
            g["members"] = sum(len(pump.members) for pump in pumps if pump is not None)
        return [groups[k] for k in sorted(groups)]

    async def admin_message(self, msg_id: str) -> dict[str, Any] | None:
        """The message (and its transaction state if it was a half); None if there is none."""
        found = await self.ledger.lookup(msg_id)
        if found is None:
            return None
        ts, seq, queue, rec, stored_ms = found
        half = rec.kind is Kind.HALF
        due = rec.ext.get("at") if rec.kind is Kind.MESSAGE else None  # a parked scheduled message
        body = wire_json([msg_id, ts.topic, rec.body, rec.tags, rec.keys, rec.properties, rec.born_ms,
                          stored_ms, queue, -1 if half or due is not None else seq, 0])
        visible: int | None = seq
        if due is not None:
            body["schedule"] = await self._schedule_state(ts, seq, int(due))
            visible = await self._pointer_seq(ts, seq) if body["schedule"]["state"] == "released" else None
        if half:
            code = await self.ledger.decision(msg_id)
            count, _ = await self.ledger.checks(msg_id)
            body["transaction"] = {"state": STATES[code] if code else "PREPARED", "checks": count}
            visible = await self._pointer_seq(ts, seq) if code == "C" else None
        body["groups"] = await self._group_states(ts, visible)
        return body

    async def _pointer_seq(self, ts: Any, half_seq: int) -> int | None:
        """Sequence of the commit pointer of the half at ``half_seq``: a bounded scan of the
        visible records stored after it (the pointer is written right after the decision)."""
        for seq, _subject, data, _t in await self._scan(ts.name, f"hmq.{ts.topic}.m.>", newest=SCAN_LIMIT,
                                                         start=half_seq + 1):
            try:
                rec = decode_record(data)
            except ValueError:
                continue
            if rec.kind is Kind.POINTER and rec.half_seq == half_seq:
                return seq
        return None

    async def _group_states(self, ts: Any, visible: int | None) -> dict[str, Any]:
        """The message's state in each group of its topic, from the group's consumer: at or
        below its ack floor ``acked``; delivered but above the floor ``in_flight`` (leased,
        or acked out of order: the engine keeps no per-message ack we could read);
        not delivered yet ``pending``. A message never visible (prepared, rolled back) is
        ``pending`` nowhere: no group lists it."""
        if visible is None:
            return {}
        states: dict[str, Any] = {}
        resp = await self.client.api(f"CONSUMER.LIST.{ts.name}", {"offset": 0})
        for info in resp.get("consumers") or []:
            name = info["name"]
            if not name.startswith("G_"):
                continue
            if visible <= int(info["ack_floor"]["stream_seq"]):
                state = "acked"
            elif visible <= int(info["delivered"]["stream_seq"]):
                state = "in_flight"
            else:
                state = "pending"
            states[name[2:]] = {"state": state, "deliveries": 0 if state == "pending" else 1}
        return states

    async def _scan(self, stream: str, subject: str, *, newest: int, start: int | None = None) -> list[Any]:
        """Up to ``newest`` records of ``subject`` in ``stream``, oldest first (bounded scan):
        the newest ones, or with ``start`` the first ones from that sequence on."""
        info = await self.client.api(f"STREAM.INFO.{stream}")
        last = int(info["state"]["last_seq"])
        seq = max(1, last - newest + 1) if start is None else start
        out: list[Any] = []
        while seq <= last and len(out) < newest:
            msg = await self.client.request(f"$JS.API.DIRECT.GET.{stream}",
                                            f'{{"seq": {seq}, "next_by_subj": "{subject}"}}'.encode())
            hdrs = msg.headers or {}
            if hdrs.get("Status"):
                break
            found = int(hdrs["Nats-Sequence"])
            out.append((found, hdrs["Nats-Subject"], msg.data, hdrs.get("Nats-Time-Stamp")))
            seq = found + 1
        return out

    async def admin_find(self, topic: str, key: str, limit: int = 100) -> list[dict[str, Any]]:
        """Messages of ``topic`` carrying key ``key``: a scan of its newest ``SCAN_LIMIT``
        records (keys are not indexed in cluster mode)."""
        ts = await self.streams.ensure_topic_if_exists(topic)
        if ts is None:
            return []
        out = []
        for seq, subject, data, _t in await self._scan(ts.name, f"hmq.{topic}.m.>", newest=SCAN_LIMIT):
            try:
                rec = decode_record(data)
            except ValueError:
                continue
            if rec.kind is Kind.POINTER:
                stored = await self.client.get(ts.name, rec.half_seq)
                if stored is None:
                    continue
                seq, rec = rec.half_seq, decode_record(stored.data)
            if key in rec.keys:
                queue = naming.parse_topic_subject(subject)[2]
                out.append(wire_json([naming.encode_msg_id(ts.prefix, seq), topic, rec.body, rec.tags,
                                      rec.keys, rec.properties, rec.born_ms, 0, queue, seq, 0]))
                if len(out) >= limit:
                    break
        return out

    async def admin_transactions(self, state: Any) -> list[dict[str, Any]]:
        """Half messages in ``state`` (a ``TxState``). PREPARED: halves not yet settled by a
        TXCHECK consumer and without a decision; others: the newest ``SCAN_LIMIT`` decisions."""
        name = getattr(state, "name", str(state)).upper()
        now = time.time()
        out: list[dict[str, Any]] = []
        if name == "PREPARED":
            for topic in await self.streams.topics():
                ts = await self.streams.ensure_topic(topic)
                try:
                    info = await self.client.api(f"CONSUMER.INFO.{ts.name}.{naming.TXCHECK_CONSUMER}")
                    floor = int(info["ack_floor"]["stream_seq"])
                except Exception:
                    floor = 0
                for seq, _subject, data, _t in await self._scan(ts.name, f"hmq.{topic}.h.>", newest=SCAN_LIMIT):
                    if seq <= floor:
                        continue
                    msg_id = naming.encode_msg_id(ts.prefix, seq)
                    if await self.ledger.decision(msg_id) is not None:
                        continue
                    rec = decode_record(data)
                    stored = await self.client.get(ts.name, seq)
                    count, _ = await self.ledger.checks(msg_id)
                    out.append({"msg_id": msg_id, "topic": topic, "keys": rec.keys,
                                "group": rec.producer_group, "producer_id": rec.producer_instance,
                                "state": "PREPARED", "checks": count,
                                "age": round(now - (stored.time_ms / 1000 if stored else now), 3)})
            return out
        code = {v: k for k, v in STATES.items()}.get(name)
        if code is None:
            return []
        for _seq, subject, data, _t in await self._scan(naming.TX_STREAM, "hmqs.tx.d.*", newest=SCAN_LIMIT):
            if data.decode() == code:
                msg_id = subject.rsplit(".", 1)[1]
                row: dict[str, Any] = {"msg_id": msg_id, "state": name}
                found = await self.ledger.lookup(msg_id)
                if found is not None:
                    ts, _s, _q, rec, stored_ms = found
                    row.update(topic=ts.topic, keys=rec.keys, group=rec.producer_group,
                               producer_id=rec.producer_instance,
                               age=round(now - stored_ms / 1000, 3))
                row["checks"] = (await self.ledger.checks(msg_id))[0]
                out.append(row)
        return out

    async def admin_resend(self, group: str, msg_id: str) -> None:
        """Send a dead letter back to its topic for ``group`` only; ``KeyError`` if absent."""
        validate_name(group, "group")
        if await self.groups_api.resend(group, msg_id) is None:
            raise KeyError(msg_id)

    async def admin_resolve(self, msg_id: str, state: Any) -> None:
        """Resolve a prepared transaction by hand (``TransactionStateError`` if it cannot be)."""
        name = getattr(state, "name", str(state)).upper()
        outcome = {"COMMITTED": "COMMIT", "ROLLED_BACK": "ROLLBACK"}[name]
        await self.ledger.end(msg_id, outcome)


def _group_of_consumer(name: str) -> str | None:
    """The consumer group a topic stream's consumer serves: ``G_<group>``, or a FIFO
    group's ``F<queue>_<group>``; None for others (``TXCHECK``)."""
    if name.startswith("G_"):
        return name[2:]
    head, sep, group = name.partition("_")
    if sep and head[:1] == "F" and head[1:].isdigit():
        return group
    return None
