"""Soak: 1,000 random transfers from 16 concurrent HTTP clients through bank1 -> halfmq -> bank2,
with random listener outcomes, one ``kill -9`` of the broker and one of bank2 in the middle —
in both of bank1's modes: transactional messages, and the outbox (then the relay runs as
``halfmq outbox-relay`` and is ``kill -9``ed too).

- The broker is a real subprocess with short settings; bank1 runs in this process with a
  listener whose outcome per transfer is drawn (seeded) from COMMIT / ROLLBACK / UNKNOWN /
  raise before or after the local commit; bank2 is a subprocess.
- After ~300 answered transfers the broker is ``kill -9``ed and restarted at once on the
  same data directory and ports; after ~600, bank2 is ``kill -9``ed and restarted; in
  outbox mode the relay is ``kill -9``ed and restarted after ~450.
- Outbox mode: the same outcomes, drawn the same way, in bank1's local transaction (see
  ``SoakOutboxTransfer``); UNKNOWN and RAISE_AFTER commit and then fail the request.
- Clients treat errors and 5xx as "outcome unknown": the invariants are checked against
  the databases, at quiescence (no PREPARED transaction / no pending outbox row, the
  group's lag, in-flight and retries at 0, bank2's credited set equal to bank1's debited
  set).

Checked then: the money adds up; every account's balance is its start balance moved by
exactly the transfers in the banks' ``tx_duplication`` tables (so nothing is credited twice
or lost); every credited tx_no was debited and every debited one credited; transfers whose
local transaction rolled back are in neither; nothing PREPARED or abandoned; the broker
committed only debited transfers and rolled back none of them; every client reply agrees
with the databases. Outbox mode instead of the broker's transactions: no outbox row
pending or FAILED, and exactly one row per debited transfer.

Each runs twice: on an open broker, and with auth on (bank1 may publish the topic as its
producer group, bank2 may consume it as its consumer group — bank2 reads its login from
``HALFMQ_USER``/``HALFMQ_PASSWORD``, as the outbox relay does as bank1 — and the test reads
the admin API as a read-only user).

Against a cluster (``test_soak_against_a_cluster_...``, both modes, SQLite, open): two
gateways over a private 3-node engine, the clients given both addresses; the broker kill
becomes a ``kill -9`` of the node leading the topic's stream (restarted at once), and
gateway A (the one the clients use) is ``kill -9``ed and restarted after ~500 transfers.
The same checks, with the dead letters counted in the engine's dead-letter stream.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from examples.bank.bank1 import Bank1Service
from examples.bank.bank2 import CONSUMER_GROUP
from examples.bank.db import BankDatabase
from tests.bank.soak_support import (
    NEVER_DEBITED,
    OUTCOMES,
    Bank2Process,
    OutboxRelayProcess,
    QuietInjectedFaults,
    SoakListener,
    SoakOutboxTransfer,
    ledger_problems,
    make_plan,
)
from tests.conftest import wait_for
from tests.security.helpers import add_users

D = Decimal
SEED = 20240611
TRANSFERS = 1000
CLIENTS = 16
KILL_BROKER_AT = 300
KILL_BANK2_AT = 600
KILL_RELAY_AT = 450  # outbox mode
KILL_GATEWAY_AT = 500  # cluster mode (the node at KILL_BROKER_AT)
QUIESCENCE_TIMEOUT = 90.0

#: bank1: five well-funded accounts and two that run dry early (insufficient balance).
START1 = {1: D("5000.00"), 101: D("5000.00"), 102: D("5000.00"), 103: D("5000.00"),
          104: D("5000.00"), 105: D("60.00"), 106: D("60.00")}
#: bank2: the destination accounts.
START2 = {2: D("0.00"), 201: D("100.00"), 202: D("0.00"), 203: D("0.00"), 204: D("0.00")}
MAX_CENTS = 5000  # transfers of 0.01 .. 50.00

BROKER_ARGS = ("--tx-timeout", "1s", "--tx-check-interval", "200ms",
               "--retry-delays", "100ms,200ms,400ms", "--ack-timeout", "2s")


async def _get_json(http: aiohttp.ClientSession, url: str) -> dict:
    async with http.get(url) as r:
        assert r.status == 200, f"GET {url}: {r.status} {await r.text()}"
        return await r.json()


async def _trace(http: aiohttp.ClientSession, admin: str, db1: BankDatabase,
                 listener: SoakListener, tx_nos: list[str]) -> dict:
    """What the broker and bank1 know of these transfers (for a failure message)."""
    out: dict[str, object] = {}
    txs: dict[str, list[dict]] = {}
    for state in ("prepared", "committed", "rolled_back", "abandoned"):
        for tx in (await _get_json(http, f"{admin}/api/transactions?state={state}"))["transactions"]:
            for key in tx["keys"]:
                txs.setdefault(key, []).append(tx)
    async with db1.connection() as conn:
        rows = await db1._exec(conn, "SELECT msg_id, state FROM halfmq_tx_log")
    tx_log = dict(rows)
    for tx_no in tx_nos:
        found = await _get_json(http, f"{admin}/api/messages?topic=bank_transfer&key={tx_no}")
        out[tx_no] = {
            "broker": [{k: tx[k] for k in ("msg_id", "state", "checks")}
                       for tx in txs.get(tx_no, [])],
            "bank1 tx log": {tx["msg_id"]: tx_log.get(tx["msg_id"]) for tx in txs.get(tx_no, [])},
            "check-backs answered by bank1": {tx["msg_id"]: listener.checks_per_message.get(
                tx["msg_id"], 0) for tx in txs.get(tx_no, [])},
            "delivered messages": [m["msg_id"] for m in found["messages"]],
        }
    return out


async def _transaction_problems(http: aiohttp.ClientSession, admin: str,
                                db1: BankDatabase) -> list[str]:
    """Transaction mode: nothing abandoned, and per half message (a half SEND retried across
    the broker kill leaves an orphan half message with the same key, which check-back
    rightly rolls back) the broker committed exactly what bank1's tx log says committed."""
    problems = []
    txs = {state: (await _get_json(http, f"{admin}/api/transactions?state={state}"))
           ["transactions"] for state in ("abandoned", "committed", "rolled_back")}
    if txs["abandoned"]:
        problems.append(f"{len(txs['abandoned'])} abandoned transactions: {txs['abandoned'][:3]}")
    async with db1.connection() as conn:
        tx_log = dict(await db1._exec(conn, "SELECT msg_id, state FROM halfmq_tx_log"))
    if bad := sorted(tx["msg_id"] for tx in txs["committed"]
                     if tx_log.get(tx["msg_id"]) != "COMMITTED"):
        problems.append(f"committed by the broker, not committed in bank1: {bad[:10]}")
    if bad := sorted(tx["msg_id"] for tx in txs["rolled_back"]
                     if tx_log.get(tx["msg_id"]) == "COMMITTED"):
        problems.append(f"committed in bank1, rolled back by the broker: {bad[:10]}")
    return problems


