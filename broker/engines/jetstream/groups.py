"""Consumer groups on the engine: durable pull consumers, leases, retries, dead letters.

How this works
--------------
A consumer group ``G`` on topic ``T`` is one durable pull consumer ``G_<G>`` on
``HMQ_T_<T>``, shared by every member on every gateway (SPEC C2: the engine hands each
message to one fetch at a time). Its configuration carries halfmq's delivery rules:

- ``ack_policy: explicit``, ``ack_wait`` = ``--ack-timeout``: a delivery is a lease; not
  acked in time, the engine redelivers it with its delivery count raised (C5).
- ``max_deliver: -1``: the engine never gives up by itself; halfmq decides when a message
  is dead (C4), so no advisory has to be watched.
- ``filter_subjects``: the group's tag subjects (``naming.tag_filter_subjects``, C6) plus
  ``hmq.<T>.r.<G>.>`` (dead letters sent back to this group only).
- ``deliver_policy``: ``all`` for ``start="earliest"``, ``new`` for ``"latest"`` (C7); set
  when the group is created and never changed after (as the embedded broker does).
- ``max_ack_pending: -1``: gateways bound what is in flight by each member's prefetch (C10).

A ``Delivery`` wraps one fetched message: ``attempt`` = delivery count − 1 =
``reconsume_times``. ``ack()`` waits for the engine's confirmation; ``retry(delay)`` is a
NAK with that delay (the retry ladder, C3, held by the engine across restarts);
``dead_letter()`` publishes a copy to ``hmqs.dlq.<G>`` (``Nats-Msg-Id =
dlq:<G>:<msg_id>``: a repeat after a crash stores it once) and then terminates the
delivery (no redelivery ever). ``resolve()`` turns the record into the native wire
message; a commit pointer costs one get of its half (the body is stored once).

``%DLQ%<G>`` is consumable: a consumer on ``HMQ_DLQ`` filtered on ``hmqs.dlq.<G>``.
``TXCHECK`` (one per topic, on ``hmq.<T>.h.>``, ``ack_wait`` 30 s) hands each half message
to one gateway at a time for its check-back (``ledger``, ``checkback``).

``--max-groups``: a group's first consumer (on any gateway) records the group in
``HMQ_GROUPS`` first, refused with ``LimitExceededError`` once that stream holds
``max_groups`` groups.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nats.aio.msg import Msg

from broker.engines.jetstream import naming
from broker.engines.jetstream.client import (
    ERR_CONSUMER_NOT_FOUND,
    EngineAPIError,
    EngineClient,
    PubAck,
)
from broker.engines.jetstream.pull import Puller
from broker.engines.jetstream.records import Kind, Record, decode_record, encode_dead
from broker.engines.jetstream.streams import StreamSet
from protocol.errors import LimitExceededError

__all__ = ["DLQ_TOPIC_PREFIX", "ConsumerHandle", "Delivery", "GroupSpec", "Groups"]

_NANOS = 1_000_000_000
#: groups a gateway remembers as registered (past it, it asks the engine again: one get)
_REGISTERED_CACHE = 100_000
DLQ_TOPIC_PREFIX = "%DLQ%"
ORIGIN_TOPIC = "ORIGIN_TOPIC"


@dataclass(frozen=True, slots=True)
class GroupSpec:
    """A subscription's rules: ``start`` earliest/latest, ``ack_wait`` seconds."""

    group: str
    topic: str
    tags: str = "*"
    start: str = "earliest"
    ack_wait: float = 60.0
    max_reconsume_times: int = 16

    @property
    def is_dlq(self) -> bool:
        return self.topic.startswith(DLQ_TOPIC_PREFIX)


CONFIRM_TIMEOUT = 3.0  # the engine's answer to an ack / NAK / TERM / in-progress (clients wait 5 s)
# a NAK always carries a delay: the consumer's leader replicates a delayed NAK (a new
# deadline for the message), while a plain one lives in its memory only, lost with a
# leader change (the message would wait out the whole ack wait)
NAK_MIN_DELAY = 0.001
ACK = b""
TERM = b"+TERM"


def nak_action(delay: float) -> bytes:
    """A NAK redelivering after ``delay`` seconds (at least ``NAK_MIN_DELAY``)."""
    return b'-NAK {"delay": %d}' % int(max(delay, NAK_MIN_DELAY) * 1e9)


