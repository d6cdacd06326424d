"""A workload through gateways, and the invariants of cluster mode checked after a fault.

``Workload(address, topic)`` runs, through the public SDKs and the given address list:
a producer of plain messages (``window`` sends in flight, every body unique), a
transactional producer whose local transactions alternate COMMIT and ROLLBACK (every
fourth one UNKNOWN, left to the check-back, which answers by the same rule), and one
consumer group recording every body. The consumer fails some plain messages on purpose
(``_outcome``): one in 13 once (retried after ``--retry-delays``), one in 97 every time (dead-
lettered after ``MAX_RECONSUME`` retries). ``await check()`` after ``stop()`` asserts the
reference's invariants that a client can see, plus reads in the engine:

- every acknowledged plain send is delivered;
- every transaction whose outcome is COMMIT is delivered; none decided ROLLBACK ever is
  (a half whose reply was lost with a gateway may have been stored twice by the SDK's
  retry: each copy is its own transaction, decided by the check-back by the same rule);
- at most one visible copy (commit pointer) per transaction in the topic's stream, and
  only for a transaction decided COMMIT;
- every half message in the topic's stream resolved (one decision record) within the
  check's timeout;
- no redelivery after a failure before its retry delay (``RETRY_DELAYS``: the gateways'
  ``--retry-delays`` of ``GATEWAY_TEST_ARGS``);
- the group's dead letters (in the engine's ``HMQ_DLQ``) are exactly the messages that ran
  out of attempts: every acknowledged always-failing one, once, and no other.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from consumer_sdk import ConsumeResult, PushConsumer
from producer_sdk import LocalTransactionState, Producer, TransactionListener, TransactionProducer

__all__ = ["MAX_RECONSUME", "RETRY_DELAYS", "Workload", "dead_letters", "pointer_counts", "transaction_problems"]


#: the retry delays of the gateways the workload runs through (``GATEWAY_TEST_ARGS``)
RETRY_DELAYS = (0.2, 0.4)
#: retries before a message goes to the dead letters (so 4 deliveries of an always-failing one)
MAX_RECONSUME = 3


def _outcome(body: bytes, reconsume_times: int) -> ConsumeResult:
    """The consumer's answer: plain message 13k+6 fails once, 97k+5 always; all others succeed."""
    n = int(body.split(b"-")[-1])
    if body.startswith(b"p-") and (n % 97 == 5 or (n % 13 == 6 and reconsume_times == 0)):
        return ConsumeResult.RECONSUME_LATER
    return ConsumeResult.SUCCESS


def _always_fails(body: bytes) -> bool:
    return body.startswith(b"p-") and int(body.split(b"-")[-1]) % 97 == 5


def _decide(body: bytes) -> LocalTransactionState:
    n = int(body.split(b"-")[-1])
    return LocalTransactionState.COMMIT if n % 2 == 0 else LocalTransactionState.ROLLBACK


class _Listener(TransactionListener):
    async def execute_local_transaction(self, message: Any, arg: Any) -> LocalTransactionState:
        if int(message.body.split(b"-")[-1]) % 4 == 3:
            return LocalTransactionState.UNKNOWN
        return _decide(message.body)

    async def check_local_transaction(self, message: Any) -> LocalTransactionState:
        return _decide(message.body)


