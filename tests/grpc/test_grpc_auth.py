"""The access-key signature of RocketMQ 5 clients (``broker.frontends.grpc.auth``)."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta

import pytest

from broker.frontends.grpc.auth import AccessKeys, sign
from protocol.errors import AuthError
from tests.grpc.conftest import message
from tests.grpc.rawstub import md, pb, svc

pytestmark = pytest.mark.timeout(60)
KEYS = {"AK1": ("alice", "s3cret")}
NOW = datetime(2026, 1, 2, 3, 4, 5)


def signed(ak: str, sk: str, when: datetime = NOW) -> dict[str, str]:
    stamp = when.strftime("%Y%m%dT%H%M%SZ")
    return {"x-mq-date-time": stamp,
            "authorization": f"MQv2-HMAC-SHA1 Credential={ak}, SignedHeaders=x-mq-date-time, Signature={sign(sk, stamp)}"}


def test_signature_rules():
    keys = AccessKeys(KEYS.get, clock=lambda: NOW)
    assert keys.check(signed("AK1", "s3cret")) == "alice"
    for bad, why in ((signed("AK1", "wrong"), "wrong signature"), (signed("AK2", "s3cret"), "unknown access key"),
                     (signed("", ""), "requires signed"), ({}, "requires signed"),
                     (signed("AK1", "s3cret", NOW - timedelta(days=3)), "too far")):
        with pytest.raises(AuthError, match=why):
            keys.check(bad)


async def test_official_client_signs_and_a_wrong_secret_is_unauthorized(rmq, clients, gbroker, stub):
    gbroker.grpc.service.authenticator = AccessKeys(KEYS.get)
    r = await stub.api.QueryRoute(svc.QueryRouteRequest(topic=pb.Resource(name="t")), metadata=md())
    assert r.status.code == pb.Code.UNAUTHORIZED  # unsigned

    def run() -> None:
        p = clients.producer("auth-t", config=clients.config("AK1", "s3cret"))
        assert p.send(message(rmq, "auth-t", "signed")).message_id
        bad = clients.producer("auth-t", config=clients.config("AK1", "nope"))  # its start only logs the refusal
        with pytest.raises(Exception, match="route"):  # (the client logs the 40100 itself)
            bad.send(message(rmq, "auth-t", "unsigned"))

    await asyncio.to_thread(run)
