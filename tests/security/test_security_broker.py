"""Security against a real broker process: logins, replay, rights on every operation,
the END_TX group rule, throttling, protected mode, TLS and mutual TLS, online changes."""

from __future__ import annotations

import asyncio
import base64
import os
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from consumer_sdk import ConsumeResult, PushConsumer
from producer_sdk import (
    AuthError,
    BrokerUnavailableError,
    LocalTransactionState,
    Producer,
    TransactionListener,
    TransactionProducer,
)
from protocol import Op
from tests.conftest import ROOT, wait_for
from tests.security.helpers import (
    Certs,
    RawClient,
    RecordingRelay,
    add_users,
    raw_login,
    raw_request,
)

USERS = {
    "bank1": ("pw-bank1", [("publish", "transfer", "producer_bank1")]),
    "bank2": ("pw-bank2", [("subscribe", "transfer", "consumer_bank2")]),
    "other": ("pw-other", [("publish", "other", "producer_other"), ("subscribe", "other", "g_other")]),
    "reader": ("pw-reader", [("read", "*", None)]),
    "ops": ("pw-ops", [("admin", "*", None)]),
}
BANK1 = {"user": "bank1", "password": "pw-bank1"}
BANK2 = {"user": "bank2", "password": "pw-bank2"}
OTHER = {"user": "other", "password": "pw-other"}
CSRF = {"X-HalfMQ-Request": "test"}


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


OPS = basic("ops", "pw-ops")


class Unknown(TransactionListener):
    """Leaves every transaction PREPARED (the tests resolve them by hand or not at all)."""

    async def execute_local_transaction(self, message, arg):
        return LocalTransactionState.UNKNOWN

    async def check_local_transaction(self, message):
        return LocalTransactionState.UNKNOWN


@pytest.fixture
def secured(tmp_path, broker_factory):
    data = tmp_path / "secured"
    add_users(data, USERS)
    return broker_factory("--tx-timeout", "60s", "--retry-delays", "100ms", data_dir=data)


async def _get(http: aiohttp.ClientSession, url: str, headers: dict[str, str] = OPS) -> tuple[int, object]:
    async with http.get(url, headers=headers) as r:
        return r.status, await r.json()


async def _messages(http: aiohttp.ClientSession, base: str, topic: str) -> int:
    status, body = await _get(http, f"{base}/api/topics")
    assert status == 200, body
    return sum(t["messages"] for t in body["topics"] if t["topic"] == topic)  # type: ignore[index]


async def _prepared(http: aiohttp.ClientSession, base: str) -> list[str]:
    status, body = await _get(http, f"{base}/api/transactions?state=prepared")
    assert status == 200, body
    return [t["msg_id"] for t in body["transactions"]]  # type: ignore[index]


async def test_logins_wrong_password_unknown_user_no_credentials(secured):
    for options in ({"user": "bank1", "password": "wrong"}, {"user": "mallory", "password": "pw-bank1"}, {}):
        with pytest.raises(AuthError) as err:
            async with Producer(secured.address, send_timeout=2, **options):
                pass
        assert "unknown user or wrong password" in str(err.value) or "requires a login" in str(err.value)
    async with Producer(secured.address, **BANK1) as p:
        assert (await p.send("transfer", b"x")).msg_id
    log = secured.log_path.read_text()
    assert "authentication failed for user 'bank1' from 127.0.0.1:" in log
    assert "authentication failed for user 'mallory' from 127.0.0.1:" in log
    assert "no credentials and users exist" in log


async def test_credentials_from_the_environment(secured, monkeypatch):
    monkeypatch.setenv("HALFMQ_USER", "bank1")
    monkeypatch.setenv("HALFMQ_PASSWORD", "pw-bank1")
    async with Producer(secured.address) as p:
        assert (await p.send("transfer", b"env")).msg_id


