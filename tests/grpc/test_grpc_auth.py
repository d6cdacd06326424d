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


async def test_access_keys_of_users_and_their_rights(rmq, tmp_path):
    """With users, gRPC requests must be signed with a user's access key (``halfmq user
    key-create``), and each RPC is checked against that user's rights."""
    from broker import Broker, BrokerConfig
    from tests.grpc.conftest import Clients
    from tests.security.helpers import add_users

    data = tmp_path / "d"
    add_users(data, {"ops": ("pw-ops", [("admin", "*", None)]),
                     "bank1": ("pw-1", [("publish", "gtransfer", None)]),
                     "bank2": ("pw-2", [("subscribe", "gtransfer", "gbank2")]),
                     "nobody": ("pw-n", [])})
    cfg = BrokerConfig(data_dir=str(data), port=0, http_port=0, grpc_port=0)
    async with Broker(cfg) as b:
        d = b.security.directory
        k1 = await d.create_access_key("bank1")
        k2 = await d.create_access_key("bank2")
        assert {k["user"] for k in d.list_access_keys()} == {"bank1", "bank2"}
        assert all("secret" not in str(k) for k in d.list_access_keys())
        clients = Clients(rmq, b.grpc_address)

        def run() -> None:
            try:
                p = clients.producer("gtransfer", config=clients.config(k1.key_id, k1.secret))
                assert p.send(message(rmq, "gtransfer", "from bank1")).message_id
                c = clients.simple("gbank2", "gtransfer", config=clients.config(k2.key_id, k2.secret))
                got = []
                for _ in range(5):
                    got += c.receive(16, 30)
                    if got:
                        break
                assert [m.body for m in got] == [b"from bank1"]
                c.ack(got[0])
                with pytest.raises(rmq.errors.UnauthorizedException):  # bank2 may not publish
                    clients.producer("gtransfer", config=clients.config(k2.key_id, k2.secret)).send(
                        message(rmq, "gtransfer", "from bank2"))
                with pytest.raises(Exception, match="route"):  # a wrong secret: no route, nothing sent
                    clients.producer("gtransfer", config=clients.config(k1.key_id, "wrong")).send(
                        message(rmq, "gtransfer", "forged"))
            finally:
                clients.close()

        await asyncio.to_thread(run)
        await d.revoke_access_key(k1.key_id)
        assert k1.key_id not in {k["access_key"] for k in d.list_access_keys()}
        topics = {t["topic"]: t["messages"] for t in await b.engine.admin_topics()}
        assert topics == {"gtransfer": 1}  # nothing stored for the refused sends