@dataclass(slots=True)
class Delivery:
    """One message fetched from a group's consumer (a lease until acked, retried or dead)."""

    msg: Msg
    handle: ConsumerHandle
    stream_seq: int
    attempt: int  # reconsume_times: deliveries before this one
    time_ms: int  # when the engine stored it
    record: Record
    subject: str

    async def ack(self, timeout: float = 5.0) -> None:
        """Ack and wait until the engine confirms it (raises ``nats.errors.TimeoutError``)."""
        await self.msg.ack_sync(timeout=timeout)

    async def retry(self, delay: float) -> None:
        """NAK: redeliver after ``delay`` seconds (the count goes up on redelivery)."""
        await self.msg.nak(delay=delay if delay > 0 else None)

    async def confirm(self, action: bytes, timeout: float = CONFIRM_TIMEOUT) -> None:
        """Send ``action`` (``ACK``, ``nak_action(delay)``, ``TERM``) and wait until the
        consumer's leader answers it: raises (``nats.errors.TimeoutError``,
        ``NoRespondersError``) if it did not, e.g. while the consumer has no leader. Unlike
        ``msg.ack()`` and friends this may be sent again (a repeated one is harmless)."""
        await self.handle.groups.client.nc.request(self.msg.reply, action, timeout=timeout)

    async def extend(self) -> None:
        """Reset the lease's ack wait (work in progress)."""
        await self.msg.in_progress()

    async def terminate(self) -> None:
        """Never deliver this message to the group again."""
        await self.msg.term()

    async def resolve(self) -> list[Any] | None:
        """The native wire message (``protocol.Message.to_wire`` order) or None if it is gone
        (a pointer whose half aged out, a record that is not a message)."""
        return await self.handle.groups.wire_message(self.handle, self.stream_seq, self.subject,
                                                     self.record, self.time_ms, self.attempt)

    async def dead_letter(self, wire: list[Any]) -> PubAck:
        """Copy to ``%DLQ%<group>`` (idempotent), then terminate; returns the DLQ PubAck."""
        ack = await self.handle.groups.publish_dead(self.handle.spec.group, wire)
        await self.terminate()
        return ack


class ConsumerHandle:
    """A bound pull subscription on one group's durable consumer."""

    def __init__(self, groups: Groups, spec: GroupSpec, stream: str, name: str, prefix: str,
                 sub: Puller) -> None:
        self.groups = groups
        self.spec = spec
        self.stream = stream
        self.name = name
        self.prefix = prefix  # message-id prefix of the stream (topic streams only)
        self._sub = sub

    @property
    def request_open(self) -> bool:
        """Whether an earlier pull request may still bring messages to this handle."""
        return self._sub.request_open

    async def fetch(self, batch: int, timeout: float) -> list[Delivery]:
        """Up to ``batch`` deliveries, waiting at most ``timeout`` seconds for the first
        (none while the consumer has no leader)."""
        return await self._deliveries(await self._sub.fetch(batch, timeout))

    async def fetch_now(self, batch: int, timeout: float = 2.0) -> list[Delivery]:
        """Up to ``batch`` deliveries the consumer has now (none arrive after it returns;
        at most ``timeout`` seconds)."""
        return await self._deliveries(await self._sub.fetch_now(batch, timeout))

    async def _deliveries(self, msgs: list[Msg]) -> list[Delivery]:
        out: list[Delivery] = []
        for m in msgs:
            md = m.metadata
            try:
                record = decode_record(m.data)
            except ValueError:
                await m.term()  # not ours: never deliver it
                continue
            out.append(Delivery(m, self, md.sequence.stream, md.num_delivered - 1,
                                int(md.timestamp.timestamp() * 1000), record, m.subject))
        return out

    async def info(self) -> dict[str, Any]:
        """The engine's consumer info (pending, ack pending, redelivered, config)."""
        return await self.groups.client.api(f"CONSUMER.INFO.{self.stream}.{self.name}")

    async def close(self) -> None:
        """Stop fetching (the durable consumer and its leases stay)."""
        await self._sub.close()