async def test_a_replayed_handshake_is_refused(secured):
    relay = await RecordingRelay(secured.address).start()
    try:
        async with Producer(relay.address, **BANK1) as p:
            await p.send("transfer", b"captured")
        captured = bytes(relay.sent)
    finally:
        await relay.close()
    async with aiohttp.ClientSession() as http:
        before = await _messages(http, secured.http_url, "transfer")
        raw = await RawClient.connect(secured.address)
        raw.send_bytes(captured)  # HELLO, AUTH and SEND exactly as they crossed the wire
        hello = await raw.next_frame()
        assert hello is not None and hello[0] == Op.REPLY  # a fresh server-first: a new nonce
        refused = await raw.next_frame()
        assert refused is not None and refused[0] == Op.ERROR and refused[2]["code"] == AuthError.code
        assert await raw.next_frame() is None  # closed; the SEND was never read
        await raw.close()
        assert await _messages(http, secured.http_url, "transfer") == before == 1


async def test_each_operation_refused_without_its_right_and_nothing_stored(secured):
    async with aiohttp.ClientSession() as http:
        async with Producer(secured.address, group="producer_other", **OTHER) as p:
            with pytest.raises(AuthError, match="may not publish to topic 'transfer'"):
                await p.send("transfer", b"no")
            with pytest.raises(AuthError):
                await p.send_batch("transfer", [b"a", b"b"])
            assert (await p.send("other", b"yes")).msg_id  # its own topic
        with pytest.raises(AuthError, match="producer group 'producer_bank1'"):
            async with TransactionProducer(secured.address, group="producer_bank1", listener=Unknown(), **OTHER):
                pass
        with pytest.raises(AuthError):  # bank2 may consume, not publish
            async with Producer(secured.address, **BANK2) as p:
                await p.send("transfer", b"no")
        for topic, group, opts in (("transfer", "consumer_bank2", OTHER), ("%DLQ%consumer_bank2", "consumer_bank2", BANK2),
                                   ("transfer", "auditors", BANK2)):
            with pytest.raises(AuthError, match="may not subscribe"):
                async with PushConsumer(secured.address, group=group, topic=topic,
                                        listener=lambda m: ConsumeResult.SUCCESS, **opts):
                    pass
        assert await _messages(http, secured.http_url, "transfer") == 0
        status, groups = await _get(http, f"{secured.http_url}/api/groups")
        assert status == 200 and groups["groups"] == []  # type: ignore[index]

        # END_TX of another group's half message: refused, the transaction stays PREPARED
        async with TransactionProducer(secured.address, group="producer_bank1", listener=Unknown(), **BANK1) as tp:
            half = await tp.send_in_transaction("transfer", b"half")
        assert await _prepared(http, secured.http_url) == [half.msg_id]
        intruder = await raw_login(secured.address, "other", "pw-other", group="producer_other")
        op, payload = await raw_request(intruder, Op.END_TX, 5, {"msg_id": half.msg_id, "outcome": "COMMIT"})
        assert op == Op.ERROR and payload["code"] == AuthError.code, payload
        assert "belongs to producer group 'producer_bank1'" in payload["message"]
        op, payload = await raw_request(intruder, Op.END_TX, 6, {"items": [[half.msg_id, "ROLLBACK"]]})
        assert op == Op.REPLY and payload["r"][0][0] == AuthError.code
        await intruder.close()
        assert await _prepared(http, secured.http_url) == [half.msg_id]
        owner = await raw_login(secured.address, "bank1", "pw-bank1", group="producer_bank1")
        assert await raw_request(owner, Op.END_TX, 5, {"msg_id": half.msg_id, "outcome": "COMMIT"}) == (
            Op.REPLY, {"state": "COMMITTED"})
        await owner.close()


async def test_end_tx_of_another_group_refused_with_auth_off(broker):
    """A rule of the engine: it holds on a broker without users too."""
    a = await raw_login(broker.address, None, group="group_a")
    op, reply = await raw_request(a, Op.SEND, 3, {"topic": "t", "msgs": [[b"h", None, [], {}, 0]], "half": True})
    assert op == Op.REPLY, reply
    msg_id = reply["p"] + format(reply["r"][0][0], "016X")
    for group in ("group_b", None):
        b = await raw_login(broker.address, None, group=group)
        op, err = await raw_request(b, Op.END_TX, 3, {"msg_id": msg_id, "outcome": "COMMIT"})
        assert op == Op.ERROR and err["code"] == AuthError.code, err
        await b.close()
    async with aiohttp.ClientSession() as http:
        assert await _prepared(http, broker.http_url) == [msg_id]
    assert await raw_request(a, Op.END_TX, 4, {"msg_id": msg_id, "outcome": "ROLLBACK"}) == (
        Op.REPLY, {"state": "ROLLED_BACK"})
    await a.close()