async def _outbox_problems(bank1: Bank1Service, debited: set[str]) -> list[str]:
    """Outbox mode: nothing pending or FAILED, exactly one SENT row per debited transfer."""
    assert bank1.outbox is not None
    problems = []
    status = await bank1.outbox.status()
    if status.pending or status.failed or status.discarded:
        problems.append(f"outbox not drained: {status.describe()}; failed rows: "
                        f"{(await bank1.outbox.failed())[:3]}")
    keys = Counter(k for row in await _outbox_rows(bank1.db) for k in row[2])
    if twice := sorted(k for k, n in keys.items() if n > 1):
        problems.append(f"transfers with more than one outbox row: {twice[:10]}")
    if set(keys) != debited:
        problems.append(f"outbox rows {len(keys)} != debited transfers {len(debited)}: "
                        f"{sorted(set(keys) ^ debited)[:10]}")
    return problems


async def _outbox_rows(db1: BankDatabase, tx_nos: list[str] | None = None) -> list[tuple]:
    """``(id, status, keys, attempts, last_error)`` of bank1's outbox rows (of ``tx_nos``)."""
    async with db1.connection() as conn:
        rows = await db1._exec(conn, "SELECT id, status, msg_keys, attempts, last_error "
                                     "FROM halfmq_outbox ORDER BY id")
    out = [(r[0], r[1], tuple(json.loads(r[2])), r[3], r[4]) for r in rows]
    return out if tx_nos is None else [r for r in out if set(r[2]) & set(tx_nos)]


