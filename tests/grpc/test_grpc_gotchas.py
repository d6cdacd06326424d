"""Regression tests for what breaks the official Python client (the gotchas of the
RocketMQ 5 compatibility research), mostly through raw stubs, and the status codes the
proxy answers.

The gotchas, one test each (numbered in the test names):

1. routes need broker id 0 (anything else is "not master") and reachable endpoints;
2. Telemetry Settings must be answered with status OK *and* Settings (a push consumer
   waits 10 s for them, then fails to start);
3. ``max_body_size`` 0 makes every send fail client-side;
4. push consumers read ``long_polling_timeout`` and only a *customized* back-off (whole
   seconds), from the Settings reply;
5. a client that stops reading its Telemetry stream (the push consumer does, metrics off)
   must never block the broker;
6. a receive naming one queue must still get messages of the others (else it waits a
   whole long poll while messages sit elsewhere);
7. ``body_encoding`` must be IDENTITY (UNSPECIFIED makes the whole receive raise),
   check-back messages included;
8. ``delivery_attempt`` must be set (missing: a push consumer's nack retries forever);
9. ``body_digest`` must be present and right (else an ERROR log per message, or a
   message treated as corrupted);
10. ``delivery_timestamp`` holds seconds: a milliseconds value must be refused as an
    illegal delivery time, not scheduled in the year 58,000;
11. an empty long poll must wait (an instant answer turns push consumers into a busy
    loop) and end before the call's deadline, with MESSAGE_NOT_FOUND (which the client
    takes as success); and a send whose only entry fails must say so in the top-level
    status (the only one the client reads).
"""

from __future__ import annotations

import asyncio
import time
import zlib
from typing import Any

import grpc
import pytest

from tests.conftest import wait_for
from tests.grpc.conftest import message
from tests.grpc.rawstub import collect, md, pb, receive_req, send_req, settings, svc

pytestmark = pytest.mark.timeout(60)
C = pb.Code


async def send(stub: Any, topic: str, body: bytes, **kw: Any) -> Any:
    return await stub.api.SendMessage(send_req(topic, body, **kw), metadata=md())


async def test_1_route_has_broker_id_0_and_the_endpoints_used(stub, gbroker):
    host, port = gbroker.grpc_address.split(":")
    ep = pb.Endpoints(scheme=pb.AddressScheme.IPv4, addresses=[pb.Address(host=host, port=int(port))])
    r = await stub.api.QueryRoute(svc.QueryRouteRequest(topic=pb.Resource(name="rt"), endpoints=ep), metadata=md())
    assert r.status.code == C.OK
    assert [q.id for q in r.message_queues] == [0, 1, 2, 3]
    for q in r.message_queues:
        assert (q.broker.id, q.permission, q.broker.endpoints) == (0, pb.Permission.READ_WRITE, ep)
        assert {pb.MessageType.NORMAL, pb.MessageType.FIFO, pb.MessageType.TRANSACTION} <= set(q.accept_message_types)
    gbroker.grpc.service.advertised = pb.Endpoints(scheme=pb.AddressScheme.DOMAIN_NAME,
                                                   addresses=[pb.Address(host="mq.example", port=8081)])
    r = await stub.api.QueryRoute(svc.QueryRouteRequest(topic=pb.Resource(name="rt"), endpoints=ep), metadata=md())
    assert r.message_queues[0].broker.endpoints.addresses[0].host == "mq.example"  # --advertise wins


async def test_1_unknown_topic_without_auto_create_is_topic_not_found(stub, gbroker):
    gbroker.config.auto_create_topics = False
    r = await stub.api.QueryRoute(svc.QueryRouteRequest(topic=pb.Resource(name="nope")), metadata=md())
    assert r.status.code == C.TOPIC_NOT_FOUND


async def test_2_settings_are_answered_with_status_ok_and_settings(rmq, clients, stub):
    call = stub.api.Telemetry(metadata=md("raw@tele"))
    await call.write(settings("PRODUCER", topics=("st",)))
    reply = await asyncio.wait_for(call.read(), 5)
    assert reply.status.code == C.OK and reply.HasField("settings")
    assert not reply.settings.metric.on
    await call.done_writing()
    t0 = time.monotonic()
    await asyncio.to_thread(clients.push, "g-start", "st", lambda m: rmq.ConsumeResult.SUCCESS)
    assert time.monotonic() - t0 < 5  # it would wait 10 s for a reply, then fail