async def test_admin_routes_need_their_rights(secured):
    base = secured.http_url
    async with TransactionProducer(secured.address, group="producer_bank1", listener=Unknown(), **BANK1) as tp:
        half = await tp.send_in_transaction("transfer", b"half")
        sent = await tp.send("transfer", b"to the dlq")
    got = asyncio.Event()

    def fail(m):
        got.set()
        return ConsumeResult.RECONSUME_LATER

    async with PushConsumer(secured.address, group="consumer_bank2", topic="transfer", listener=fail,
                            max_reconsume_times=0, **BANK2):
        await asyncio.wait_for(got.wait(), 10)
    reads = ["/", "/api/stats", "/api/topics", "/api/groups", "/api/transactions?state=prepared",
             f"/api/messages/{sent.msg_id}", "/api/messages?topic=transfer&key=k", "/api/users", "/api/tokens"]
    changes = [(f"/api/transactions/{half.msg_id}/commit", None), (f"/api/transactions/{half.msg_id}/rollback", None),
               (f"/api/dlq/consumer_bank2/messages/{sent.msg_id}/resend", None),
               ("/api/users", {"user": "eve", "password": "x"}), ("/api/users/bank2/grant", {"right": "admin", "topic": "*"}),
               ("/api/users/bank1/remove", None), ("/api/tokens", {"user": "ops"}),
               ("/api/topics/audit", {"queues": 2}), ("/api/topics/transfer", {})]
    async with aiohttp.ClientSession() as http:
        await wait_for(lambda: _dead(http, base, sent.msg_id), what="the dead letter")
        async with http.get(f"{base}/healthz") as r:  # open for probes, telling nothing of the machine
            assert r.status == 200 and set(await r.json()) == {"status", "broker_id"}
        assert (await http.get(f"{base}/api/topics", headers=basic("ops", "wrong"))).status == 401
        for path in reads:
            assert (await http.get(base + path)).status == 401, path
            assert (await http.get(base + path, headers=basic("bank1", "pw-bank1"))).status == 403, path
            status = (await http.get(base + path, headers=basic("reader", "pw-reader"))).status
            assert status == (403 if path in ("/api/users", "/api/tokens") else 200), path
        for path, body in changes:
            for headers in ({}, basic("reader", "pw-reader"), basic("bank1", "pw-bank1")):
                r = await http.post(base + path, json=body, headers={**headers, **CSRF})
                assert r.status in (401, 403), (path, headers, r.status)
            r = await http.post(base + path, data="x", headers=OPS)  # what a cross-site form can send
            assert r.status == 403 and "X-HalfMQ-Request" in (await r.json())["error"]
            r = await http.post(base + path, json=body, headers={**OPS, "Origin": "http://evil.example"})
            assert r.status == 403 and "cross-site" in (await r.json())["error"]
        # nothing changed
        assert await _prepared(http, base) == [half.msg_id]
        assert await _messages(http, base, "audit") == 0
        status, listed = await _get(http, f"{base}/api/topics")
        assert "audit" not in [t["topic"] for t in listed["topics"]]  # type: ignore[index]
        assert await _dead(http, base, sent.msg_id)
        status, users = await _get(http, f"{base}/api/users")
        assert [u["user"] for u in users["users"]] == ["bank1", "bank2", "ops", "other", "reader"]  # type: ignore[index]
        assert "admin *" not in str(users)[str(users).index("bank2"):][:80]
        # the admin may; a token acts as its user until revoked
        r = await http.post(f"{base}/api/transactions/{half.msg_id}/rollback", headers={**OPS, **CSRF})
        assert r.status == 200, await r.text()
        r = await http.post(f"{base}/api/topics/audit", json={"queues": 2}, headers=OPS)
        assert r.status == 201 and (await r.json())["created"], await r.text()
        r = await http.post(f"{base}/api/tokens", json={"user": "reader"}, headers={**OPS, **CSRF})
        token = (await r.json())
        bearer = {"Authorization": f"Bearer {token['token']}"}
        assert (await http.get(f"{base}/api/topics", headers=bearer)).status == 200
        assert (await http.post(f"{base}/api/dlq/consumer_bank2/messages/{sent.msg_id}/resend",
                                headers={**bearer, **CSRF})).status == 403
        r = await http.post(f"{base}/api/tokens/{token['id']}/revoke", headers={**OPS, **CSRF})
        assert r.status == 200
        assert (await http.get(f"{base}/api/topics", headers=bearer)).status == 401