async def _seed(url: str, accounts: dict[int, Decimal]) -> BankDatabase:
    db = BankDatabase(url, seed=[(i, f"soak{i}", str(b)) for i, b in accounts.items()])
    return await db.open()


#: With auth on: users and rights of the soak.
SOAK_USERS = {"bank1": ("pw-bank1", [("publish", "bank_transfer", "producer_bank1"),
                                     ("publish", "bank_transfer", "outbox_relay")]),  # the relay's group
              "bank2": ("pw-bank2", [("subscribe", "bank_transfer", CONSUMER_GROUP)]),
              "watcher": ("pw-watcher", [("read", "*", None)])}


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("auth", [False, True], ids=["open", "auth"])
async def test_soak_1000_transfers_with_outcome_faults_and_kill9(broker_factory, bank_dbs,
                                                                 bank_mode, tmp_path, auth):
    data_dir = tmp_path / "broker"
    if auth:
        add_users(data_dir, SOAK_USERS)
    broker = broker_factory(*BROKER_ARGS, data_dir=data_dir)

    async def kill_broker() -> None:
        await asyncio.to_thread(broker.kill9)
        await asyncio.to_thread(broker.start)

    await _soak(broker, bank_dbs, bank_mode, tmp_path, auth, [(KILL_BROKER_AT, "broker", kill_broker)])


#: A fault of the soak: after this many answered transfers, kill -9 (and restart) what it names.
Fault = tuple[int, str, Callable[[], Awaitable[None]]]