async def test_3_max_body_size_is_the_broker_limit(rmq, clients, stub, gbroker):
    call = stub.api.Telemetry(metadata=md("raw@body"))
    await call.write(settings("PRODUCER", topics=("bt",)))
    reply = await asyncio.wait_for(call.read(), 5)
    assert reply.settings.publishing.max_body_size == gbroker.config.max_message_size
    assert reply.settings.backoff_policy.max_attempts == 3
    await call.done_writing()
    limit = gbroker.config.max_message_size

    def run() -> None:
        p = clients.producer("bt")
        assert p.send(message(rmq, "bt", b"x" * limit)).message_id  # at the limit: fine
        with pytest.raises(Exception, match="exceeds the threshold"):
            p.send(message(rmq, "bt", b"x" * (limit + 1)))

    await asyncio.to_thread(run)


async def test_4_push_consumers_get_long_polling_and_a_customized_backoff(stub, gbroker):
    await gbroker.engine.admin_set_group_settings("g-bo", max_attempts=5, retry_delays=[0.5, 2.0, 60.0])
    call = stub.api.Telemetry(metadata=md("raw@push"))
    await call.write(settings("PUSH_CONSUMER", group="g-bo", topics=("bo",)))
    st = (await asyncio.wait_for(call.read(), 5)).settings
    assert st.subscription.long_polling_timeout.seconds == 3  # ServiceTuning.long_polling in tests
    assert not st.subscription.fifo
    bp = st.backoff_policy
    assert bp.WhichOneof("strategy") == "customized_backoff" and bp.max_attempts == 5
    assert [d.seconds for d in bp.customized_backoff.next] == [1, 2, 60]  # whole seconds (0.5 -> 1)
    await gbroker.engine.admin_set_group_settings("g-bo", fifo=True)
    await call.write(settings("PUSH_CONSUMER", group="g-bo", topics=("bo",)))
    assert (await asyncio.wait_for(call.read(), 5)).settings.subscription.fifo
    await call.done_writing()


async def test_5_a_client_that_never_reads_its_stream_blocks_nothing(stub, gbroker):
    """A producer whose stream is never read gets check-backs until gRPC's flow control
    and then its bounded queue are full; the broker goes on serving everyone."""
    from broker.frontends.grpc.clients import TELEMETRY_QUEUE

    call = stub.api.Telemetry(metadata=md("raw@deaf"))
    await call.write(settings("PRODUCER", topics=("deaf",)))
    body = b"x" * 64 * 1024  # check-backs carry the body: the stream's window fills soon
    for _ in range(TELEMETRY_QUEUE + 40):  # each half message becomes a check-back to this client
        r = await stub.api.SendMessage(send_req("deaf", body, mtype="TRANSACTION"), metadata=md("raw@deaf"))
        assert r.status.code == C.OK
    client = gbroker.grpc.service.clients.by_id["raw@deaf"]
    await wait_for(lambda: client.streams and client.streams[0].full(), timeout=15, what="a full stream queue")
    for _ in range(3):
        r = await send(stub, "other", b"still served")
        assert r.status.code == C.OK
    call.cancel()


async def test_6_a_receive_naming_one_queue_gets_messages_of_every_queue(stub):
    for i in range(8):  # round robin over 4 queues
        assert (await send(stub, "q6", b"%d" % i)).status.code == C.OK
    status, msgs, _ = await collect(stub.api.ReceiveMessage(receive_req("g6", "q6", queue=0), metadata=md()))
    assert status.code == C.OK
    assert sorted({m.system_properties.queue_id for m in msgs}) == [0, 1, 2, 3] and len(msgs) == 8


