"""PushConsumer against a real broker: SPEC §7 C1-C10, threads, reconnect."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import urllib.request

import aiohttp
import pytest

from consumer_sdk import ConsumeResult, PushConsumer, TopicNotFoundError
from producer_sdk import Producer
from protocol import FrameDecoder, Message, Op, encode_frame
from tests.conftest import wait_for
from tests.sdk.sdk_helpers import Recorder, ThreadRecorder

pytestmark = pytest.mark.timeout(30)


async def test_c1_every_message_delivered(broker):
    rec = Recorder()
    async with Producer(broker.address) as p:
        sent = {(await p.send("c1", f"m{i}")).msg_id for i in range(50)}
        sent |= {r.msg_id for r in await p.send_batch("c1", [f"b{i}" for i in range(150)])}
        async with PushConsumer(broker.address, group="g", topic="c1", listener=rec):
            await wait_for(lambda: rec.ids() >= sent, what="all 200 messages")
    assert rec.ids() == sent


async def test_c2_members_split_groups_each_get_all(broker):
    a, b, other = Recorder(), Recorder(), Recorder()
    async with (
        PushConsumer(broker.address, group="g1", topic="c2", listener=a, prefetch=4),
        PushConsumer(broker.address, group="g1", topic="c2", listener=b, prefetch=4),
        PushConsumer(broker.address, group="g2", topic="c2", listener=other),
        Producer(broker.address) as p,
    ):
        sent = {r.msg_id for r in await p.send_batch("c2", [f"m{i}" for i in range(100)])}
        await wait_for(lambda: (a.ids() | b.ids()) >= sent and other.ids() >= sent,
                       what="every message in both groups")
    assert a.ids() and b.ids(), "both members of g1 should receive messages"
    assert not (a.ids() & b.ids()), "a message acked by one member went to the other"
    assert len(a.messages) + len(b.messages) == 100
    assert other.ids() == sent


@pytest.mark.parametrize("failure", ["reconsume_later", "raise"])
async def test_c3_failure_redelivered_with_reconsume_times(broker, failure, caplog):
    def decide(m):
        if m.reconsume_times < 2:
            if failure == "raise":
                raise RuntimeError("boom")
            return ConsumeResult.RECONSUME_LATER
        return ConsumeResult.SUCCESS

    rec = Recorder(decide)
    caplog.set_level(logging.WARNING, logger="halfmq.consumer")
    async with Producer(broker.address) as p:
        r = await p.send("c3", b"retry me")
        async with PushConsumer(broker.address, group="g", topic="c3", listener=rec):
            await wait_for(lambda: len(rec.messages) >= 3, what="two redeliveries")
    assert [m.reconsume_times for m in rec.messages[:3]] == [0, 1, 2]
    assert {m.msg_id for m in rec.messages} == {r.msg_id}
    assert {m.body for m in rec.messages} == {b"retry me"}
    if failure == "raise":
        assert any(r.msg_id in rec_.getMessage() for rec_ in caplog.records)


async def test_c4_dead_letter_after_max_reconsume_times(broker):
    failing = Recorder(lambda m: ConsumeResult.RECONSUME_LATER)
    dlq = Recorder()
    async with Producer(broker.address) as p:
        r = await p.send("c4", b"poison", tags="T", keys=["k"], properties={"p": "v"})
        async with (
            PushConsumer(broker.address, group="g", topic="c4", listener=failing,
                         max_reconsume_times=1),
            PushConsumer(broker.address, group="dlqreader", topic="%DLQ%g", listener=dlq),
        ):
            await wait_for(lambda: dlq.messages, what="the message in %DLQ%g")
            assert [m.reconsume_times for m in failing.messages] == [0, 1]
    m = dlq.messages[0]
    assert m.msg_id == r.msg_id
    assert m.body == b"poison" and m.keys == ("k",)
    assert m.properties.get("p") == "v"
    assert m.properties.get("ORIGIN_TOPIC") == "c4"
    assert m.topic == "%DLQ%g"
    assert len(failing.messages) == 2  # not delivered to the group again


async def test_c6_tag_filter(broker):
    rec, all_ = Recorder(), Recorder()
    async with Producer(broker.address) as p:
        for tag in ["A", "B", "C", None, "A"]:
            await p.send("c6", f"{tag}", tags=tag)
        async with (
            PushConsumer(broker.address, group="ab", topic="c6", tags="A || B", listener=rec),
            PushConsumer(broker.address, group="all", topic="c6", tags="*", listener=all_),
        ):
            await wait_for(lambda: len(all_.messages) == 5, what="all 5 messages")
            await p.send("c6", b"marker", tags="B")
            await wait_for(lambda: b"marker" in rec.bodies(), what="the marker")
    assert sorted(m.tags for m in rec.messages) == ["A", "A", "B", "B"]


async def test_c7_start_latest_skips_backlog(broker):
    rec = Recorder()
    async with Producer(broker.address) as p:
        for i in range(5):
            await p.send("c7", f"old{i}")
        async with PushConsumer(broker.address, group="new", topic="c7", listener=rec,
                                start="latest"):
            r = await p.send("c7", b"new")
            await wait_for(lambda: rec.messages, what="the new message")
    assert [m.msg_id for m in rec.messages] == [r.msg_id]


async def test_c7_a_latest_start_holds_after_a_crash_right_after_it(broker_factory):
    # the group's start is saved before its subscription is answered: a broker killed
    # before its next checkpoint (every second) must not start it again at a later end
    b = broker_factory()
    rec = Recorder()
    async with Producer(b.address) as p:
        await p.send("c7k", b"backlog")
        async with PushConsumer(b.address, group="g", topic="c7k", listener=rec, start="latest"):
            pass
        sent = [(await p.send("c7k", f"m{i}")).msg_id for i in range(3)]
    b.kill9()
    b.start()
    async with PushConsumer(b.address, group="g", topic="c7k", listener=rec, start="latest"):
        await wait_for(lambda: len(rec.messages) >= 3, what="the 3 messages sent after the group started")
    assert sorted(m.msg_id for m in rec.messages) == sorted(sent)


async def test_c7_members_joining_a_new_latest_group_at_once_all_get_messages(broker):
    # the second member arrives while the group's new start is being saved: it joins after it
    rec = Recorder()
    async with Producer(broker.address) as p:
        await p.send("c7m", b"backlog")
        consumers = [PushConsumer(broker.address, group="pair", topic="c7m", listener=rec, start="latest")
                     for _ in range(2)]
        await asyncio.gather(*(c.start() for c in consumers))
        try:
            sent = {(await p.send("c7m", f"m{i}")).msg_id for i in range(20)}
            await wait_for(lambda: rec.ids() >= sent, what="the 20 messages sent after the group started")
        finally:
            await asyncio.gather(*(c.close() for c in consumers))
    assert b"backlog" not in rec.bodies()


async def test_subscribing_to_a_missing_topic_with_auto_create_off_is_refused(broker_factory):
    b = broker_factory("--no-auto-create-topics")
    with pytest.raises(TopicNotFoundError, match="nowhere"):
        async with PushConsumer(b.address, group="g", topic="nowhere", listener=Recorder()):
            pass
    assert "nowhere" not in _topic_names(b)


def _topic_names(b) -> set[str]:
    """The topics the broker lists (its admin API)."""
    with urllib.request.urlopen(f"{b.http_url}/api/topics", timeout=5) as r:
        return {t["topic"] for t in json.loads(r.read())["topics"]}


def _group(b, group: str) -> dict:
    """The admin API's row of ``group`` (empty if the broker has none)."""
    with urllib.request.urlopen(f"{b.http_url}/api/groups", timeout=5) as r:
        rows = {g["group"]: g for g in json.loads(r.read())["groups"]}
    return rows.get(group, {})


