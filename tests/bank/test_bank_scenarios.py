"""The bank transfer end to end (SQLite and MySQL): bank1 -> broker -> bank2 over HTTP.

After every scenario: the money adds up to the starting 100.00 and every tx_no credited in
bank2 was debited in bank1.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import uuid
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace

import aiohttp
import pytest

from examples.bank.bank1 import SEED as SEED1
from examples.bank.bank2 import CONSUMER_GROUP
from examples.bank.db import BankDatabase
from examples.bank.demo import check_invariants, wait_dead_lettered
from producer_sdk import Producer
from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parents[2]
D = Decimal


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


async def _transfer(http, bank1_url, from_id, to_id, money, **extra):
    async with http.post(f"{bank1_url}/v1/bank1/transfer",
                         json={"fromId": from_id, "toId": to_id, "money": money, **extra}) as r:
        return r.status, await r.json()


async def _balance(http, url, bank, account_id):
    async with http.get(f"{url}/v1/{bank}/accounts/{account_id}") as r:
        if r.status == 404:
            return None
        assert r.status == 200
        return D((await r.json())["balance"])


async def _wait_balance(http, bank, account_id, expected, timeout=10.0):
    async def ok():
        return await _balance(http, bank.url, "bank2", account_id) == expected

    await wait_for(ok, timeout=timeout, what=f"bank2 account {account_id} at {expected}")


async def _assert_credited_once(bank2, tx_no):
    """bank2's listener records a credit after its database transaction commits (and the
    connection goes back to the pool), so the balance can show it a moment earlier."""
    await wait_for(lambda: bank2.credited(tx_no) >= 1, what=f"bank2 recording the credit of {tx_no}")
    assert bank2.credited(tx_no) == 1


async def _assert_invariants(bank1, bank2):
    assert await check_invariants(bank1, bank2) == []


async def _msg_id(http, broker, reply) -> str:
    """The broker's id of a transfer's message: in the reply (transaction mode), or found by
    its key once the outbox relay has sent it (outbox mode)."""
    if reply.get("msgId"):
        return reply["msgId"]

    async def found():
        url = f"{broker.http_url}/api/messages?topic=bank_transfer&key={reply['txNo']}"
        async with http.get(url) as r:
            messages = (await r.json())["messages"]
        return messages[0]["msg_id"] if messages else None

    return await wait_for(found, what=f"the message of {reply['txNo']} on the broker")


async def test_1_transfer_commits(banks, http):
    bank1, bank2 = banks
    status, reply = await _transfer(http, bank1.url, 1, 2, "20")
    assert status == 200, reply
    assert reply["state"] == "COMMIT" and (reply.get("msgId") or reply.get("outboxId"))
    await _wait_balance(http, bank2, 2, D("20.00"))
    assert await _balance(http, bank1.url, "bank1", 1) == D("80.00")
    await _assert_credited_once(bank2, reply["txNo"])
    await _assert_invariants(bank1, bank2)


async def test_2_insufficient_balance_rolls_back(banks, http, broker):
    bank1, bank2 = banks
    status, reply = await _transfer(http, bank1.url, 1, 2, "100")
    assert status == 200
    await _wait_balance(http, bank2, 2, D("100.00"))
    status, reply = await _transfer(http, bank1.url, 1, 2, "100")
    assert 400 <= status < 500, reply
    assert reply["state"] == "ROLLBACK"
    assert "insufficient balance" in reply["error"] and "0.00" in reply["error"]
    # the broker recorded the rollback (transaction mode) / no outbox row is left (outbox
    # mode); a later transfer passing through proves the refused one was not delivered
    # before it either
    if bank1.mode == "transaction":
        async with http.get(f"{broker.http_url}/api/messages/{reply['msgId']}") as r:
            info = await r.json()
        assert info["transaction"]["state"] == "ROLLED_BACK"
    else:
        status_of = await bank1.outbox.status()
        assert status_of.pending + status_of.failed == 0 and status_of.sent == 1
    async with http.post(f"{bank2.url}/v1/bank2/accounts", json={"id": 7, "account": "x"}) as r:
        assert r.status == 201
    await bank1.db.create_account(9, "payer", D("1.00"))
    status, later = await _transfer(http, bank1.url, 9, 7, "1")
    assert status == 200
    await _wait_balance(http, bank2, 7, D("1.00"))
    assert reply["txNo"] not in {d.tx_no for d in bank2.deliveries}
    assert await _balance(http, bank1.url, "bank1", 1) == D("0.00")
    assert await _balance(http, bank2.url, "bank2", 2) == D("100.00")
    assert await check_invariants(bank1, bank2, D("101.00")) == []


async def test_3_missing_account_goes_to_dlq_and_is_resent(banks, http, broker):
    bank1, bank2 = banks
    status, reply = await _transfer(http, bank1.url, 1, 3, "5")
    assert status == 200 and reply["state"] == "COMMIT"
    msg_id = await _msg_id(http, broker, reply)
    await wait_dead_lettered(http, broker.http_url, msg_id, timeout=20)
    attempts = [d for d in bank2.deliveries if d.msg_id == msg_id]
    assert [d.reconsume_times for d in attempts] == [0, 1, 2]  # max_reconsume_times=2
    assert all(d.outcome.startswith("retry") for d in attempts)
    assert await _balance(http, bank1.url, "bank1", 1) == D("95.00")
    assert await check_invariants(bank1, bank2, D("95.00")) == []  # 5.00 waits in the DLQ
    async with http.post(f"{bank2.url}/v1/bank2/accounts", json={"id": 3, "account": "wangwu"}) as r:
        assert r.status == 201
    url = f"{broker.http_url}/api/dlq/{CONSUMER_GROUP}/messages/{msg_id}/resend"
    async with http.post(url, headers={"X-HalfMQ-Request": "test"}) as r:
        assert r.status == 200, await r.text()
    await _wait_balance(http, bank2, 3, D("5.00"))
    await _assert_credited_once(bank2, reply["txNo"])
    await _assert_invariants(bank1, bank2)


async def test_4_lost_outcome_is_settled_by_check_back(banks, http, broker):
    bank1, bank2 = banks
    if bank1.mode == "outbox":
        await _relay_down_then_back(bank1, bank2, http)
        return
    bank1.fault = "unknown-outcome"
    status, reply = await _transfer(http, bank1.url, 1, 2, "20")
    bank1.fault = None
    assert status == 202 and reply["state"] == "UNKNOWN", reply
    assert await _balance(http, bank1.url, "bank1", 1) == D("80.00")  # committed locally
    await _wait_balance(http, bank2, 2, D("20.00"))
    async with http.get(f"{broker.http_url}/api/messages/{reply['msgId']}") as r:
        info = await r.json()
    assert info["transaction"]["state"] == "COMMITTED" and info["transaction"]["checks"] >= 1
    await _assert_credited_once(bank2, reply["txNo"])
    await _assert_invariants(bank1, bank2)


async def _relay_down_then_back(bank1, bank2, http):
    """Outbox mode's lost outcome: the relay is down when bank1 commits. The debit and the
    outbox row are committed; nothing moves until the relay is back, then it ships."""
    await bank1.stop_relay()
    status, reply = await _transfer(http, bank1.url, 1, 2, "20")
    assert status == 200 and reply["state"] == "COMMIT", reply
    assert await _balance(http, bank1.url, "bank1", 1) == D("80.00")  # committed locally
    assert (await bank1.outbox.status()).pending == 1  # the message waits in the table
    bank1.start_relay()
    await _wait_balance(http, bank2, 2, D("20.00"))
    await _assert_credited_once(bank2, reply["txNo"])
    await _assert_invariants(bank1, bank2)


def _start_bank1(tmp_path: Path, broker_address: str, db: str, *extra: str) -> tuple[subprocess.Popen, str]:
    log = open(tmp_path / "bank1.log", "a")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(
        [sys.executable, "-m", "examples.bank.bank1", "--broker", broker_address, "--port", "0",
         "--db", db, *extra],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True)
    log.close()
    line = proc.stdout.readline()
    if not line.startswith("bank1 ready"):
        proc.kill()
        proc.wait(10)
        proc.stdout.close()
        raise AssertionError(f"bank1 did not start: {line!r}; see {tmp_path / 'bank1.log'}")
    url = dict(p.split("=", 1) for p in line.split()[2:])["http"]
    return proc, url


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    if proc.stdout:
        proc.stdout.close()


async def test_4_bank1_killed_after_local_commit(broker, bank_dbs, bank_mode, http, tmp_path):
    from examples.bank.bank2 import Bank2Service

    db1, db2 = bank_dbs
    mode = ("--mode", bank_mode)
    async with Bank2Service(db2, broker.address, port=0, max_reconsume_times=2) as bank2:
        proc, url = await asyncio.to_thread(_start_bank1, tmp_path, broker.address, db1, *mode,
                                            "--fault", "kill-after-commit")
        try:
            tx_no = uuid.uuid4().hex
            with pytest.raises(aiohttp.ClientError):
                await _transfer(http, url, 1, 2, "20", txNo=tx_no)
            assert await asyncio.to_thread(proc.wait, 10) == -signal.SIGKILL
        finally:
            _stop(proc)
        async with BankDatabase(db1, seed=SEED1) as bank1_db:
            assert (await bank1_db.get_account(1)).balance == D("80.00")  # committed, then killed
            assert tx_no in await bank1_db.tx_numbers()
            proc, url = await asyncio.to_thread(_start_bank1, tmp_path, broker.address, db1,
                                                *mode)
            try:
                await _wait_balance(http, bank2, 2, D("20.00"), timeout=15)
                await _assert_credited_once(bank2, tx_no)
                assert await _balance(http, url, "bank1", 1) == D("80.00")
            finally:
                await asyncio.to_thread(_stop, proc)
            await _assert_invariants(SimpleNamespace(db=bank1_db), bank2)


async def test_5_redelivered_message_is_credited_once(banks, http, broker):
    bank1, bank2 = banks
    bank2.lose_ack_once = True
    status, reply = await _transfer(http, bank1.url, 1, 2, "20")
    assert status == 200

    def redelivered():
        return [d.outcome for d in bank2.deliveries if d.tx_no == reply["txNo"]] == \
            ["credited", "duplicate"]

    await wait_for(redelivered, timeout=10, what="the redelivery to be recognised")
    assert [d.msg_id for d in bank2.deliveries] == [await _msg_id(http, broker, reply)] * 2
    assert await _balance(http, bank2.url, "bank2", 2) == D("20.00")
    await _assert_invariants(bank1, bank2)


async def test_5_duplicate_message_with_the_same_tx_no_is_credited_once(banks, http, broker):
    bank1, bank2 = banks
    status, reply = await _transfer(http, bank1.url, 1, 2, "20")
    assert status == 200
    await _wait_balance(http, bank2, 2, D("20.00"))
    # the same transfer sent again as a separate message (e.g. a producer's blind retry)
    body = json.dumps({"txNo": reply["txNo"], "fromId": 1, "toId": 2, "money": "20.00"})
    async with Producer(broker.address, group="producer_replay") as p:
        dup = await p.send(bank1.topic, body, tags="transfer", keys=[reply["txNo"]])

    def seen():
        return any(d.msg_id == dup.msg_id and d.outcome == "duplicate" for d in bank2.deliveries)

    await wait_for(seen, timeout=10, what="the duplicate message")
    await _assert_credited_once(bank2, reply["txNo"])
    assert await _balance(http, bank2.url, "bank2", 2) == D("20.00")
    await _assert_invariants(bank1, bank2)


async def test_bad_requests_are_refused_with_reasons(banks, http):
    bank1, bank2 = banks
    for payload, status in [
        ({"fromId": 1, "toId": 2, "money": 20.5}, 400),      # float money
        ({"fromId": 1, "toId": 2, "money": "-1"}, 400),
        ({"fromId": 1, "toId": 2, "money": "0.001"}, 400),
        ({"fromId": 1, "toId": 1, "money": "1"}, 400),
        ({"fromId": 1, "money": "1"}, 400),
        ({"fromId": 42, "toId": 2, "money": "1"}, 404),      # no such source account
    ]:
        async with http.post(f"{bank1.url}/v1/bank1/transfer", json=payload) as r:
            assert r.status == status, (payload, await r.text())
            assert (await r.json())["error"]
    status, reply = await _transfer(http, bank1.url, 1, 2, "1", txNo="fixed-1")
    assert status == 200
    status, again = await _transfer(http, bank1.url, 1, 2, "1", txNo="fixed-1")
    assert status == 409 and "already" in again["error"]
    await _wait_balance(http, bank2, 2, D("1.00"))
    assert await _balance(http, bank1.url, "bank1", 1) == D("99.00")
    assert await _balance(http, bank1.url, "bank1", 77) is None
    await _assert_invariants(bank1, bank2)