async def test_7_8_9_delivered_messages_carry_encoding_attempt_and_digest(stub):
    body = b"payload \x00\xff"
    assert (await send(stub, "q7", body, tag="T")).status.code == C.OK
    _s, (m,), _ = await collect(stub.api.ReceiveMessage(receive_req("g7", "q7"), metadata=md()))
    sp = m.system_properties
    assert sp.body_encoding == pb.Encoding.IDENTITY
    assert sp.delivery_attempt == 1
    assert sp.body_digest.type == pb.DigestType.CRC32
    assert sp.body_digest.checksum == f"{zlib.crc32(body) & 0xFFFFFFFF:08X}"
    assert sp.receipt_handle and sp.tag == "T" and m.body == body


async def test_7_check_back_message_is_identity_encoded(stub, gbroker):
    call = stub.api.Telemetry(metadata=md("raw@check"))
    await call.write(settings("PRODUCER", topics=("q7c",)))
    await call.read()
    r = await stub.api.SendMessage(send_req("q7c", b"half", mtype="TRANSACTION"), metadata=md("raw@check"))
    tx_id = r.entries[0].transaction_id
    cmd = await asyncio.wait_for(call.read(), 10)
    check = cmd.recover_orphaned_transaction_command
    assert check.transaction_id == tx_id
    assert check.message.system_properties.body_encoding == pb.Encoding.IDENTITY
    assert check.message.system_properties.message_type == pb.MessageType.TRANSACTION
    assert check.message.body == b"half"
    end = svc.EndTransactionRequest(topic=pb.Resource(name="q7c"), message_id=tx_id, transaction_id=tx_id,
                                    resolution=pb.TransactionResolution.COMMIT,
                                    source=pb.TransactionSource.SOURCE_SERVER_CHECK)
    assert (await stub.api.EndTransaction(end, metadata=md("raw@check"))).status.code == C.OK
    _s, (m,), _ = await collect(stub.api.ReceiveMessage(receive_req("g7c", "q7c"), metadata=md()))
    assert m.system_properties.message_id == tx_id
    call.cancel()


async def test_8_nack_redelivers_with_the_next_attempt(stub):
    assert (await send(stub, "q8", b"x")).status.code == C.OK
    _s, (m,), _ = await collect(stub.api.ReceiveMessage(receive_req("g8", "q8"), metadata=md()))
    cid = svc.ChangeInvisibleDurationRequest(group=pb.Resource(name="g8"), topic=pb.Resource(name="q8"),
                                             receipt_handle=m.system_properties.receipt_handle,
                                             message_id=m.system_properties.message_id)
    cid.invisible_duration.nanos = 200_000_000
    r = await stub.api.ChangeInvisibleDuration(cid, metadata=md())
    assert r.status.code == C.OK and r.receipt_handle and r.receipt_handle != m.system_properties.receipt_handle
    _s, (again,), _ = await collect(stub.api.ReceiveMessage(receive_req("g8", "q8", poll_s=3), metadata=md()))
    assert again.system_properties.delivery_attempt == 2


async def test_10_a_delivery_time_in_milliseconds_is_illegal(rmq, clients, stub, gbroker):
    ms = int(time.time() * 1000) + 5000
    r = await send(stub, "q10", b"x", mtype="DELAY", delivery_seconds=ms)
    assert r.status.code == C.ILLEGAL_DELIVERY_TIME and "seconds" in r.status.message

    schedules = gbroker.grpc.service.schedules

    def run() -> None:  # the same through the official client, as its docstring suggests
        p = clients.producer("q10")
        # a broker that cannot schedule messages does not list DELAY in its routes: the
        # client refuses the message itself
        with pytest.raises(Exception, match="40012" if schedules else "queue accept message types"):
            p.send(message(rmq, "q10", "x", delivery_timestamp=ms))

    await asyncio.to_thread(run)


async def test_11_empty_long_poll_waits_then_says_message_not_found(stub):
    t0 = time.monotonic()
    status, msgs, stamps = await collect(
        stub.api.ReceiveMessage(receive_req("g11", "q11", poll_s=1.0), metadata=md(), timeout=4))
    took = time.monotonic() - t0
    assert (status.code, msgs, len(stamps)) == (C.MESSAGE_NOT_FOUND, [], 1)
    assert 0.9 <= took < 3
    # a poll longer than the call's deadline ends before the deadline, not with DEADLINE_EXCEEDED
    t0 = time.monotonic()
    status, _m, _s = await collect(
        stub.api.ReceiveMessage(receive_req("g11", "q11", poll_s=20.0), metadata=md(), timeout=2))
    assert status.code == C.MESSAGE_NOT_FOUND and time.monotonic() - t0 < 2