async def test_c9_close_finishes_in_flight_and_acks(broker_factory):
    b = broker_factory("--ack-timeout", "700ms", "--retry-delays", "200ms")
    gate = asyncio.Event()
    rec = Recorder(gate=gate)
    async with Producer(b.address) as p:
        r = await p.send("c9", b"slow")
        c = PushConsumer(b.address, group="g", topic="c9", listener=rec)
        await c.start()
        await wait_for(lambda: rec.in_flight == 1, what="the listener call to start")
        closing = asyncio.create_task(c.close())
        closing.add_done_callback(lambda _: rec.events.append(("closed", "")))
        await asyncio.sleep(0.05)
        assert not closing.done(), "close() must wait for the running listener call"
        gate.set()
        await asyncio.wait_for(closing, 5)
        # the call returned (not cancelled) before close() did, and its ack is stored: the
        # broker counts it acked with nothing in flight as soon as close() has returned
        assert rec.events == [("returned", r.msg_id), ("closed", "")]
        g = _group(b, "g")
        assert (g["acked"], g["in_flight"]) == (1, 0), g
        # reopen: the acked message must not come back, even after the ack timeout
        rec2 = Recorder()
        async with PushConsumer(b.address, group="g", topic="c9", listener=rec2):
            await p.send("c9", b"marker")
            await wait_for(lambda: b"marker" in rec2.bodies(), what="the marker")
            await asyncio.sleep(1.2)  # > ack-timeout + retry delay: a lost ack would show
    assert r.msg_id not in rec2.ids()


