"""The outbox on SQLite, MariaDB and PostgreSQL against a real broker: what is sent, in which
order, what a poison row does, retention, outages and wake-ups. (Crashes and racing
relays: test_outbox_faults.py; the command: test_outbox_cli.py.)"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from consumer_sdk import PushConsumer
from producer_sdk import InvalidNameError, Outbox, Producer
from producer_sdk.outbox import (
    OUTBOX_ID,
    OutboxRelay,
    OutboxTableMissingError,
    OutboxTransactionError,
)
from tests.conftest import wait_for
from tests.outbox.outbox_helpers import (
    Collector,
    OutboxDb,
    RecordingProducer,
    order_violations,
    spec,
)

pytestmark = pytest.mark.timeout(60)


@contextlib.asynccontextmanager
async def relaying(outbox: Outbox, producer: Producer, **options: Any) -> AsyncIterator[OutboxRelay]:
    """An in-process relay for the duration of the block (cancelled at its end)."""
    relay = OutboxRelay(outbox, producer, **options)
    task = asyncio.create_task(relay.run())
    try:
        yield relay
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@contextlib.asynccontextmanager
async def consuming(broker: Any, topic: str, collector: Collector) -> AsyncIterator[None]:
    async with PushConsumer(broker.address, group=f"g_{topic}", topic=topic, listener=collector):
        yield


async def all_status(db: OutboxDb, outbox: Outbox, status: str, ids: list[int]) -> bool:
    statuses = await db.statuses(outbox)
    return all(statuses.get(i) == status for i in ids)


async def test_only_committed_rows_are_sent_each_once(outbox_db, broker):
    db = outbox_db
    outbox = db.outbox()
    async with outbox.connection() as conn:
        await outbox.create_table(conn.raw)
    await outbox.create_table()  # idempotent
    async with db.transaction(outbox) as conn:
        first = await outbox.add(conn, "orders", b"\x00binary\xff", keys=["k1", "k2"],
                                 tags="TagA", properties={"p": "v"})
        second = await outbox.add(conn, "orders", "text é")
    with pytest.raises(RuntimeError, match="business failure"):
        async with db.transaction(outbox) as conn:
            await outbox.add(conn, "orders", b"rolled back", keys=["gone"])
            raise RuntimeError("business failure")
    collector = Collector()
    async with Producer(broker.address) as producer, consuming(broker, "orders", collector), \
            relaying(outbox, producer):
        await wait_for(lambda: len(collector.rows()) == 2, what="both committed rows")
        await wait_for(lambda: all_status(db, outbox, "SENT", [first, second]), what="SENT")
    assert collector.rows() == {first, second} and collector.duplicated() == set()
    status = await outbox.status()
    assert (status.pending, status.sent, status.failed) == (0, 2, 0)
    rows = await db.query(outbox, f"SELECT id, msg_id FROM {outbox.table.t} ORDER BY id")
    assert [(int(r[0]), r[1]) for r in rows] == [
        (first, next(iter(collector.msg_ids[first]))), (second, next(iter(collector.msg_ids[second])))]


async def test_messages_carry_body_keys_tags_properties_and_the_row_id(broker, tmp_path):
    db = OutboxDb("sqlite", f"sqlite:{tmp_path / 'app.db'}")
    outbox = db.outbox()
    await outbox.create_table()
    async with db.transaction(outbox) as conn:
        row_id = await outbox.add(conn, "orders", b"\x00binary\xff", keys=["k1", "k2"],
                                  tags="TagA", properties={"p": "v"})
    got = []

    async def listener(message):
        got.append(message)
        from consumer_sdk import ConsumeResult

        return ConsumeResult.SUCCESS

    async with Producer(broker.address) as producer, \
            PushConsumer(broker.address, group="g", topic="orders", listener=listener), \
            relaying(outbox, producer):
        await wait_for(lambda: got, what="the message")
    m = got[0]
    assert (m.body, m.keys, m.tags) == (b"\x00binary\xff", ("k1", "k2"), "TagA")
    assert m.properties == {"p": "v", OUTBOX_ID: str(row_id)}


async def test_add_refuses_a_connection_without_a_transaction_and_bad_fields(outbox_db):
    db = outbox_db
    outbox = db.outbox()
    await outbox.create_table()
    async with outbox.connection() as conn:
        if conn.dialect == "mysql":
            await conn.raw.autocommit(True)
        with pytest.raises(OutboxTransactionError, match="transaction"):
            await outbox.add(conn.raw, "orders", b"x")
    async with db.transaction(outbox) as conn:
        for bad, exc in [({"topic": "bad topic"}, InvalidNameError),
                         ({"topic": "%DLQ%g"}, InvalidNameError),
                         ({"body": 12}, TypeError),
                         ({"keys": [3]}, TypeError),
                         ({"tags": 5}, TypeError),
                         ({"properties": {"a": 1}}, TypeError),
                         ({"properties": {OUTBOX_ID: "9"}}, ValueError),
                         ({"order_key": "k" * 129}, ValueError)]:
            args = {"topic": "orders", "body": b"x", **bad}
            with pytest.raises(exc):
                await outbox.add(conn, args.pop("topic"), args.pop("body"), **args)
    assert (await outbox.status()).pending == 0


async def test_rows_of_a_key_are_sent_in_insertion_order(outbox_db, broker):
    db = outbox_db
    outbox = db.outbox()
    await outbox.create_table()
    specs = [spec(i, keys=5) if i % 4 else {**spec(i), "order_key": None} for i in range(300)]
    specs[10]["topic"] = specs[11]["topic"] = "other"  # a run of another topic in between
    ids = await db.add_rows(outbox, specs, per_transaction=25)
    key_of = {i: s["order_key"] for i, s in zip(ids, specs, strict=True)}
    producer = RecordingProducer(broker.address)
    async with producer, relaying(outbox, producer, batch_size=7):
        await wait_for(lambda: all_status(db, outbox, "SENT", ids), timeout=30, what="all SENT")
    sent = [i for call in producer.calls for i in call["ids"]]
    assert sorted(sent) == ids  # each row once
    assert order_violations(producer.calls, key_of) == []
    assert sent == ids  # one relay sends in id order


@pytest.mark.parametrize("server_db", ["mysql", "postgres"], indirect=True)
async def test_a_row_committed_late_with_a_smaller_id_is_still_sent(server_db, broker):
    """The "id > last seen" pitfall: a transaction that took id 1 commits after the one that
    took id 2 was sent. The relay finds rows by status, so row 1 is sent too."""
    db = server_db
    outbox = db.outbox()
    await outbox.create_table()
    collector = Collector()
    async with Producer(broker.address) as producer, consuming(broker, "orders", collector), \
            relaying(outbox, producer):
        async with outbox.connection() as slow:
            await slow.begin()
            early = await outbox.add(slow.raw, "orders", b"early id, late commit", keys=["a"])
            async with db.transaction(outbox) as conn:
                later = await outbox.add(conn, "orders", b"later id, early commit", keys=["b"])
            assert early < later
            await wait_for(lambda: later in collector.rows(), what="the early commit sent")
            assert early not in collector.rows()
            await slow.commit()
        await wait_for(lambda: early in collector.rows(), what="the late commit sent")
    assert collector.duplicated() == set()


async def test_poison_rows_fail_alone_hold_only_their_key_and_can_be_retried(outbox_db,
                                                                             broker_factory):
    broker = broker_factory("--max-message-size", "64KiB")
    db = outbox_db
    outbox = db.outbox()
    await outbox.create_table()
    t = outbox.table.t
    async with db.transaction(outbox) as conn:
        ok_a = await outbox.add(conn, "orders", b"a1", keys=["A"])
        too_big = await outbox.add(conn, "orders", b"x" * 100_000, keys=["A"])
        held_a = await outbox.add(conn, "orders", b"a2", keys=["A"])
        ok_b = await outbox.add(conn, "orders", b"b1", keys=["B"])
        bad_json = await outbox.add(conn, "orders", b"c1", keys=["C"])
        held_c = await outbox.add(conn, "orders", b"c2", keys=["C"])
        bad_topic = await outbox.add(conn, "orders", b"d1", keys=["D"])
        no_key = await outbox.add(conn, "orders", b"n", order_key=None)
    # what a hand-written INSERT or a buggy writer can leave in the table
    await db.query(outbox, f"UPDATE {t} SET properties = ? WHERE id = ?", ("{not json", bad_json))
    await db.query(outbox, f"UPDATE {t} SET topic = ? WHERE id = ?", ("%DLQ%x", bad_topic))
    collector = Collector()
    async with Producer(broker.address) as producer, consuming(broker, "orders", collector), \
            relaying(outbox, producer, batch_size=50) as relay:
        await wait_for(lambda: collector.rows() == {ok_a, ok_b, no_key}, what="the healthy rows")
        await wait_for(lambda: relay.stats.failed == 3, what="three rows FAILED")
        failed = {r.id: r for r in await outbox.failed()}
        assert set(failed) == {too_big, bad_json, bad_topic}
        assert "MessageTooLargeError" in failed[too_big].last_error
        assert "malformed" in failed[bad_json].last_error
        assert "reserved" in failed[bad_topic].last_error
        statuses = await db.statuses(outbox)
        assert statuses[held_a] == statuses[held_c] == "PENDING"  # waiting behind their key
        # the operator fixes one row and retries it; gives up on another
        await db.query(outbox, f"UPDATE {t} SET properties = '{{}}' WHERE id = ?", (bad_json,))
        assert await outbox.retry_failed([bad_json]) == 1
        await wait_for(lambda: {bad_json, held_c} <= collector.rows(), what="C after the fix")
        assert await outbox.discard([too_big, ok_a]) == 1  # only FAILED rows can be discarded
        await wait_for(lambda: held_a in collector.rows(), what="A after the discard")
        assert await outbox.retry_failed() == 1  # the bad topic: fails again at once
        await wait_for(lambda: relay.stats.failed == 4, what="the bad topic failing again")
    status = await outbox.status()
    assert (status.pending, status.failed, status.discarded) == (0, 1, 1)
    assert collector.duplicated() == set()
    assert [r.attempts for r in await outbox.failed()] == [1]  # counted again from 0 on retry


async def test_a_batch_over_the_broker_limit_is_sent_row_by_row_and_the_relay_adapts(
        broker_factory, tmp_path):
    broker = broker_factory("--max-message-size", "64KiB")
    db = OutboxDb("sqlite", f"sqlite:{tmp_path / 'app.db'}")
    outbox = db.outbox()
    await outbox.create_table()
    producer = RecordingProducer(broker.address)
    all_ids: list[int] = []
    async with producer, relaying(outbox, producer) as relay:
        for _round in range(3):  # each refused batch halves the batch size: 1 MiB, 120 KB, 60 KB
            ids = await db.add_rows(outbox, [{"topic": "orders", "body": b"y" * 20_000,
                                              "keys": [f"k{i}"]} for i in range(12)], 12)
            all_ids += ids
            await wait_for(lambda i=ids: all_status(db, outbox, "SENT", i), what="all SENT")
    assert relay.sender.max_batch_bytes == 60_000 and relay.stats.failed == 0
    assert sorted(i for c in producer.calls for i in c["ids"]) == all_ids
    assert [len(c["ids"]) for c in producer.calls[-4:]] == [3, 3, 3, 3]


async def test_sent_rows_are_deleted_or_archived_after_the_retention(outbox_db, broker):
    db = outbox_db
    kept = db.outbox(table="ob_archived", archive=True)
    dropped = db.outbox(table="ob_deleted")
    collector = Collector()
    async with Producer(broker.address) as producer, consuming(broker, "orders", collector):
        for outbox in (kept, dropped):
            await outbox.create_table()
            ids = await db.add_rows(outbox, [spec(i) for i in range(30)])
            async with relaying(outbox, producer, retention=0.0, cleanup_interval=0.05) as relay:
                await wait_for(lambda o=outbox: _empty(db, o), what="the table emptied")
                # the relay counts a removal once its commit has returned, which can be after
                # another connection already sees the table empty: wait for the count too
                await wait_for(lambda r=relay: r.stats.removed == 30, what="the 30 removals counted")
            assert relay.stats.sent == 30 and relay.stats.removed == 30
    archived = await db.query(kept, "SELECT id, status, msg_id FROM ob_archived_archive ORDER BY id")
    assert [int(r[0]) for r in archived] == ids
    assert all(r[1] == "SENT" and r[2] for r in archived)
    assert await db.query(dropped, "SELECT COUNT(*) FROM ob_deleted") == [(0,)]


async def _empty(db: OutboxDb, outbox: Outbox) -> bool:
    return not await db.query(outbox, f"SELECT id FROM {outbox.table.t}")


async def test_rows_wait_out_a_broker_outage(outbox_db, broker):
    db = outbox_db
    outbox = db.outbox()
    await outbox.create_table()
    collector = Collector()
    async with Producer(broker.address, send_timeout=0.5) as producer, \
            relaying(outbox, producer, max_backoff=0.2) as relay:
        first = await db.add_rows(outbox, [spec(i) for i in range(5)])
        await wait_for(lambda: all_status(db, outbox, "SENT", first), what="sent before")
        await asyncio.to_thread(broker.stop)
        during = await db.add_rows(outbox, [spec(i) for i in range(5, 15)])
        await wait_for(lambda: relay.stats.last_error and "Unavailable" in relay.stats.last_error,
                       what="the relay noticing the outage")
        assert await all_status(db, outbox, "PENDING", during)
        await asyncio.to_thread(broker.start)
        await wait_for(lambda: all_status(db, outbox, "SENT", during), timeout=20,
                       what="sent after the restart")
        assert relay.stats.last_error is None
        assert relay.stats.failed == 0
    async with consuming(broker, "orders", collector):
        await wait_for(lambda: collector.rows() == set(first + during), what="all delivered")


async def test_postgres_notify_wakes_an_idle_relay_at_once(pg_database, broker):
    db = OutboxDb("postgres", pg_database)
    writer = db.outbox(table="ob_notify")   # another process's Outbox: no in-process hint
    await writer.create_table()
    outbox = db.outbox(table="ob_notify")
    async with Producer(broker.address) as producer, \
            relaying(outbox, producer, poll_interval=60.0) as relay:
        await wait_for(lambda: relay.mode is not None and relay.stats.batches == 0
                       and relay._conn is not None, what="the relay idle")
        await asyncio.sleep(0)  # let it reach its idle wait
        for _ in range(2):
            ids = await db.add_rows(writer, [spec(1)])
            await wait_for(lambda i=ids: all_status(db, writer, "SENT", i), timeout=10,
                           what="a NOTIFY wake-up (polling is once a minute)")


async def test_an_add_in_the_same_process_wakes_a_polling_relay(broker, tmp_path):
    db = OutboxDb("sqlite", f"sqlite:{tmp_path / 'app.db'}")
    outbox = db.outbox()
    await outbox.create_table()
    async with Producer(broker.address) as producer, \
            relaying(outbox, producer, poll_interval=60.0) as relay:
        await wait_for(lambda: relay._conn is not None, what="the relay connected")
        for n in range(3):
            ids = await db.add_rows(outbox, [spec(n)])
            await wait_for(lambda i=ids: all_status(db, outbox, "SENT", i), timeout=10,
                           what="the hint of add() (polling is once a minute)")


async def test_a_missing_table_is_reported(outbox_db, broker):
    outbox = outbox_db.outbox(table="nowhere")
    async with Producer(broker.address) as producer:
        with pytest.raises(OutboxTableMissingError, match="nowhere"):
            await asyncio.wait_for(outbox.relay(producer), 10)


class GatedProducer(RecordingProducer):
    """Holds its ``hold``-th ``send_batch`` (1-based) until ``gate`` is set: a send in
    flight, frozen, for as long as the test wants. ``entered`` is set when it is held."""

    def __init__(self, *args: Any, hold: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hold, self.started = hold, 0
        self.gate, self.entered = asyncio.Event(), asyncio.Event()

    async def send_batch(self, topic, items):
        self.started += 1
        if self.started == self.hold:
            self.entered.set()
            await self.gate.wait()
        return await super().send_batch(topic, items)


async def test_a_leased_relay_stops_sending_before_its_lease_may_run_out(broker, tmp_path):
    db = OutboxDb("sqlite", f"sqlite:{tmp_path / 'app.db'}")
    outbox = db.outbox()
    await outbox.create_table()
    ids = await db.add_rows(outbox, [spec(i, topic="a" if i < 10 or i >= 20 else "b")
                                     for i in range(30)], 30)  # three runs: a, b, a
    now = [0.0]

    class SlowSends(RecordingProducer):
        async def send_batch(self, topic, items):
            now[0] += 25.0  # each send takes 25 s on the relay's monotonic clock
            return await super().send_batch(topic, items)

    async with SlowSends(broker.address, send_timeout=3.0) as producer:
        relay = OutboxRelay(outbox, producer, lease=30.0, clock=lambda: now[0])
        try:
            assert await relay.run_once() == 10
        finally:
            await relay.close()
        assert relay.mode == "lease"
    # the second run would have ended after 25 + 3 s of a 30 s lease (less 10 %): not sent,
    # and its rows and the third run's were released for the next batch at once
    rows = await db.query(outbox, f"SELECT id, status, lease_owner FROM {outbox.table.t} ORDER BY id")
    assert [(r[1], r[2]) for r in rows] == [("SENT", None)] * 10 + [("PENDING", None)] * 20
    assert [c["ids"] for c in producer.calls] == [ids[:10]]


async def test_a_relay_that_lost_its_lease_records_nothing_and_says_so(broker, tmp_path, caplog):
    db = OutboxDb("sqlite", f"sqlite:{tmp_path / 'app.db'}")
    outbox = db.outbox()
    await outbox.create_table()
    ids = await db.add_rows(outbox, [spec(i) for i in range(10)], 10)
    async with GatedProducer(broker.address, send_timeout=0.4, hold=1) as frozen, \
            RecordingProducer(broker.address, send_timeout=0.4) as healthy:
        a = OutboxRelay(outbox, frozen, lease=1.0)
        stuck = asyncio.create_task(a.run_once())
        await asyncio.wait_for(frozen.entered.wait(), 10)
        # relay A is frozen mid-send for longer than its lease: on the database's clock
        # the lease is over (set here instead of waited for), and relay B takes the rows
        await db.query(outbox, f"UPDATE {outbox.table.t} SET lease_until = 0")
        b = OutboxRelay(outbox, healthy, lease=1.0)
        try:
            assert await b.run_once() == 10
            frozen.gate.set()
            assert await stuck == 0
        finally:
            await a.close()
            await b.close()
    assert a.stats.lease_lost == 10 and a.stats.sent == 0 and b.stats.sent == 10
    assert "may be sent twice" in caplog.text
    rows = await db.query(outbox, f"SELECT id, status, msg_id FROM {outbox.table.t} ORDER BY id")
    assert [(int(r[0]), r[1], r[2]) for r in rows] == [
        (i, "SENT", m) for i, m in zip(ids, healthy.calls[0]["msg_ids"], strict=True)]


async def test_a_cancelled_relay_records_the_rows_acknowledged_before(outbox_db, broker):
    db = outbox_db
    outbox = db.outbox()
    await outbox.create_table()
    ids = await db.add_rows(outbox, [spec(i, topic="a" if i < 10 or i >= 20 else "b")
                                     for i in range(30)], 30)  # three runs: a, b, a
    async with GatedProducer(broker.address, hold=2) as producer:
        relay = OutboxRelay(outbox, producer)
        task = asyncio.create_task(relay.run())
        await asyncio.wait_for(producer.entered.wait(), 10)  # the second run is in flight
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    rows = await db.query(outbox, f"SELECT id, status, lease_owner FROM {outbox.table.t} ORDER BY id")
    statuses = [r[1] for r in rows]
    assert statuses == ["SENT"] * 10 + ["PENDING"] * 20  # acknowledged: recorded
    leased = [int(r[0]) for r in rows if r[2] is not None]
    # lease mode: the run in flight keeps its lease (its send may have been stored), the
    # third run is released; row locks: the database released them all
    assert leased == (ids[10:20] if relay.mode == "lease" else [])


async def test_with_message_groups_a_fifo_consumer_gets_each_keys_rows_in_order(broker, tmp_path):
    db = OutboxDb("sqlite", f"sqlite:{tmp_path / 'app.db'}")
    outbox = db.outbox()
    await outbox.create_table()
    ids = await db.add_rows(outbox, [spec(i, keys=5) for i in range(150)], 25)
    got: list[tuple[str | None, int]] = []

    async def listener(message):
        from consumer_sdk import ConsumeResult

        got.append((message.message_group, int(message.properties[OUTBOX_ID])))
        await asyncio.sleep(0)  # let other deliveries interleave
        return ConsumeResult.SUCCESS

    async with Producer(broker.address) as producer, \
            PushConsumer(broker.address, group="fifo_g", topic="orders", listener=listener,
                         fifo=True), \
            relaying(outbox, producer, batch_size=7, message_groups=True):
        await wait_for(lambda: len(got) >= len(ids), timeout=30, what="every row delivered")
    by_key: dict[str | None, list[int]] = {}
    for key, row_id in got:
        by_key.setdefault(key, []).append(row_id)
    assert sorted(by_key) == [f"acct-{k}" for k in range(5)]  # the order key is the group
    for key, delivered in by_key.items():
        assert delivered == sorted(delivered), key


async def test_a_batch_failing_half_way_keeps_each_keys_order(outbox_db, broker):
    """The second send of a batch fails (the broker is unreachable for it): the first run
    is recorded SENT, the failed run and everything after it stay pending, and when they
    go out no row of a key has overtaken an earlier one."""
    from protocol import BrokerUnavailableError

    class FailsOnce(RecordingProducer):
        calls_started = 0

        async def send_batch(self, topic, items):
            self.calls_started += 1
            if self.calls_started == 2:
                raise BrokerUnavailableError("injected: connection lost before the send")
            return await super().send_batch(topic, items)

    db = outbox_db
    outbox = db.outbox()
    await outbox.create_table()
    topics = ["a"] * 10 + ["b"] * 10 + ["a"] * 10  # three runs per batch
    specs = [spec(i, keys=4, topic=t) for i, t in enumerate(topics)]
    ids = await db.add_rows(outbox, specs, 30)
    async with FailsOnce(broker.address) as producer:
        relay = OutboxRelay(outbox, producer, batch_size=30)
        try:
            assert await relay.run_once() == 10  # the first run; the error is noted
            statuses = await db.statuses(outbox)
            assert [statuses[i] for i in ids] == ["SENT"] * 10 + ["PENDING"] * 20
            assert relay.stats.last_error and "injected" in relay.stats.last_error
            assert await relay.run_once() == 20
        finally:
            await relay.close()
    key_of = {i: s["order_key"] for i, s in zip(ids, specs, strict=True)}
    assert [i for c in producer.calls for i in c["ids"]] == ids
    assert order_violations(producer.calls, key_of) == []