async def test_11_a_failing_single_entry_sets_the_top_level_status(stub):
    r = await send(stub, "q12", b"")
    assert r.status.code == C.MESSAGE_BODY_EMPTY
    r = await send(stub, "q12", b"x", mtype="TRANSACTION", message_group="g")
    assert r.status.code == C.MESSAGE_PROPERTY_CONFLICT_WITH_TYPE
    r = await send(stub, "%DLQ%x", b"x")
    assert r.status.code == C.ILLEGAL_TOPIC
    r = await send(stub, "q12", b"x", tag="a|b")
    assert r.status.code == C.ILLEGAL_MESSAGE_TAG


async def test_assignments_are_stable_any_queue_or_per_queue_for_fifo(stub, gbroker):
    req = svc.QueryAssignmentRequest(topic=pb.Resource(name="qa"), group=pb.Resource(name="g-qa"),
                                     endpoints=pb.Endpoints(addresses=[pb.Address(host="127.0.0.1", port=1)]))
    a1 = await stub.api.QueryAssignment(req, metadata=md())
    a2 = await stub.api.QueryAssignment(req, metadata=md())
    assert a1 == a2 and [a.message_queue.id for a in a1.assignments] == [-1]
    await gbroker.engine.admin_set_group_settings("g-qa", fifo=True)
    a3 = await stub.api.QueryAssignment(req, metadata=md())
    assert [a.message_queue.id for a in a3.assignments] == [0, 1, 2, 3]


async def test_refusals_answer_the_proxy_codes(stub):
    r = await stub.api.QueryRoute(svc.QueryRouteRequest(topic=pb.Resource(name="t")))  # no client id
    assert r.status.code == C.CLIENT_ID_REQUIRED
    r = await stub.api.QueryRoute(svc.QueryRouteRequest(topic=pb.Resource(name="t", resource_namespace="ns")),
                                  metadata=md())
    assert r.status.code == C.BAD_REQUEST and "namespace" in r.status.message
    status, _m, _s = await collect(stub.api.ReceiveMessage(receive_req("g", "t", sql=True), metadata=md()))
    assert status.code == C.ILLEGAL_FILTER_EXPRESSION
    status, _m, _s = await collect(stub.api.ReceiveMessage(receive_req("g", "t", invisible_s=None), metadata=md()))
    assert status.code == C.ILLEGAL_INVISIBLE_TIME
    ack = svc.AckMessageRequest(group=pb.Resource(name="g"), topic=pb.Resource(name="t"),
                                entries=[svc.AckMessageEntry(message_id="x", receipt_handle="nonsense")])
    assert (await stub.api.AckMessage(ack, metadata=md())).status.code == C.INVALID_RECEIPT_HANDLE
    end = svc.EndTransactionRequest(topic=pb.Resource(name="t"), transaction_id=" ",
                                    resolution=pb.TransactionResolution.COMMIT)
    assert (await stub.api.EndTransaction(end, metadata=md())).status.code == C.INVALID_TRANSACTION_ID
    end.transaction_id = "000000010000000000000042"
    assert (await stub.api.EndTransaction(end, metadata=md())).status.code == C.INVALID_TRANSACTION_ID
    r = await stub.api.GetOffset(svc.GetOffsetRequest(), metadata=md())
    assert r.status.code == C.NOT_IMPLEMENTED
    with pytest.raises(grpc.aio.AioRpcError):  # gRPC-level errors stay for malformed bytes only
        await stub.channel.unary_unary("/apache.rocketmq.v2.MessagingService/SendMessage")(b"\xff\xff", metadata=md())


async def test_recall_of_a_message_that_is_not_scheduled_is_not_found(stub, gbroker):
    r = await send(stub, "rc", b"plain")
    req = svc.RecallMessageRequest(topic=pb.Resource(name="rc"), recall_handle=r.entries[0].message_id)
    r = await stub.api.RecallMessage(req, metadata=md())
    expected = C.NOT_FOUND if gbroker.grpc.service.schedules else C.UNSUPPORTED
    assert r.status.code == expected, r.status