async def _soak(broker: Any, bank_dbs: tuple[str, str], bank_mode: str, tmp_path: Path, auth: bool,
                faults: list[Fault], producer_options: dict[str, Any] | None = None,
                dead_letters: Callable[[], Awaitable[int]] | None = None) -> None:
    """The soak (module docstring) through ``broker`` (``address``, ``http_url``,
    ``log_path``), with ``faults`` besides the kills of bank2 and (outbox mode) the relay;
    ``producer_options`` go to bank1's producer; ``dead_letters()`` counts the consumer
    group's dead letters where the group view has no count (cluster mode)."""
    t0 = time.monotonic()
    db1_url, db2_url = bank_dbs
    bank1_login = {**({"user": "bank1", "password": "pw-bank1"} if auth else {}), **(producer_options or {})}
    bank2_env = {"HALFMQ_USER": "bank2", "HALFMQ_PASSWORD": "pw-bank2"} if auth else None
    admin_headers = ({"Authorization": "Basic " + base64.b64encode(b"watcher:pw-watcher").decode()}
                     if auth else None)
    plan = make_plan(SEED, TRANSFERS, list(START1), list(START2), MAX_CENTS)
    outcome_of = {t.tx_no: t.outcome for t in plan}

    await (await _seed(db1_url, START1)).close()  # before bank1 seeds its own account 1
    db2 = await _seed(db2_url, START2)            # kept open: the test reads bank2's database
    outbox_mode = bank_mode == "outbox"
    bank1 = Bank1Service(db1_url, broker.address, port=0, mode=bank_mode, relay=False,
                         broker_options=bank1_login)
    bank2 = Bank2Process(broker.address, db2_url, tmp_path / "bank2.log", env=bank2_env)
    relay_env = {"HALFMQ_USER": "bank1", "HALFMQ_PASSWORD": "pw-bank1"} if auth else None
    relay = OutboxRelayProcess(broker.address, db1_url, tmp_path / "relay.log", env=relay_env)
    results: dict[str, tuple[int | None, object]] = {}
    events: list[str] = []
    quiet_faults = QuietInjectedFaults().__enter__()
    try:
        await bank1.start()
        listener: SoakListener | SoakOutboxTransfer
        if outbox_mode:
            listener = bank1.outbox_transfer = SoakOutboxTransfer(bank1, plan)
            await asyncio.to_thread(relay.start)
        else:
            listener = SoakListener(bank1, plan)
            assert bank1.producer is not None
            bank1.producer.listener = listener  # before the first transfer
        await asyncio.to_thread(bank2.start)

        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(timeout=timeout, headers=admin_headers,
                                         connector=aiohttp.TCPConnector(limit=CLIENTS)) as http:
            pending = iter(plan)
            answered = 0

            async def kill_relay() -> None:
                await asyncio.to_thread(relay.kill9)
                await asyncio.to_thread(relay.start)

            async def kill_bank2() -> None:
                await asyncio.to_thread(bank2.kill9)
                await asyncio.to_thread(bank2.start)

            steps = sorted([*faults, (KILL_BANK2_AT, "bank2", kill_bank2)]
                           + ([(KILL_RELAY_AT, "relay", kill_relay)] if outbox_mode else []),
                           key=lambda f: f[0])
            reached = {at: asyncio.Event() for at, _what, _act in steps}

            async def client() -> None:
                nonlocal answered
                for t in pending:  # one shared iterator: each transfer is sent once
                    try:
                        async with http.post(f"{bank1.url}/v1/bank1/transfer",
                                             json=t.request_json()) as r:
                            results[t.tx_no] = (r.status, await r.json(content_type=None))
                    except (aiohttp.ClientError, TimeoutError) as exc:
                        results[t.tx_no] = (None, repr(exc))  # outcome unknown to the client
                    answered += 1
                    if answered in reached:
                        reached[answered].set()

            async def chaos() -> None:
                for at, what, act in steps:
                    await reached[at].wait()
                    events.append(f"{time.monotonic() - t0:.1f}s kill -9 {what} at {answered}")
                    await act()
                    events.append(f"{time.monotonic() - t0:.1f}s {what} restarted at {answered}")

            await asyncio.gather(chaos(), *(client() for _ in range(CLIENTS)))
            events.append(f"{time.monotonic() - t0:.1f}s all {len(results)} transfers answered")

            # -- quiescence ------------------------------------------------------------------
            # Settled: no PREPARED transaction and the group idle (no lag, nothing in flight
            # or waiting for a retry). All clients are done, so nothing can move after that;
            # bank2 acks only after its local commit, so its database is final too.
            snapshot: dict[str, object] = {}

            async def settled() -> bool:
                if outbox_mode:
                    assert bank1.outbox is not None
                    outbox_status = await bank1.outbox.status()
                    snapshot.update(outbox=outbox_status)
                    unsettled = outbox_status.pending
                else:
                    prepared = (await _get_json(
                        http, f"{broker.http_url}/api/transactions?state=prepared"))["transactions"]
                    snapshot.update(n_prepared=len(prepared), prepared=prepared[:3])
                    unsettled = len(prepared)
                groups = (await _get_json(http, f"{broker.http_url}/api/groups"))["groups"]
                group = next((g for g in groups if g["group"] == CONSUMER_GROUP), None)
                snapshot.update(group=group)
                return (not unsettled and group is not None and group["lag"] == 0
                        and group["in_flight"] == 0 and group.get("waiting_retry", 0) == 0)

            async def same_sets() -> bool:
                debited, credited = await bank1.db.tx_numbers(), await db2.tx_numbers()
                snapshot.update(n_debited_not_credited=len(debited - credited),
                                debited_not_credited=sorted(debited - credited)[:10],
                                credited_not_debited=sorted(credited - debited)[:10])
                return debited == credited

            async def diagnose(exc: AssertionError) -> AssertionError:
                missing = snapshot.get("debited_not_credited", [])[:3]  # type: ignore[index]
                if isinstance(listener, SoakOutboxTransfer):
                    lost: object = await _outbox_rows(bank1.db, missing)
                    return AssertionError(f"{exc}; last state: {snapshot}; events: {events}; "
                                          f"outbox rows of lost transfers: {lost}; logs: "
                                          f"{broker.log_path}, {bank2.log_path}, {relay.log_path}")
                lost = await _trace(http, broker.http_url, bank1.db, listener, missing)
                return AssertionError(
                    f"{exc}; last state: {snapshot}; events: {events}; check-backs answered "
                    f"by bank1: {listener.checks}, slowest {listener.slowest_check:.2f}s, at "
                    f"most {max(listener.checks_per_message.values(), default=0)} for one "
                    f"message; lost transfers as the broker and bank1 see them: {lost}; "
                    f"logs: {broker.log_path}, {bank2.log_path}")

            try:
                await wait_for(settled, timeout=QUIESCENCE_TIMEOUT, interval=0.2,
                               what="no PREPARED transaction / pending outbox row and "
                                    "consumer_bank2 idle")
                await wait_for(same_sets, timeout=5, interval=0.2,
                               what="bank2's credited tx_nos to equal bank1's debited ones")
            except AssertionError as exc:
                raise await diagnose(exc) from None
            events.append(f"{time.monotonic() - t0:.1f}s quiescent")

            group = snapshot["group"]
            dead_lettered = (int(group["dead_lettered"]) if dead_letters is None  # type: ignore[index]
                             else await dead_letters())
            if not outbox_mode:
                shipping_problems = await _transaction_problems(http, broker.http_url, bank1.db)

        # -- the databases ---------------------------------------------------------------
        debited, credited = await bank1.db.tx_numbers(), await db2.tx_numbers()
        balances1 = {a.id: a.balance for a in await bank1.db.accounts()}
        balances2 = {a.id: a.balance for a in await db2.accounts()}
        problems = ledger_problems(plan, START1, START2, debited, credited, balances1, balances2)

        # -- the broker's view (or the outbox's) agrees ----------------------------------------
        if dead_lettered:
            problems.append(f"{dead_lettered} transfers dead-lettered: {group}")
        if outbox_mode:
            shipping_problems = await _outbox_problems(bank1, debited)
        problems += shipping_problems

        # -- every client reply agrees with the databases -------------------------------------
        statuses = Counter(status for status, _ in results.values())
        for tx_no, (status, reply) in sorted(results.items()):
            state = reply.get("state") if isinstance(reply, dict) else None
            outcome = outcome_of[tx_no]
            if status == 200 and (state != "COMMIT" or tx_no not in debited):
                problems.append(f"{tx_no} ({outcome}): 200 {reply} but debited={tx_no in debited}")
            elif status == 409 and (state != "ROLLBACK" or tx_no in debited):
                problems.append(f"{tx_no} ({outcome}): 409 {reply} but debited={tx_no in debited}")
            elif status == 202 and state != "UNKNOWN":
                problems.append(f"{tx_no} ({outcome}): 202 {reply}")
            elif status not in (200, 202, 409, 500, 503, None):
                problems.append(f"{tx_no} ({outcome}): unexpected reply {status} {reply}")
            if outcome in ("UNKNOWN", "RAISE_AFTER", "RAISE_BEFORE") and status == 200:
                problems.append(f"{tx_no} ({outcome}): reported COMMIT to the client")
            if outcome in NEVER_DEBITED and status == 200:
                problems.append(f"{tx_no} ({outcome}): 200 although rolled back")

        # -- bank2 credited each transfer at most once (its log survives the kill -9) ----------
        credit_lines = Counter(re.findall(r"transfer (\S+): credited",
                                          bank2.log_path.read_text()))
        if twice := sorted(tx for tx, n in credit_lines.items() if n > 1):
            problems.append(f"bank2 credited these transfers more than once: {twice[:10]}")

        checks = ("" if isinstance(listener, SoakOutboxTransfer) else
                  f"check-backs answered: {listener.checks} (slowest "
                  f"{listener.slowest_check:.2f}s); ")
        summary = (f"mode {bank_mode}; events: {events}; client statuses: {dict(statuses)}; "
                   f"outcomes: {listener.executed}; {checks}debited: {len(debited)}; logs: "
                   f"{broker.log_path}, {bank2.log_path}"
                   + (f", {relay.log_path}" if outbox_mode else ""))
        assert problems == [], summary

        # -- the soak really exercised what it claims ------------------------------------------
        assert len(results) == TRANSFERS, summary
        assert set(listener.executed) == set(OUTCOMES), summary
        refused = sum(1 for s, r in results.values()
                      if s == 409 and "insufficient balance" in str(r))
        assert refused > 0, summary
        assert len(debited) > TRANSFERS // 3, summary
        assert bank2.kills == 1 and relay.kills == int(outbox_mode), summary
        assert len(events) >= 2 * len(steps) + 2, summary
        print(summary)
    finally:
        quiet_faults.__exit__()
        await asyncio.to_thread(relay.stop)
        await asyncio.to_thread(bank2.stop)
        await bank1.close()
        await db2.close()