async def test_c9_close_gives_up_on_a_hanging_listener_after_its_grace(broker_factory):
    b = broker_factory("--ack-timeout", "700ms", "--retry-delays", "200ms")
    hang = asyncio.Event()  # never set
    rec = Recorder(gate=hang)
    async with Producer(b.address) as p:
        r = await p.send("c9g", b"hangs")
        c = PushConsumer(b.address, group="g", topic="c9g", listener=rec, close_grace=0.3)
        await c.start()
        await wait_for(lambda: rec.in_flight == 1, what="the listener call to start")
        t0 = time.monotonic()
        await asyncio.wait_for(c.close(), 5)
        assert time.monotonic() - t0 >= 0.3  # it waited its grace ...
        assert (rec.finished, rec.returned) == (1, 0)  # ... then cancelled the call, unacked
        rec2 = Recorder()
        async with PushConsumer(b.address, group="g", topic="c9g", listener=rec2):
            await wait_for(lambda: r.msg_id in rec2.ids(), what="the message redelivered")
    assert rec2.messages[0].reconsume_times == 1


async def test_c9_close_does_not_ack_unstarted(broker_factory):
    b = broker_factory("--ack-timeout", "500ms", "--retry-delays", "200ms")
    gate = asyncio.Event()
    rec = Recorder(gate=gate)
    async with Producer(b.address) as p:
        sent = [r.msg_id for r in await p.send_batch("c9b", [b"1", b"2", b"3"])]
        c = PushConsumer(b.address, group="g", topic="c9b", listener=rec, concurrency=1)
        await c.start()
        await wait_for(lambda: rec.in_flight == 1, what="the first listener call")
        await wait_for(lambda: len(c._ready) == 2, what="the other two queued")
        closing = asyncio.create_task(c.close())
        await asyncio.sleep(0)
        gate.set()
        await asyncio.wait_for(closing, 5)
        assert (rec.finished, rec.returned) == (1, 1)
        rec2 = Recorder()
        async with PushConsumer(b.address, group="g", topic="c9b", listener=rec2):
            await wait_for(lambda: rec2.ids() >= set(sent) - rec.ids(),
                           what="the unstarted messages redelivered")
        assert rec.messages[0].msg_id not in rec2.ids()


async def test_c10_concurrency_and_prefetch_bound(broker):
    gate = asyncio.Event()
    rec = Recorder(gate=gate)
    async with Producer(broker.address) as p:
        await p.send_batch("c10", [f"m{i}" for i in range(30)])
        async with PushConsumer(broker.address, group="g", topic="c10", listener=rec,
                                concurrency=3, prefetch=5) as c:
            await wait_for(lambda: rec.in_flight == 3 and len(c._ready) == 2,
                           what="3 calls running and 2 prefetched")
            for _ in range(10):  # the bounds hold while the listener is stuck
                await asyncio.sleep(0.02)
                assert rec.in_flight == 3 and rec.max_in_flight == 3
                assert len(c._ready) + rec.in_flight <= 5
            gate.set()
            await wait_for(lambda: rec.finished == 30, what="all 30 consumed")
    assert rec.max_in_flight == 3