async def _dead(http: aiohttp.ClientSession, base: str, msg_id: str) -> bool:
    status, body = await _get(http, f"{base}/api/messages/{msg_id}")
    return status == 200 and body["groups"].get("consumer_bank2", {}).get("state") == "dead_lettered"  # type: ignore[index,union-attr]


async def test_repeated_failures_are_throttled(secured):
    async def attempt(password: str) -> str:
        try:
            async with Producer(secured.address, send_timeout=2, user="bank1", password=password):
                return "in"
        except AuthError as exc:
            return str(exc)

    for _ in range(6):
        assert "wrong password" in await attempt("guess")
    assert "too many failed logins from 127.0.0.1" in await attempt("pw-bank1")  # even the right one waits
    await wait_for(lambda: _in(attempt), timeout=10, interval=0.5, what="the wait (2 s) to pass")
    log = secured.log_path.read_text()
    assert "6 failures from 127.0.0.1; next attempt in 2 s" in log
    assert "too many failed logins from 127.0.0.1" in log


async def _in(attempt) -> bool:
    return await attempt("pw-bank1") == "in"


def _run_broker(data_dir: Path, *args: str) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "broker", "--data-dir", str(data_dir), "--port", "0", "--http-port", "0", *args]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    proc.communicate(timeout=20)


def test_protected_mode(tmp_path):
    proc = _run_broker(tmp_path / "open", "--host", "0.0.0.0")
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 2 and out == ""
    assert "protected mode" in err and "halfmq user add" in err and "--allow-anonymous" in err
    proc = _run_broker(tmp_path / "open", "--host", "0.0.0.0", "--allow-anonymous")
    try:
        assert proc.stdout is not None and proc.stdout.readline().startswith("halfmq broker ready")
    finally:
        _stop(proc)
    add_users(tmp_path / "open", {"ops": ("pw", [("admin", "*", None)])})
    proc = _run_broker(tmp_path / "open", "--host", "0.0.0.0")
    try:
        assert proc.stdout is not None and proc.stdout.readline().startswith("halfmq broker ready")
    finally:
        _stop(proc)


def test_unreadable_certificate_is_a_clear_startup_error(tmp_path):
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate\n")
    proc = _run_broker(tmp_path / "d", "--tls-cert", str(bad))
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 2 and out == "" and "--tls-cert" in err and "cannot load" in err


async def test_tls_with_logins_on_both_ports(tmp_path, broker_factory):
    certs = Certs.make(tmp_path / "certs")
    data = tmp_path / "tls"
    add_users(data, USERS)
    b = broker_factory(*certs.broker_args(), data_dir=data)
    ctx = certs.client_context()
    got: list[bytes] = []
    async with Producer(b.address, tls=ctx, **BANK1) as p, \
            PushConsumer(b.address, group="consumer_bank2", topic="transfer", tls=ctx,
                         listener=lambda m: got.append(m.body) or ConsumeResult.SUCCESS, **BANK2):
        await p.send("transfer", b"over tls")
        await wait_for(lambda: got == [b"over tls"], what="the delivery over TLS")
    with pytest.raises(BrokerUnavailableError):  # plain TCP to the TLS port
        async with Producer(b.address, send_timeout=1, **BANK1):
            pass
    https = b.http_url.replace("http://", "https://")
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{https}/api/topics", headers=OPS, ssl=ctx) as r:
            assert r.status == 200 and "transfer" in await r.text()


