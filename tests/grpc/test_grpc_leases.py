"""Leases the broker renews for push consumers (``auto_renew``), and their release when
the client goes: its Telemetry stream closes, it terminates, or it falls silent. Raw stubs;
the fixture's timings: slice 1.5 s, renewed 0.8 s ahead every 0.2 s, released after 0.3 s."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from tests.conftest import wait_for
from tests.grpc.rawstub import collect, md, pb, receive_req, send_req, settings, svc

pytestmark = pytest.mark.timeout(60)
C = pb.Code


async def lease_one(stub: Any, client: str, topic: str, group: str) -> Any:
    assert (await stub.api.SendMessage(send_req(topic, b"leased"), metadata=md(client))).status.code == C.OK
    _s, (m,), _ = await collect(stub.api.ReceiveMessage(
        receive_req(group, topic, invisible_s=None, auto_renew=True), metadata=md(client)))
    return m


async def receive_again(stub: Any, topic: str, group: str, poll_s: float = 5.0) -> tuple[Any, float]:
    t0 = time.monotonic()
    status, msgs, _ = await collect(stub.api.ReceiveMessage(receive_req(group, topic, poll_s=poll_s),
                                                            metadata=md("raw@other")))
    assert status.code == C.OK, status
    return msgs[0], time.monotonic() - t0


async def test_auto_renewed_lease_outlives_its_slice_while_the_client_lives(stub, gbroker):
    call = stub.api.Telemetry(metadata=md("raw@live"))
    await call.write(settings("PUSH_CONSUMER", group="g-live", topics=("live",)))
    await call.read()
    m = await lease_one(stub, "raw@live", "live", "g-live")
    gd = gbroker.engine.groups["g-live"]
    t_end = time.monotonic() + 4.0  # more than two slices
    while time.monotonic() < t_end:
        await asyncio.sleep(0.2)
        assert gd.stats["expired"] == 0 and len(gd.leases) == 1
    ack = svc.AckMessageRequest(group=pb.Resource(name="g-live"), topic=pb.Resource(name="live"), entries=[
        svc.AckMessageEntry(message_id=m.system_properties.message_id,
                            receipt_handle=m.system_properties.receipt_handle)])
    assert (await stub.api.AckMessage(ack, metadata=md("raw@live"))).status.code == C.OK  # the same handle
    assert gbroker.grpc.service.clients.renewed == {}
    call.cancel()


async def test_closed_stream_releases_the_leases_quickly(stub, gbroker):
    call = stub.api.Telemetry(metadata=md("raw@gone"))
    await call.write(settings("PUSH_CONSUMER", group="g-gone", topics=("gone",)))
    await call.read()
    m = await lease_one(stub, "raw@gone", "gone", "g-gone")
    call.cancel()  # the client vanishes (as a killed process's stream ends)
    again, took = await receive_again(stub, "gone", "g-gone")
    assert again.system_properties.message_id == m.system_properties.message_id
    assert again.system_properties.delivery_attempt == 2
    assert took < 1.4  # released after 0.3 s, well before the 1.5 s slice would end


async def test_termination_releases_the_leases(stub, gbroker):
    call = stub.api.Telemetry(metadata=md("raw@term"))
    await call.write(settings("PUSH_CONSUMER", group="g-term", topics=("term",)))
    await call.read()
    await lease_one(stub, "raw@term", "term", "g-term")
    r = await stub.api.NotifyClientTermination(svc.NotifyClientTerminationRequest(group=pb.Resource(name="g-term")),
                                               metadata=md("raw@term"))
    assert r.status.code == C.OK
    assert "raw@term" not in gbroker.grpc.service.clients.by_id
    _again, took = await receive_again(stub, "term", "g-term")
    assert took < 1.4
    call.cancel()


async def test_a_client_without_a_stream_that_falls_silent_is_forgotten(stub, gbroker):
    gbroker.grpc.service.tuning.client_timeout = 0.5
    await lease_one(stub, "raw@mute", "mute", "g-mute")  # no Telemetry stream, no heartbeat after
    clients = gbroker.grpc.service.clients
    await wait_for(lambda: "raw@mute" not in clients.by_id, timeout=5, what="the silent client to go")
    again, _took = await receive_again(stub, "mute", "g-mute")
    assert again.system_properties.delivery_attempt == 2


async def test_heartbeats_keep_a_client_without_a_stream(stub, gbroker):
    gbroker.grpc.service.tuning.client_timeout = 0.6
    await lease_one(stub, "raw@beat", "beat", "g-beat")
    hb = svc.HeartbeatRequest(group=pb.Resource(name="g-beat"), client_type=pb.ClientType.PUSH_CONSUMER)
    for _ in range(10):  # 2 s of heartbeats every 0.2 s: longer than the timeout and a slice
        assert (await stub.api.Heartbeat(hb, metadata=md("raw@beat"))).status.code == C.OK
        await asyncio.sleep(0.2)
    assert "raw@beat" in gbroker.grpc.service.clients.by_id
    assert gbroker.engine.groups["g-beat"].stats["expired"] == 0