async def test_plain_def_listener_runs_off_the_loop(broker):
    rec = ThreadRecorder()
    loop_thread = threading.get_ident()
    async with Producer(broker.address) as p:
        await p.send_batch("th", [b"1", b"2", b"3"])
        async with PushConsumer(broker.address, group="g", topic="th", listener=rec):
            await wait_for(lambda: len(rec.messages) == 3, what="3 messages")
    assert rec.threads and loop_thread not in rec.threads


async def test_reconnect_after_broker_restart(broker):
    rec = Recorder()
    async with (
        Producer(broker.address) as p,
        PushConsumer(broker.address, group="g", topic="rc", listener=rec) as c,
    ):
        first = await p.send("rc", b"before")
        await wait_for(lambda: first.msg_id in rec.ids(), what="first message")
        # the ack goes out after the listener returns: restart once the broker has it (an
        # ack still on the wire when the broker stops is lost, and the message comes again)
        async with aiohttp.ClientSession() as http:
            async def acked() -> bool:
                async with http.get(f"{broker.http_url}/api/groups") as r:
                    return any(g["group"] == "g" and g["acked"] >= 1 for g in (await r.json())["groups"])

            await wait_for(acked, what="the broker to record the ack")
        gen = c._conn.generation
        await asyncio.to_thread(broker.restart)
        second = await p.send("rc", b"after")  # waits for the reconnect, no action needed
        await wait_for(lambda: second.msg_id in rec.ids(), what="message after restart")
        assert c._conn.generation > gen
    assert rec.bodies().count(b"before") == 1


async def test_close_sends_final_acks_again_when_refused_as_unavailable():
    """The cluster engine refuses an ACK it could not confirm (a fail-over) with the retriable
    ``BrokerUnavailableError`` and keeps those deliveries: ``close()`` sends the same final
    ACK again and returns once it is answered. A scripted broker refuses the first one."""

    acks: list[tuple[int, list]] = []  # (rid, tokens) of ACK requests, in order
    unsubscribed = asyncio.Event()
    wire = Message(msg_id="0" * 24, topic="t", body=b"x").to_wire()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        decoder = FrameDecoder()
        while data := await reader.read(1 << 16):
            for op, rid, payload in decoder.feed(data):
                if op == Op.HELLO:
                    writer.write(encode_frame(Op.REPLY, rid, {"version": 1, "max_message_size": 1 << 20}))
                elif op == Op.SUBSCRIBE:
                    writer.write(encode_frame(Op.REPLY, rid, {}))
                    writer.write(encode_frame(Op.DELIVER, 0, {"d": [[7, wire]]}))
                elif op == Op.UNSUBSCRIBE:
                    writer.write(encode_frame(Op.REPLY, rid, {}))
                    unsubscribed.set()
                elif op == Op.ACK and rid:
                    acks.append((rid, payload["a"]))
                    if len(acks) == 1:
                        writer.write(encode_frame(Op.ERROR, rid, {"code": 2, "message": "not confirmed"}))
                    else:
                        writer.write(encode_frame(Op.REPLY, rid, {}))
                elif rid:
                    writer.write(encode_frame(Op.REPLY, rid, {}))
            await writer.drain()
        writer.close()

    started = asyncio.Event()

    async def listener(message):
        started.set()
        await unsubscribed.wait()  # still running when close() begins: acked by the final ACK
        return ConsumeResult.SUCCESS

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        consumer = PushConsumer(f"127.0.0.1:{server.sockets[0].getsockname()[1]}", group="g", topic="t",
                                listener=listener)
        await consumer.start()
        await wait_for(started.is_set, what="the delivery")
        await consumer.close()
    finally:
        server.close()
        await server.wait_closed()
    assert [a for _rid, a in acks] == [[[7, True]], [[7, True]]]  # the same ACK, sent again
    assert acks[0][0] != acks[1][0]