class Groups:
    """Durable consumers for groups and TXCHECK, dead letters and resends."""

    def __init__(self, client: EngineClient, streams: StreamSet, *, max_groups: int | None = None) -> None:
        self.client = client
        self.streams = streams
        self.max_groups = max_groups
        self._registered: set[str] = set()  # groups known to be in GROUPS_STREAM

    async def _register(self, group: str) -> None:
        """Record ``group`` in ``GROUPS_STREAM`` before its first consumer is made; past
        ``max_groups`` groups raise ``LimitExceededError``. Gateways registering groups at
        the same moment can each pass the check (the engine can then hold as many more)."""
        if group in self._registered:
            return
        subject = naming.group_subject(group)
        if await self.client.get_last(naming.GROUPS_STREAM, subject) is None:
            if self.max_groups is not None:
                info = await self.client.api(f"STREAM.INFO.{naming.GROUPS_STREAM}")
                if int(info["state"].get("messages", 0)) >= self.max_groups:  # (one per subject)
                    raise LimitExceededError(f"group {group!r} not created: the engine holds "
                                             f"--max-groups {self.max_groups} groups")
            await self.client.publish(subject, b"")
        if len(self._registered) < _REGISTERED_CACHE:
            self._registered.add(group)

    async def _ensure_consumer(self, stream: str, name: str, config: dict[str, Any],
                               updatable: tuple[str, ...]) -> None:
        try:
            info = await self.client.api(f"CONSUMER.INFO.{stream}.{name}")
        except EngineAPIError as exc:
            if exc.err_code != ERR_CONSUMER_NOT_FOUND:
                raise
            await self.client.api(f"CONSUMER.CREATE.{stream}.{name}",
                                  {"stream_name": stream, "config": config})
            return
        current = info["config"]
        if any(current.get(k) != config.get(k) for k in updatable):
            merged = {**current, **{k: config[k] for k in updatable if k in config}}
            if "filter_subjects" in config:
                merged.pop("filter_subject", None)
            await self.client.api(f"CONSUMER.CREATE.{stream}.{name}",
                                  {"stream_name": stream, "config": merged, "action": "update"})

    async def subscribe(self, spec: GroupSpec, *, fifo_queue: int | None = None) -> ConsumerHandle:
        """Create (or adapt) the group's durable consumer and bind a pull subscription to it.

        ``fifo_queue``: the consumer of that one queue of a FIFO group instead (``fifo``):
        ``F<queue>_<group>``, filtered on that queue, at most one message out at a time."""
        if spec.start not in ("earliest", "latest"):
            raise ValueError(f"start must be earliest or latest, not {spec.start!r}")
        await self._register(spec.group)
        if spec.is_dlq:
            dead_group = spec.topic[len(DLQ_TOPIC_PREFIX):]
            stream, prefix = naming.DLQ_STREAM, ""
            name = f"D{len(spec.group)}_{spec.group}_{dead_group}"
            filters = [naming.dlq_subject(dead_group)]
        else:
            ts = await self.streams.ensure_topic(spec.topic)
            stream, prefix = ts.name, ts.prefix
            name = naming.group_consumer_name(spec.group)
            filters = naming.tag_filter_subjects(spec.topic, spec.tags) + [
                f"hmq.{spec.topic}.r.{spec.group}.>"]
        pending = -1
        if fifo_queue is not None:
            name = naming.fifo_consumer_name(spec.group, fifo_queue)
            filters = [_in_queue(f, spec.topic, fifo_queue) for f in filters]
            pending = 1
        config = {
            "durable_name": name, "name": name,
            "deliver_policy": "all" if spec.start == "earliest" else "new",
            "ack_policy": "explicit", "ack_wait": int(spec.ack_wait * _NANOS), "max_deliver": -1,
            "filter_subjects": filters, "replay_policy": "instant", "max_ack_pending": pending,
            "max_waiting": 512,
            "metadata": {"halfmq_max_reconsume_times": str(spec.max_reconsume_times)},
        }
        await self._ensure_consumer(stream, name, config,
                                    ("filter_subjects", "ack_wait", "metadata"))
        sub = await Puller(self.client.nc, stream, name).open()
        return ConsumerHandle(self, spec, stream, name, prefix, sub)

    async def exists(self, spec: GroupSpec) -> bool:
        """Whether the group already has a consumer on the topic (plain or FIFO)."""
        ts = await self.streams.ensure_topic(spec.topic)
        for name in (naming.group_consumer_name(spec.group), naming.fifo_consumer_name(spec.group, 0)):
            try:
                await self.client.api(f"CONSUMER.INFO.{ts.name}.{name}")
                return True
            except EngineAPIError as exc:
                if exc.err_code != ERR_CONSUMER_NOT_FOUND:
                    raise
        return False

    async def txcheck(self, topic: str, *, ack_wait: float = 30.0) -> ConsumerHandle:
        """The topic's TXCHECK consumer (every half message, one gateway at a time)."""
        ts = await self.streams.ensure_topic(topic)
        name = naming.TXCHECK_CONSUMER
        config = {
            "durable_name": name, "name": name, "deliver_policy": "all", "ack_policy": "explicit",
            "ack_wait": int(ack_wait * _NANOS), "max_deliver": -1,
            "filter_subject": f"hmq.{topic}.h.>", "replay_policy": "instant",
            "max_ack_pending": -1, "max_waiting": 512,
        }
        await self._ensure_consumer(ts.name, name, config, ("ack_wait",))
        sub = await Puller(self.client.nc, ts.name, name).open()
        spec = GroupSpec(group=name, topic=topic, ack_wait=ack_wait)
        return ConsumerHandle(self, spec, ts.name, name, ts.prefix, sub)

    async def wire_message(self, handle: ConsumerHandle, seq: int, subject: str, record: Record,
                           time_ms: int, attempt: int) -> list[Any] | None:
        """Build the native wire message of a delivered record (see ``Delivery.resolve``)."""
        if record.kind is Kind.DEAD:  # a dead letter, or one sent back to its group
            queue = int(subject.rsplit(".", 1)[1]) if not handle.spec.is_dlq else 0
            topic = handle.spec.topic
            return [record.msg_id, topic, record.body, record.tags, record.keys, record.properties,
                    record.born_ms, time_ms, queue, seq, attempt]
        try:
            _kind, _group, queue, _tag = naming.parse_topic_subject(subject)
        except ValueError:
            return None
        if record.kind is Kind.MESSAGE:
            return _with_extras([naming.encode_msg_id(handle.prefix, seq), handle.spec.topic, record.body,
                                 record.tags, record.keys, record.properties, record.born_ms, time_ms,
                                 queue, seq, attempt], record.message_group, None)
        if record.kind is Kind.POINTER:
            stored = await self.client.get(handle.stream, record.half_seq)
            if stored is None:
                return None
            half = decode_record(stored.data)
            return _with_extras([naming.encode_msg_id(handle.prefix, record.half_seq), handle.spec.topic,
                                 half.body, half.tags, half.keys, half.properties, half.born_ms,
                                 stored.time_ms, queue, record.half_seq, attempt],
                                half.message_group, record.due_ms)
        return None

    async def publish_dead(self, group: str, wire: list[Any], *, deadline: float = 15.0) -> PubAck:
        """Store a copy of wire message ``wire`` in ``%DLQ%<group>`` (idempotent per message;
        ``EngineUnavailableError`` if the engine has not stored it within ``deadline`` seconds)."""
        msg_id, topic = wire[0], wire[1]
        properties = {**wire[5], ORIGIN_TOPIC: topic}
        payload = encode_dead(wire[2], wire[3], list(wire[4]), properties, wire[6],
                              msg_id=msg_id, topic=topic)
        return await self.client.publish(naming.dlq_subject(group), payload,
                                         msg_id=f"dlq:{group}:{msg_id}", deadline=deadline)

    async def find_dead(self, group: str, msg_id: str) -> tuple[int, Record] | None:
        """``(dlq_seq, record)`` of ``msg_id`` in ``%DLQ%<group>``, or None (a scan of that subject)."""
        subject = naming.dlq_subject(group)
        seq = 1
        while True:
            try:
                msg = await self.client.request(f"$JS.API.DIRECT.GET.{naming.DLQ_STREAM}",
                                                f'{{"seq": {seq}, "next_by_subj": "{subject}"}}'.encode())
            except EngineAPIError:
                return None
            hdrs = msg.headers or {}
            if hdrs.get("Status"):
                return None
            found_seq = int(hdrs["Nats-Sequence"])
            record = decode_record(msg.data)
            if record.msg_id == msg_id:
                return found_seq, record
            seq = found_seq + 1

    async def resend(self, group: str, msg_id: str, *, queue: int = 0) -> PubAck | None:
        """Send dead letter ``msg_id`` back to its topic for ``group`` only; None if not found."""
        found = await self.find_dead(group, msg_id)
        if found is None:
            return None
        dlq_seq, record = found
        assert record.topic is not None and record.msg_id is not None
        await self.streams.ensure_topic(record.topic)
        properties = {k: v for k, v in record.properties.items() if k != ORIGIN_TOPIC}
        payload = encode_dead(record.body, record.tags, record.keys, properties, record.born_ms,
                              msg_id=record.msg_id, topic=record.topic)
        return await self.client.publish(naming.resend_subject(record.topic, group, queue), payload,
                                         msg_id=f"rs:{group}:{msg_id}:{dlq_seq}")


def _in_queue(subject: str, topic: str, queue: int) -> str:
    """Narrow a group filter subject (``hmq.<T>.m.>``, ``hmq.<T>.m.*.<tag>``,
    ``hmq.<T>.r.<G>.>``) to one queue."""
    head = f"hmq.{topic}."
    kind, rest = subject[len(head):].split(".", 1)
    if kind == "m":
        return f"{head}m.{queue}.{'*' if rest == '>' else rest.split('.', 1)[1]}"
    return f"{head}r.{rest.split('.', 1)[0]}.{queue}"


def _with_extras(wire: list[Any], group: str | None, due_ms: int | None) -> list[Any]:
    """Append the wire message's twelfth element when it has a message group or a due time."""
    if group is not None or due_ms is not None:
        wire.append({k: v for k, v in (("g", group), ("at", due_ms)) if v is not None})
    return wire