async def test_tls_reads_share_one_buffer_without_mixing_connections(tmp_path, broker_factory):
    """Over TLS both ends decrypt into one buffer per thread (``protocol.tlsreads``): two
    producers and a consumer in this thread, messages from 1 byte to 1 MiB (frames split
    across TLS records and reads, many frames in one read), every body arrives intact."""
    certs = Certs.make(tmp_path / "certs")
    b = broker_factory(*certs.broker_args())
    ctx = certs.client_context()
    sizes = [1, 100, 1024, 16_000, 16_384, 70_000, 1 << 20] * 6
    bodies = [bytes([k % 251]) * n for k, n in enumerate(sizes)]
    got: dict[bytes, int] = {}

    def on(m):
        got[m.body] = got.get(m.body, 0) + 1
        return ConsumeResult.SUCCESS

    async with PushConsumer(b.address, group="g", topic="big", tls=ctx, listener=on), \
            Producer(b.address, tls=ctx) as p1, Producer(b.address, tls=ctx) as p2:
        await asyncio.gather(*((p1 if k % 2 else p2).send("big", body) for k, body in enumerate(bodies)))
        await wait_for(lambda: len(got) == len(bodies), what="every message over TLS")
    assert got == {body: 1 for body in bodies}


@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls"])
async def test_a_client_closing_its_side_is_closed_without_an_error(tmp_path, tls):
    """End of stream from a client (a half-close; under TLS its close_notify) is answered
    by closing the connection: nothing raised on the broker's event loop (an in-process
    broker on this test's checked loop), the client gone from the admin view."""
    from broker import Broker, BrokerConfig

    certs = Certs.make(tmp_path / "certs") if tls else None
    tls_args = {"tls_cert": str(certs.server_cert), "tls_key": str(certs.server_key)} if certs else {}
    ctx = certs.client_context() if certs else None
    async with Broker(BrokerConfig(data_dir=str(tmp_path / "d"), port=0, http_port=0, **tls_args)) as b:
        host, port = b.address.rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port), ssl=ctx)
        c = RawClient(reader, writer)
        c.send(Op.HELLO, 1, {"version": 1, "client_id": "closing", "role": "producer", "group": "pg"})
        assert (await c.next_frame())[0] == Op.REPLY

        async def clients() -> list:
            async with aiohttp.ClientSession() as http, http.get(f"{b.http_url}/api/clients", ssl=ctx or False) as r:
                return [x["client_id"] for x in (await r.json())["clients"]]

        assert await clients() == ["closing"]
        if tls:
            await c.close()  # close_notify, then the TCP close
        else:
            writer.write_eof()
            assert await c.next_frame() is None  # the broker closed its side too
            await c.close()

        async def gone() -> bool:
            return not await clients()

        await wait_for(gone, what="the client gone from the admin view")


async def test_mutual_tls_needs_a_client_certificate(tmp_path, broker_factory):
    certs = Certs.make(tmp_path / "certs")
    b = broker_factory(*certs.broker_args(mutual=True))
    with pytest.raises(BrokerUnavailableError):
        async with Producer(b.address, send_timeout=1, tls=certs.client_context()) as p:
            await p.send("t", b"no")
    async with Producer(b.address, tls=certs.client_context(with_cert=True)) as p:
        assert (await p.send("t", b"yes")).msg_id
    https = b.http_url.replace("http://", "https://")
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.ClientError):
            await http.get(f"{https}/api/topics", ssl=certs.client_context())
        async with http.get(f"{https}/api/topics", ssl=certs.client_context(with_cert=True)) as r:
            assert r.status == 200


def _cli(*args: str, stdin: str = "", env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "broker.cli", *args], cwd=ROOT, input=stdin, text=True,
                          capture_output=True, timeout=60, env={**os.environ, **(env or {})})


