"""``halfmq broker --engine``: gateways over a real JetStream cluster, driven by the SDKs.

The start-up check as a user meets it (exit status and message), users shared by every
gateway, and the SDKs' address lists: a gateway killed with SIGKILL under a running
producer and consumer loses no acknowledged message, and a transactional producer's
check-back finds it on the gateway it moved to.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from consumer_sdk import ConsumeResult, PushConsumer
from producer_sdk import (
    AuthError,
    LocalTransactionState,
    Producer,
    TransactionListener,
    TransactionProducer,
)
from tests.cluster.conftest import GATEWAY_TEST_ARGS, gateway_args
from tests.conftest import ROOT, wait_for

pytestmark = pytest.mark.timeout(180)


def _run_broker(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "broker", "--port", "0", "--http-port", "0", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_broker_refuses_more_replicas_than_engine_servers(nats_cluster):
    r = _run_broker(*gateway_args(nats_cluster, replicas=5))
    assert r.returncode == 2, r.stderr
    assert r.stdout == ""
    assert "5" in r.stderr and "3" in r.stderr, r.stderr


def test_broker_refuses_a_bad_engine_url():
    r = _run_broker("--engine", "http://127.0.0.1:1")
    assert r.returncode == 2 and "engine" in r.stderr and "nats://" in r.stderr, r.stderr


def test_broker_refuses_an_unreachable_engine():
    r = _run_broker("--engine", "nats://127.0.0.1:1", "--engine-monitor", "http://127.0.0.1:1")
    assert r.returncode == 2 and "cannot reach" in r.stderr, r.stderr


def test_lazy_fsync_refused_unless_asked_then_logged_once(cluster_factory, gateway_factory):
    lazy = cluster_factory(nodes=1, sync_always=False)
    r = _run_broker(*gateway_args(lazy, replicas=1))
    assert r.returncode == 2 and "sync" in r.stderr, r.stderr
    gw = gateway_factory(lazy, "--engine-fsync", "lazy", replicas=1)
    assert "engine=" + lazy.engine_url in gw.ready_line
    gw.stop()
    assert gw.log_path.read_text().count("engine fsync is lazy") == 1


async def test_send_on_one_gateway_consume_on_the_other(nats_cluster, gateway_factory, unique):
    a = gateway_factory(nats_cluster, *GATEWAY_TEST_ARGS)
    b = gateway_factory(nats_cluster, *GATEWAY_TEST_ARGS)
    got: list[bytes] = []

    async def on(m):
        got.append(m.body)
        return ConsumeResult.SUCCESS

    async with Producer(a.address) as p:
        sent = [await p.send(unique, f"m{i}".encode(), tags="x") for i in range(20)]
        assert [r.queue_offset for r in sent] == sorted(r.queue_offset for r in sent)
    async with PushConsumer(b.address, group=unique, topic=unique, listener=on):
        await wait_for(lambda: len(got) >= 20, timeout=30, what="20 messages through gateway B")
    assert sorted(got) == sorted(f"m{i}".encode() for i in range(20))


def _http(method: str, url: str, body: object | None = None, auth: tuple[str, str] | None = None) -> object:
    req = urllib.request.Request(url, method=method, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    if auth is not None:
        import base64

        req.add_header("Authorization", "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode())
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def _can_login(http_url: str) -> bool:
    try:
        _http("GET", http_url + "/api/users", None, ("ops", "pw-ops"))
    except urllib.error.HTTPError:
        return False
    return True


async def test_users_and_rights_are_shared_by_every_gateway(cluster_factory, gateway_factory, unique):
    engine = cluster_factory(nodes=1)
    a = gateway_factory(engine, replicas=1)
    b = gateway_factory(engine, replicas=1)
    async with Producer(b.address) as p:  # no user yet: open on loopback
        await p.send(unique, b"before")
    for args, stdin in ((("add", "ops", "--password-stdin"), "pw-ops\n"), (("grant", "ops", "admin", "*"), "")):
        r = await asyncio.to_thread(  # the first admin, written into the engine
            subprocess.run, [sys.executable, "-m", "broker.cli", "user", *args,
                             "--engine", engine.engine_url, "--replicas", "1"],
            cwd=ROOT, input=stdin, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
    await wait_for(lambda: asyncio.to_thread(_can_login, a.http_url), timeout=15,
                   what="gateway A to know the user")
    await asyncio.to_thread(_http, "POST", a.http_url + "/api/users/ops/grant",  # online, on A
                            {"right": "publish", "topic": "*"}, ("ops", "pw-ops"))

    async def anonymous_refused() -> bool:
        try:
            async with Producer(b.address, send_timeout=2) as p:
                await p.send(unique, b"anonymous")
        except AuthError:
            return True
        return False

    await wait_for(anonymous_refused, timeout=15, what="gateway B to require the login added on A")
    async with Producer(b.address, user="ops", password="pw-ops") as p:
        await p.send(unique, b"as ops")
    # a change made on B reaches A as well
    await asyncio.to_thread(_http, "POST", b.http_url + "/api/users/ops/password",
                            {"password": "pw-new"}, ("ops", "pw-ops"))

    async def new_password_works_on_a() -> bool:
        try:
            async with Producer(a.address, user="ops", password="pw-new", send_timeout=2) as p:
                await p.send(unique, b"new password")
        except AuthError:
            return False
        return True

    await wait_for(new_password_works_on_a, timeout=15, what="gateway A to take B's password change")
    users = await asyncio.to_thread(_http, "GET", b.http_url + "/api/users", None, ("ops", "pw-new"))
    assert [u["user"] for u in users["users"]] == ["ops"]


async def test_kill9_of_a_gateway_under_a_producer_and_a_consumer(nats_cluster, gateway_factory, unique):
    """Both clients hold "A,B"; A is killed mid-stream: every acknowledged send is
    consumed, both clients go on through B."""
    a = gateway_factory(nats_cluster, *GATEWAY_TEST_ARGS)
    b = gateway_factory(nats_cluster, *GATEWAY_TEST_ARGS)
    both = f"{a.address},{b.address}"
    acked: set[bytes] = set()
    got: set[bytes] = set()
    stop = asyncio.Event()
    killed = asyncio.Event()
    after_kill = 0

    async def on(m):
        got.add(m.body)
        return ConsumeResult.SUCCESS

    async def produce(p: Producer) -> None:
        nonlocal after_kill
        i = 0
        while not stop.is_set():
            body = f"{unique}-{i}".encode()
            i += 1
            try:
                await p.send(unique, body)
            except Exception:  # noqa: BLE001 - unacknowledged: may or may not be stored
                continue
            acked.add(body)
            if killed.is_set():
                after_kill += 1

    async with (
        Producer(both, send_timeout=15) as p,
        PushConsumer(both, group=unique, topic=unique, listener=on) as c,
    ):
        assert p._conn.current_address == a.address and c._conn.current_address == a.address
        task = asyncio.create_task(produce(p))
        await wait_for(lambda: len(got) >= 200, timeout=30, what="traffic through A")
        a.kill9()
        killed.set()
        await wait_for(lambda: after_kill >= 200, timeout=30, what="sends acknowledged after the kill")
        stop.set()
        await task
        assert p._conn.current_address == b.address
        # leases A held expire after --ack-timeout 2s and are redelivered through B
        await wait_for(lambda: acked <= got, timeout=60, what="every acknowledged send consumed")
        assert c._conn.current_address == b.address
    assert len(acked) >= 400


class _Unknown(TransactionListener):
    """Leaves every transaction to the check-back, and answers it with COMMIT."""

    def __init__(self) -> None:
        self.checked: list[str] = []

    async def execute_local_transaction(self, message, arg):
        return LocalTransactionState.UNKNOWN

    async def check_local_transaction(self, message):
        self.checked.append(message.msg_id)
        return LocalTransactionState.COMMIT


async def test_check_back_follows_a_producer_to_its_new_gateway(nats_cluster, gateway_factory, unique):
    a = gateway_factory(nats_cluster, *GATEWAY_TEST_ARGS)
    b = gateway_factory(nats_cluster, *GATEWAY_TEST_ARGS)
    listener = _Unknown()
    got: list[str] = []

    async def on(m):
        got.append(m.msg_id)
        return ConsumeResult.SUCCESS

    async with TransactionProducer(f"{a.address},{b.address}", group=unique, listener=listener,
                                   send_timeout=15) as p:
        r = await p.send_in_transaction(unique, b"decided by a check-back")
        assert r.state == LocalTransactionState.UNKNOWN
        a.kill9()
        await wait_for(lambda: p._conn.connected and p._conn.current_address == b.address,
                       timeout=30, what="the producer on gateway B")
        await wait_for(lambda: r.msg_id in listener.checked, timeout=60,
                       what="the check-back through gateway B")
        async with PushConsumer(b.address, group=unique, topic=unique, listener=on):
            await wait_for(lambda: r.msg_id in got, timeout=30, what="the committed message")