@pytest.fixture
def soak_cluster(nats_server_binary: Path, tmp_path: Path) -> Iterator[tuple[Any, Any]]:
    """A private 3-node engine and two gateways with the soak's settings (cluster mode)."""
    from broker.engines.jetstream.local_cluster import LocalCluster
    from tests.engines import ClusterBroker

    cluster = LocalCluster(tmp_path / "engine", nodes=3, binary=nats_server_binary).start()
    gateways = None
    try:
        gateways = ClusterBroker(cluster, tmp_path / "gateways", list(BROKER_ARGS), {}).start()
        yield cluster, gateways
    finally:
        if gateways is not None:
            gateways.stop()
        cluster.stop()


@pytest.mark.slow
@pytest.mark.cluster
@pytest.mark.timeout(300)
async def test_soak_against_a_cluster_with_kill9_of_a_node_and_of_a_gateway(soak_cluster, bank_mode, tmp_path):
    """The soak through two gateways over a 3-node engine: after ~300 transfers the node
    leading the topic's stream is ``kill -9``ed and restarted, after ~500 the gateway the
    clients use (A), after ~600 bank2 (and the relay at ~450 in outbox mode). SQLite
    databases, open broker; bank1's producer waits up to 15 s for a send (a fail-over)."""
    from tests.cluster.enginestate import js_api, stream_leader

    cluster, gateways = soak_cluster

    async def kill_node() -> None:
        leader = await stream_leader(cluster, "HMQ_T_bank_transfer")
        await asyncio.to_thread(cluster.kill9, leader)
        await asyncio.to_thread(cluster.start_node, leader)

    async def kill_gateway() -> None:
        await asyncio.to_thread(gateways.gateways[0].kill9)
        await asyncio.to_thread(gateways.gateways[0].start, 60)

    async def dead_letters() -> int:  # the group's subject in the engine's dead-letter stream
        info = await js_api(cluster, "STREAM.INFO.HMQ_DLQ", {"subjects_filter": f"hmqs.dlq.{CONSUMER_GROUP}"})
        return sum((info["state"].get("subjects") or {}).values())

    await _soak(gateways, (str(tmp_path / "bank1.db"), str(tmp_path / "bank2.db")), bank_mode, tmp_path,
                False, [(KILL_BROKER_AT, "the stream leader node", kill_node),
                        (KILL_GATEWAY_AT, "gateway A", kill_gateway)],
                producer_options={"send_timeout": 15.0}, dead_letters=dead_letters)