async def test_online_changes_apply_at_once_and_offline_refuses_a_locked_directory(secured):
    login = {"HALFMQ_PASSWORD": "pw-ops"}
    r = await asyncio.to_thread(_cli, "user", "add", "carol", "--password-stdin", "--data-dir", str(secured.data_dir),
                                stdin="pw-carol\n")
    assert r.returncode == 1 and "--http" in r.stderr and "locked" in r.stderr
    with pytest.raises(AuthError):
        async with Producer(secured.address, user="carol", password="pw-carol"):
            pass
    for args in (("add", "carol", "--password-stdin"), ("grant", "carol", "subscribe", "c-*", "--group", "carol")):
        r = await asyncio.to_thread(_cli, "user", *args, "--http", secured.http_url, "--user", "ops",
                                    stdin="pw-carol\n", env=login)
        assert r.returncode == 0, r.stderr
    got = asyncio.Event()
    async with PushConsumer(secured.address, group="carol", topic="c-1", user="carol", password="pw-carol",
                            listener=lambda m: got.set() or ConsumeResult.SUCCESS) as c:
        r = await asyncio.to_thread(_cli, "user", "revoke", "carol", "subscribe", "c-*", "--group", "carol",
                                    "--http", secured.http_url, "--user", "ops", env=login)
        assert r.returncode == 0, r.stderr
        await wait_for(lambda: "may no longer subscribe to 'c-1'" in secured.log_path.read_text(),
                       what="the consumer cut off")
        assert c._conn.generation >= 1
    r = await asyncio.to_thread(_cli, "user", "list", "--http", secured.http_url, "--user", "ops", env=login)
    assert r.returncode == 0 and '"user": "carol"' in r.stdout and "subscribe" not in r.stdout.split('"carol"')[1][:120]


async def test_pull_consumer_needs_the_subscribe_right(secured):
    from consumer_sdk import SimpleConsumer

    async with Producer(secured.address, **BANK1) as p:
        await p.send("transfer", b"pull me")
    async with SimpleConsumer(secured.address, group="g_other", topic="transfer", wait=0, **OTHER) as c:
        with pytest.raises(AuthError, match="may not subscribe to topic 'transfer'"):
            await c.receive()
    async with SimpleConsumer(secured.address, group="consumer_bank2", topic="transfer", wait=2, **BANK2) as c:
        [m] = await c.receive()
        intruder = await raw_login(secured.address, "other", "pw-other", role="consumer", group="g_other")
        op, err = await raw_request(intruder, Op.SETTLE, 3, {"group": "consumer_bank2", "s": [[m.receipt_handle, "ack", 0]]})
        assert op == Op.ERROR and err["code"] == AuthError.code, err
        await intruder.close()
        await c.ack(m)  # the owner still holds the lease


async def test_webhook_command_logs_in_from_the_environment(secured):
    r = await asyncio.to_thread(_cli, "webhook", "list", "--http", secured.http_url)
    assert r.returncode == 1 and "401" in r.stderr + r.stdout
    r = await asyncio.to_thread(_cli, "webhook", "list", "--http", secured.http_url,
                                env={"HALFMQ_USER": "ops", "HALFMQ_PASSWORD": "pw-ops"})
    assert r.returncode == 0, r.stderr


async def test_recall_needs_a_publish_right(secured):
    c = await raw_login(secured.address, "bank2", "pw-bank2", role="consumer", group="consumer_bank2")
    op, err = await raw_request(c, Op.RECALL, 3, {"msg_id": "0" * 24})
    assert op == Op.ERROR and err["code"] == AuthError.code and "recall" in err["message"], err
    await c.close()
    p = await raw_login(secured.address, "bank1", "pw-bank1")
    op, err = await raw_request(p, Op.RECALL, 3, {"msg_id": "0" * 24})
    assert op == Op.ERROR and err["code"] != AuthError.code, err  # past the rights check: no such message
    await p.close()



async def test_recall_needs_publish_on_the_messages_own_topic(secured):
    """``other`` may publish to its own topic but not to ``transfer``: it cannot recall a
    message scheduled on ``transfer``, which stays scheduled."""
    async with Producer(secured.address, **BANK1) as p:
        msg_id = (await p.send("transfer", b"later", delay=3600)).msg_id
    async with Producer(secured.address, **OTHER) as o:
        with pytest.raises(AuthError, match="transfer"):
            await o.recall(msg_id)
    async with Producer(secured.address, **BANK1) as p:
        await p.recall(msg_id)  # its own topic: allowed