async def _patiently(call: Any, *args: Any, timeout: float = 60.0, **kwargs: Any) -> Any:
    """``await call(*args, **kwargs)``, asked again while the engine is electing a leader
    (503 "temporarily unavailable", timeouts, no responders) for up to ``timeout`` s."""
    import nats

    deadline = time.monotonic() + timeout
    while True:
        try:
            return await call(*args, **kwargs)
        except (nats.js.errors.ServiceUnavailableError, nats.errors.TimeoutError, nats.errors.NoRespondersError,
                TimeoutError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


async def _scan(js: Any, stream: str, subject: str) -> list[tuple[int, Any]]:
    """``(sequence, record)`` of every record of ``stream`` on ``subject``, in order."""
    import nats

    from broker.engines.jetstream.records import decode_record

    last = (await _patiently(js.stream_info, stream)).state.last_seq
    out = []
    seq = 1
    while seq <= last:
        try:
            msg = await _patiently(js.get_msg, stream, seq=seq, next=True, subject=subject)
        except nats.js.errors.NotFoundError:
            break
        out.append((int(msg.seq), decode_record(msg.data or b"")))
        seq = int(msg.seq) + 1
    return out


async def pointer_counts(engine_urls: list[str], topic: str) -> dict[int, int]:
    """Commit pointers in ``topic``'s stream: {half sequence: how many}."""
    import nats

    from broker.engines.jetstream import naming
    from broker.engines.jetstream.records import Kind

    nc = await nats.connect(servers=engine_urls, connect_timeout=5)
    try:
        counts: dict[int, int] = {}
        for _seq, rec in await _scan(nc.jetstream(timeout=10), naming.topic_stream(topic), f"hmq.{topic}.m.>"):
            if rec.kind is Kind.POINTER:
                counts[rec.half_seq] = counts.get(rec.half_seq, 0) + 1
        return counts
    finally:
        await nc.close()


async def dead_letters(engine_urls: list[str], group: str) -> list[tuple[str, bytes]]:
    """``(msg_id, body)`` of ``group``'s dead letters in the engine (``HMQ_DLQ``), in order."""
    import nats

    from broker.engines.jetstream import naming

    nc = await nats.connect(servers=engine_urls, connect_timeout=5)
    try:
        js = nc.jetstream(timeout=10)
        try:
            return [(str(rec.msg_id), rec.body)
                    for _seq, rec in await _scan(js, naming.DLQ_STREAM, naming.dlq_subject(group))]
        except nats.js.errors.NotFoundError:
            return []
    finally:
        await nc.close()


async def transaction_problems(engine_urls: list[str], topic: str, prefix: str,
                               pointers: dict[int, int]) -> list[str]:
    """What is wrong with ``topic``'s transactions in the engine (empty: nothing): a half
    message without a decision (unresolved) or with more than one decision record, a
    commit pointer whose half was not decided COMMIT. ``prefix``: the topic's message-id
    prefix; ``pointers``: ``pointer_counts``."""
    import nats

    from broker.engines.jetstream import naming

    nc = await nats.connect(servers=engine_urls, connect_timeout=5)
    try:
        js = nc.jetstream(timeout=10)
        halves = [seq for seq, _rec in await _scan(js, naming.topic_stream(topic), f"hmq.{topic}.h.>")]
        info = await _patiently(js.stream_info, naming.TX_STREAM, subjects_filter="hmqs.tx.d.*")
        subjects = info.state.subjects or {}
        problems = []
        for seq in halves:
            n = subjects.get(naming.tx_decision_subject(naming.encode_msg_id(prefix, seq)), 0)
            if n != 1:
                problems.append(f"half {seq}: {n} decision records")
        for seq in pointers:
            msg = await _patiently(js.get_last_msg, naming.TX_STREAM,
                                   naming.tx_decision_subject(naming.encode_msg_id(prefix, seq)))
            if msg.data != b"C":
                problems.append(f"half {seq}: a commit pointer, decision {msg.data!r}")
        if not halves:
            problems.append("no half message found")
        return problems
    finally:
        await nc.close()


class Workload:
    """See the module docstring."""

    def __init__(self, address: str, topic: str, *, window: int = 16, tx_window: int = 4,
                 send_timeout: float = 30.0, tx_address: str | None = None) -> None:
        self.address, self.topic = address, topic
        self.tx_address = tx_address or address  # the transactional producer's address list
        self.window, self.tx_window, self.send_timeout = window, tx_window, send_timeout
        self.acked: set[bytes] = set()
        self.tx_ids: dict[bytes, str] = {}  # body -> msg_id of transactions whose half was stored
        self.got: dict[bytes, str] = {}
        self.ack_times: list[float] = []
        self.got_times: list[float] = []  # when each delivery came (redeliveries included)
        #: msg_id -> every delivery: (when, reconsume_times, failed on purpose); by message id,
        #: not body: a send retried on another gateway after a lost reply is stored twice
        self.deliveries: dict[str, list[tuple[float, int, bool]]] = {}
        self.errors = 0
        self.t0 = time.monotonic()
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self._clients: list[Any] = []

    async def _on(self, m: Any) -> ConsumeResult:
        now = time.monotonic()
        self.got[m.body] = m.msg_id
        self.got_times.append(now)
        result = _outcome(m.body, m.reconsume_times)
        self.deliveries.setdefault(m.msg_id, []).append((now, m.reconsume_times,
                                                         result is ConsumeResult.RECONSUME_LATER))
        return result

    async def start(self) -> Workload:
        consumer = PushConsumer(self.address, group=f"{self.topic}-g", topic=self.topic, listener=self._on,
                                max_reconsume_times=MAX_RECONSUME)
        producer = Producer(self.address, send_timeout=self.send_timeout)
        txp = TransactionProducer(self.tx_address, group=f"{self.topic}-pg", listener=_Listener(),
                                  send_timeout=self.send_timeout)
        for c in (consumer, producer, txp):
            await c.start()
            self._clients.append(c)
        counter = iter(range(1 << 40))

        async def plain() -> None:
            while not self._stop.is_set():
                body = f"p-{next(counter)}".encode()
                try:
                    await producer.send(self.topic, body)
                except Exception:  # noqa: BLE001 - unacknowledged: not promised
                    self.errors += 1
                    continue
                self.acked.add(body)
                self.ack_times.append(time.monotonic())

        async def transactional() -> None:
            while not self._stop.is_set():
                body = f"t-{next(counter)}".encode()
                try:
                    r = await txp.send_in_transaction(self.topic, body)
                except Exception:  # noqa: BLE001 - the half may be stored: the check-back decides
                    self.errors += 1
                    continue
                self.tx_ids[body] = r.msg_id

        self._tasks = [asyncio.create_task(plain()) for _ in range(self.window)]
        self._tasks += [asyncio.create_task(transactional()) for _ in range(self.tx_window)]
        return self

    async def wait_traffic(self, n: int, timeout: float = 60.0) -> None:
        """Until ``n`` more sends are acknowledged and consumed."""
        target_acked, target_got = len(self.acked) + n, len(self.got) + n
        deadline = time.monotonic() + timeout
        while len(self.acked) < target_acked or len(self.got) < target_got:
            assert time.monotonic() < deadline, (
                f"traffic stalled: {len(self.acked)} acked, {len(self.got)} consumed, {self.errors} errors")
            await asyncio.sleep(0.05)

    def longest_pause_since(self, t0: float, until: float | None = None) -> float:
        """The longest time without an acknowledged plain send, from ``t0`` to the last ack
        (or to the first ack after ``until``)."""
        after = [t for t in self.ack_times if t >= t0]
        if until is not None:
            later = [t for t in after if t > until]
            after = [t for t in after if t <= until] + later[:1]
        return max((b - a for a, b in zip([t0, *after], after, strict=False)), default=float("inf"))

    def longest_consume_pause_since(self, t0: float) -> float:
        """The longest time without a delivery, from ``t0`` to the last delivery."""
        after = [t for t in self.got_times if t >= t0]
        return max((b - a for a, b in zip([t0, *after], after, strict=False)), default=float("inf"))

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def close(self) -> None:
        self._stop.set()
        for c in reversed(self._clients):
            await c.close()

    async def check(self, engine_urls: list[str], *, timeout: float = 90.0) -> None:
        """The invariants (module docstring); waits up to ``timeout`` for deliveries."""
        commits = {b for b in self.tx_ids if _decide(b) == LocalTransactionState.COMMIT}
        rollbacks = {b for b in self.tx_ids if _decide(b) == LocalTransactionState.ROLLBACK}
        deadline = time.monotonic() + timeout
        while not (self.acked | commits) <= self.got.keys():
            missing = (self.acked | commits) - self.got.keys()
            assert time.monotonic() < deadline, f"{len(missing)} promised messages never delivered: {sorted(missing)[:5]}"
            await asyncio.sleep(0.1)
        assert not rollbacks & self.got.keys(), "a rolled-back transaction was delivered"
        # also those whose send_in_transaction failed (the half may still have been stored)
        for body in self.got:
            if body.startswith(b"t-"):
                assert _decide(body) == LocalTransactionState.COMMIT, f"{body!r} delivered, decided ROLLBACK"
        counts = await pointer_counts(engine_urls, self.topic)
        assert counts and max(counts.values()) == 1, "more than one visible copy of a transaction"
        assert len(counts) >= len(commits)
        # no retry before its delay (a lost NAK brings it back after --ack-timeout: later)
        early = []
        for msg_id, ds in self.deliveries.items():
            for (t, k, failed), (t2, _k2, _f2) in zip(ds, ds[1:], strict=False):
                delay = RETRY_DELAYS[min(k, len(RETRY_DELAYS) - 1)]
                if failed and t2 - t < delay - 0.02:
                    early.append((msg_id, k, round(t2 - t, 3),
                                  [(round(t3 - self.t0, 3), k3, f3) for t3, k3, f3 in ds]))
        assert not early, f"redelivered before the retry delay: {early[:5]}"
        # dead letters: every acknowledged always-failing message, each copy once, nothing else
        group = f"{self.topic}-g"
        want_dead = {b for b in self.acked if _always_fails(b)}
        while True:
            dead = await dead_letters(engine_urls, group)
            missing = want_dead - {b for _m, b in dead}
            if not missing:
                break
            assert time.monotonic() < deadline, f"not dead-lettered: {sorted(missing)[:5]}"
            await asyncio.sleep(0.2)
        wrong = [(m, b, self.deliveries.get(m)) for m, b in dead if not _always_fails(b)]
        assert not wrong, f"dead-lettered, not out of attempts: {wrong[:3]}"
        ids = [m for m, _b in dead]
        assert len(ids) == len(set(ids)), "a message dead-lettered twice"
        # every half message resolved (the check-backs may still be at it), one decision each
        prefix = next(iter(self.tx_ids.values()), "")[:8]
        while prefix and (problems := await transaction_problems(engine_urls, self.topic, prefix, counts)):
            assert time.monotonic() < deadline, f"transactions in the engine: {problems[:5]}"
            await asyncio.sleep(0.5)
