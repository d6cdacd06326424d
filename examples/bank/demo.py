"""``halfmq demo``: the bank transfer, end to end, in one process and under 30 seconds.

Starts an embedded broker (temporary data directory, short transaction timeout, check
interval and retry delays), bank1 and bank2 on free ports with their own databases
(temporary SQLite files, or MySQL with ``--db mysql://user:pass@host:3306/name``, which
uses the databases ``name_bank1`` and ``name_bank2`` and resets the example's tables in
them), then runs the five scenarios over HTTP and prints the balances after each. With
``--mode outbox`` bank1 writes the transfer message into its outbox table in the debit's
transaction and a relay ships it (no half message):

1. a transfer of 20 that goes through;
2. a transfer of 100 refused for insufficient balance (nothing is delivered);
3. a transfer of 5 to a missing account: retried, dead-lettered, resent after the account
   is created;
4. a lost outcome: bank1 commits but answers UNKNOWN; the broker checks back (outbox
   mode: the relay is down when bank1 commits; the row waits and ships when it is back);
5. a duplicate delivery (bank2's ack is lost once): credited once.

After every scenario it checks that the money adds up and that every transfer credited in
bank2 was debited in bank1. Exit status 0 when all checks hold.

With ``--rocketmq-client`` the broker also serves RocketMQ 5's gRPC protocol and bank2
consumes with the official Apache RocketMQ client (``examples.bank.bank2_rocketmq``)
while bank1 stays on halfmq's SDK: the same five scenarios, across the two protocols.

With ``--auth`` the broker has users before the banks start: ``bank1`` may publish the
transfer topic as producer group ``producer_bank1``, ``bank2`` may consume it as
``consumer_bank2``, and ``operator`` (admin) acts on the admin API with a bearer token;
the demo first shows that a client without credentials, and bank2 trying to publish,
are refused.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import secrets
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp

from examples.bank.bank1 import MODES, PRODUCER_GROUP, TOPIC, Bank1Service
from examples.bank.bank2 import CONSUMER_GROUP, Bank2Service
from examples.bank.db import parse_db_url

__all__ = ["demo_main", "run_demo", "check_invariants", "wait_until", "START_TOTAL",
           "wait_dead_lettered"]

START_TOTAL = Decimal("100.00")


async def wait_until(predicate: Callable[[], Awaitable[Any]], timeout: float = 10.0,
                     what: str = "condition", interval: float = 0.05) -> Any:
    """Poll the async ``predicate`` until it returns something truthy; ``TimeoutError`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


async def check_invariants(bank1: Bank1Service, bank2: Bank2Service,
                           start_total: Decimal = START_TOTAL) -> list[str]:
    """Return the broken invariants (empty when all hold).

    The sum of all balances in both banks equals ``start_total``, and every ``tx_no``
    credited in bank2 was recorded (debited) in bank1.
    """
    problems = []
    total = await bank1.db.total() + await bank2.db.total()
    if total != start_total:
        problems.append(f"money does not add up: {total} != {start_total}")
    missing = await bank2.db.tx_numbers() - await bank1.db.tx_numbers()
    if missing:
        problems.append(f"credited in bank2 but not debited in bank1: {sorted(missing)}")
    return problems


async def wait_dead_lettered(http: aiohttp.ClientSession, http_url: str, msg_id: str,
                             group: str = CONSUMER_GROUP, timeout: float = 15.0) -> None:
    """Wait until the admin API shows ``msg_id`` dead-lettered for ``group``."""

    async def dead() -> bool:
        async with http.get(f"{http_url}/api/messages/{msg_id}") as r:
            if r.status != 200:
                return False
            info = await r.json()
        return info.get("groups", {}).get(group, {}).get("state") == "dead_lettered"

    await wait_until(dead, timeout, f"{msg_id} in %DLQ%{group}")


class _Demo:
    def __init__(self, bank1: Bank1Service, bank2: Bank2Service, admin_url: str,
                 http: aiohttp.ClientSession, out: Callable[[str], None]) -> None:
        self.bank1, self.bank2, self.admin_url, self.http, self.out = bank1, bank2, admin_url, http, out
        self.failures = 0
        #: the admin API takes state changes only with this header (cross-site safety)
        self.admin_headers = {"X-HalfMQ-Request": "halfmq-demo"}

    async def message_id(self, reply: dict[str, Any]) -> str:
        """The broker's id of a transfer's message: in the reply (transaction mode), or
        found by its key once the relay sent it (outbox mode)."""
        if reply.get("msgId"):
            return str(reply["msgId"])

        async def found() -> str | None:
            async with self.http.get(f"{self.admin_url}/api/messages",
                                     params={"topic": self.bank1.topic, "key": reply["txNo"]}) as r:
                messages = (await r.json())["messages"]
            return messages[0]["msg_id"] if messages else None

        return str(await wait_until(found, what=f"the message of {reply['txNo']} on the broker"))

    async def transfer(self, from_id: int, to_id: int, money: str) -> tuple[int, dict[str, Any]]:
        async with self.http.post(f"{self.bank1.url}/v1/bank1/transfer",
                                  json={"fromId": from_id, "toId": to_id, "money": money}) as r:
            reply = await r.json()
        detail = reply.get("error") or reply.get("message") or ""
        self.out(f"   POST /v1/bank1/transfer {money} from {from_id} to {to_id} -> HTTP {r.status} "
                 f"{reply.get('state', '')} {detail}".rstrip())
        return r.status, reply

    async def balance2(self, account_id: int) -> Decimal | None:
        async with self.http.get(f"{self.bank2.url}/v1/bank2/accounts/{account_id}") as r:
            return Decimal((await r.json())["balance"]) if r.status == 200 else None

    async def show(self, in_transit: Decimal = Decimal("0.00"), where: str = "in the DLQ") -> None:
        a1 = await self.bank1.db.accounts()
        a2 = await self.bank2.db.accounts()
        line = " | ".join(
            [f"bank1 {a.id} {a.account} {a.balance}" for a in a1]
            + [f"bank2 {a.id} {a.account} {a.balance}" for a in a2])
        total = sum((a.balance for a in a1 + a2), Decimal("0.00"))
        problems = await check_invariants(self.bank1, self.bank2, START_TOTAL - in_transit)
        self.failures += bool(problems)
        verdict = "ok" if not problems else "BROKEN: " + "; ".join(problems)
        transit = f" + {in_transit} {where}" if in_transit else ""
        self.out(f"   balances: {line} | total {total}{transit} ({verdict})")

    async def run(self) -> int:
        out = self.out
        out("start")
        await self.show()

        out("1. transfer 20 from zhangsan (bank1) to lisi (bank2)")
        await self.transfer(1, 2, "20")
        await wait_until(lambda: self._is(2, Decimal("20.00")), what="lisi credited")
        await self.show()

        out("2. transfer 100: insufficient balance, the local transaction rolls back, nothing is sent")
        await self.transfer(1, 2, "100")
        await self.show()

        out("3. transfer 5 to account 3, which bank2 does not have: retried, then dead-lettered")
        _status, reply = await self.transfer(1, 3, "5")
        msg_id = await self.message_id(reply)
        await wait_dead_lettered(self.http, self.admin_url, msg_id)
        retries = [d for d in self.bank2.deliveries if d.msg_id == msg_id]
        out(f"   bank2 tried {len(retries)} times; the message is in %DLQ%{CONSUMER_GROUP}")
        await self.show(in_transit=Decimal("5.00"))
        async with self.http.post(f"{self.bank2.url}/v1/bank2/accounts",
                                  json={"id": 3, "account": "wangwu"}) as r:
            out(f"   POST /v1/bank2/accounts wangwu -> HTTP {r.status}")
        async with self.http.post(f"{self.admin_url}/api/dlq/{CONSUMER_GROUP}/messages/"
                                  f"{msg_id}/resend", headers=self.admin_headers) as r:
            out(f"   POST /api/dlq/{CONSUMER_GROUP}/messages/{msg_id}/resend -> HTTP {r.status}")
        await wait_until(lambda: self._is(3, Decimal("5.00")), what="wangwu credited")
        await self.show()

        if self.bank1.mode == "outbox":
            await self._relay_down()
        else:
            out("4. lost outcome: bank1 commits locally but reports UNKNOWN; the broker checks back")
            self.bank1.fault = "unknown-outcome"
            try:
                t0 = time.monotonic()
                await self.transfer(1, 2, "10")
            finally:
                self.bank1.fault = None
            await wait_until(lambda: self._is(2, Decimal("30.00")), what="check-back and credit")
            out(f"   check-back answered COMMIT from halfmq_tx_log; credited after "
                f"{time.monotonic() - t0:.1f}s")
        await self.show()

        out("5. duplicate delivery: bank2's ack is lost once, the message comes again")
        self.bank2.lose_ack_once = True
        _status, reply = await self.transfer(1, 2, "1")

        async def seen_twice() -> bool:
            return any(d.tx_no == reply["txNo"] and d.outcome == "duplicate"
                       for d in self.bank2.deliveries)

        await wait_until(seen_twice, what="the redelivery")
        outcomes = [d.outcome for d in self.bank2.deliveries if d.tx_no == reply["txNo"]]
        out(f"   deliveries of {reply['txNo'][:8]}: {', '.join(outcomes)}")
        await self.show()
        out("done: every check held" if not self.failures else f"done: {self.failures} check(s) FAILED")
        return 0 if not self.failures else 1

    async def _relay_down(self) -> None:
        out, bank1 = self.out, self.bank1
        assert bank1.outbox is not None
        out("4. the outbox relay is down when bank1 commits: the row waits in halfmq_outbox")
        await bank1.stop_relay()
        await self.transfer(1, 2, "10")
        out(f"   halfmq_outbox: {(await bank1.outbox.status()).describe()}; lisi still has "
            f"{await self.balance2(2)}")
        await self.show(in_transit=Decimal("10.00"), where="in bank1's outbox")
        t0 = time.monotonic()
        bank1.start_relay()
        await wait_until(lambda: self._is(2, Decimal("30.00")), what="the relay and the credit")
        out(f"   the relay is back: it sent the row; credited after {time.monotonic() - t0:.1f}s")

    async def _is(self, account_id: int, expected: Decimal) -> bool:
        return await self.balance2(account_id) == expected


async def _add_demo_users(broker: Any, out: Callable[[str], None]) -> dict[str, Any]:
    """Users for ``--auth``: returns the banks' broker options and the operator's token."""
    from producer_sdk import AuthError, Producer

    directory = broker.security.directory
    passwords = {name: secrets.token_urlsafe(12) for name in ("bank1", "bank2", "operator")}
    for name, password in passwords.items():
        await directory.add_user(name, password)
    await directory.grant("bank1", "publish", TOPIC, PRODUCER_GROUP)
    await directory.grant("bank2", "subscribe", TOPIC, CONSUMER_GROUP)
    await directory.grant("operator", "admin", "*")
    token, _ = await directory.create_token("operator")
    for user in directory.list_users():
        out(f"   user {user['user']}: {', '.join(user['grants'])}")
    attempts: list[tuple[str, dict[str, Any]]] = [
        ("no credentials", {}), ("bank2 publishing", {"user": "bank2", "password": passwords["bank2"]})]
    for who, options in attempts:
        try:
            async with Producer(broker.address, **options) as p:
                await p.send(TOPIC, b"{}")
            out(f"   {who}: NOT refused")
        except AuthError as exc:
            out(f"   {who}: refused ({exc})")
    return {
        "bank1": {"user": "bank1", "password": passwords["bank1"]},
        "bank2": {"user": "bank2", "password": passwords["bank2"]},
        "headers": {"Authorization": f"Bearer {token}"},
    }


async def run_demo(db: str | None = None, out: Callable[[str], None] = print, *,
                   mode: str = "transaction", rocketmq_client: bool = False, auth: bool = False) -> int:
    """Run the whole demo; ``db`` is ``None`` (temporary SQLite) or a ``mysql://`` URL;
    ``mode`` is how bank1 ships the message (``transaction`` or ``outbox``);
    ``rocketmq_client``: bank2 on the official RocketMQ client (needs the grpc extra);
    ``auth``: with users and rights (see the module docstring; not with ``rocketmq_client``,
    whose gRPC port does not check logins yet)."""
    from broker import Broker, BrokerConfig

    with tempfile.TemporaryDirectory(prefix="halfmq-demo-") as tmp:
        if db is None:
            db1, db2 = str(Path(tmp) / "bank1.db"), str(Path(tmp) / "bank2.db")
        else:
            base = db.rstrip("/")
            parse_db_url(base)  # validates
            db1, db2 = base + "_bank1", base + "_bank2"
        config = BrokerConfig(data_dir=str(Path(tmp) / "broker"), port=0, http_port=0,
                              tx_timeout=1.0, tx_check_interval=0.2, retry_delays=(0.2, 0.3),
                              ack_timeout=5.0, grpc_port=0 if rocketmq_client else None)
        async with Broker(config) as broker:
            logins: dict[str, Any] = {}
            if auth:
                out("0. users and rights (--auth)")
                logins = await _add_demo_users(broker, out)
            bank1 = Bank1Service(db1, broker.address, port=0, reset=True, mode=mode,
                                 broker_options=logins.get("bank1"))
            bank2: Bank2Service
            if rocketmq_client:
                from examples.bank.bank2_rocketmq import RocketMQBank2Service

                # a RocketMQ client cannot say how often to retry: the group's setting does
                await broker.engine.admin_set_group_settings(CONSUMER_GROUP, max_attempts=3)
                bank2 = RocketMQBank2Service(db2, broker.grpc_address, port=0, reset=True)
            else:
                bank2 = Bank2Service(db2, broker.address, port=0, max_reconsume_times=2, reset=True,
                                     broker_options=logins.get("bank2"))
            async with bank1, bank2, aiohttp.ClientSession(headers=logins.get("headers")) as http:
                via = f" on the official RocketMQ client via gRPC {broker.grpc_address}" if rocketmq_client else ""
                out(f"halfmq demo ({mode} mode): broker {broker.address} (admin {broker.http_url}), "
                    f"bank1 {bank1.url} [{bank1.db.url.describe()}], "
                    f"bank2 {bank2.url} [{bank2.db.url.describe()}]{via}")
                return await _Demo(bank1, bank2, broker.http_url, http, out).run()


def demo_main(argv: list[str]) -> int:
    """``halfmq demo [--db mysql://user:pass@host:3306/name] [--mode outbox] [-v]``."""
    parser = argparse.ArgumentParser(
        prog="halfmq demo",
        description="The bank transfer end to end: an embedded broker, bank1 and bank2, five "
                    "scenarios, balances after each. Under 30 seconds.")
    parser.add_argument("--db", default=None,
                        help="mysql://user:pass@host:3306/name to use MySQL/MariaDB (databases "
                             "name_bank1 and name_bank2); default: temporary SQLite files")
    parser.add_argument("--mode", choices=MODES, default="transaction",
                        help="how bank1 ships the transfer: a transactional half message "
                             "checked back by the broker, or a row of its outbox table sent by "
                             "a relay [transaction]")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the banks do")
    parser.add_argument("--rocketmq-client", action="store_true",
                        help="bank2 consumes with the official RocketMQ 5 client through the broker's "
                             "gRPC port (needs the grpc extra)")
    parser.add_argument("--auth", action="store_true",
                        help="with users and rights: bank1 may publish, bank2 may consume, the "
                             "operator acts on the admin API with a token")
    args = parser.parse_args(argv)
    if args.db is not None and not args.db.startswith("mysql"):
        parser.error("--db takes a mysql:// URL (SQLite is the default)")
    if args.auth and args.rocketmq_client:
        parser.error("--auth cannot go with --rocketmq-client: the gRPC port does not check logins yet")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.CRITICAL,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:  # pragma: no cover - uvloop is not on Windows
        runner = asyncio.Runner()
    started = time.monotonic()
    with runner:
        status = runner.run(run_demo(args.db, mode=args.mode, rocketmq_client=args.rocketmq_client,
                                     auth=args.auth))
    print(f"({time.monotonic() - started:.1f}s)")
    return status


if __name__ == "__main__":
    sys.exit(demo_main(sys.argv[1:]))
