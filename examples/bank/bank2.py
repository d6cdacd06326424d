"""bank2: consumes the transfer messages and credits Li Si, once per ``tx_no``.

    python -m examples.bank.bank2 --broker 127.0.0.1:7600 --port 8082 [--db URL]

Each delivery runs ``apply_once`` (``consumer_sdk.dedup``): in one local transaction it
records the transfer's ``tx_no`` (the message key) in ``tx_duplication`` and credits the
account. A redelivered or duplicated message finds its ``tx_no`` and only acks. A transfer
to a missing account rolls back and is retried (``RECONSUME_LATER``); after
``--max-reconsume-times`` retries it lands in ``%DLQ%consumer_bank2``, from where the admin
API can resend it once the account exists.

``GET /v1/bank2/accounts/{id}``; ``POST /v1/bank2/accounts`` with ``{"id": 3, "account": "wangwu"}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from aiohttp import web

from consumer_sdk import ConsumeResult, Message, PushConsumer
from consumer_sdk.dedup import apply_once
from examples.bank.bank1 import TOPIC
from examples.bank.db import BankDatabase, account_routes, parse_money
from examples.bank.runner import run_service

__all__ = ["Bank2Service", "Delivery", "main", "CONSUMER_GROUP", "SEED"]

log = logging.getLogger("halfmq.examples.bank2")

CONSUMER_GROUP = "consumer_bank2"
SEED = [(2, "lisi", "0.00")]


class AccountMissing(Exception):
    """The destination account does not exist (yet): retry later."""


@dataclass(frozen=True)
class Delivery:
    """One listener call, as recorded for tests and the demo."""

    msg_id: str
    tx_no: str
    reconsume_times: int
    outcome: str  # "credited", "duplicate", "retry: <why>"


class Bank2Service:
    """bank2: its database, its push consumer and its HTTP API.

    ``lose_ack_once``: when set, the next credited message is answered ``RECONSUME_LATER``
    after its local commit (as if the ack were lost), so it is delivered again — used by
    the demo and tests to show the de-duplication. ``deliveries`` records every call.
    ``broker_options`` go to the consumer (``user``, ``password``, ``tls``; by default the
    SDK reads ``HALFMQ_USER``/``HALFMQ_PASSWORD``).
    """

    def __init__(self, db_url: str, broker: str, *, host: str = "127.0.0.1", port: int = 8082,
                 topic: str = TOPIC, group: str = CONSUMER_GROUP, max_reconsume_times: int = 16,
                 reset: bool = False, broker_options: dict[str, Any] | None = None) -> None:
        self.db = BankDatabase(db_url, seed=SEED)
        self.broker = broker
        self.host, self.port = host, port
        self.topic, self.group = topic, group
        self.max_reconsume_times = max_reconsume_times
        self.reset = reset
        self.broker_options = broker_options or {}
        self.lose_ack_once = False
        self.deliveries: list[Delivery] = []
        self.url = ""
        self.consumer: PushConsumer | None = None
        self._runner: web.AppRunner | None = None

    async def start(self) -> Bank2Service:
        await self.db.open(reset=self.reset)
        await self._start_http()
        self.consumer = PushConsumer(self.broker, group=self.group, topic=self.topic, tags="*",
                                     listener=self.on_message,
                                     max_reconsume_times=self.max_reconsume_times,
                                     **self.broker_options)
        await self.consumer.start()
        return self

    async def _start_http(self) -> None:
        app = web.Application()
        app.add_routes(account_routes(self.db, "bank2"))
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()
        self.port = self._runner.addresses[0][1]
        self.url = f"http://{self.host}:{self.port}"

    async def close(self) -> None:
        if self.consumer is not None:
            await self.consumer.close()
            self.consumer = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self.db.close()

    async def __aenter__(self) -> Bank2Service:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _record(self, message: Message, tx_no: str, outcome: str) -> None:
        self.deliveries.append(Delivery(message.msg_id, tx_no, message.reconsume_times, outcome))

    async def on_message(self, message: Message) -> ConsumeResult:
        """The consumer listener: credit once per ``tx_no``."""
        try:
            transfer: dict[str, Any] = json.loads(message.body)
            tx_no = message.keys[0] if message.keys else str(transfer["txNo"])
            to_id, money = int(transfer["toId"]), parse_money(transfer["money"])
        except (ValueError, KeyError, TypeError) as exc:
            log.error("malformed transfer message %s: %s", message.msg_id, exc)
            self._record(message, "?", f"retry: malformed ({exc})")
            return ConsumeResult.RECONSUME_LATER  # kept in the DLQ for a person to look at

        async def credit(conn: Any) -> None:
            account = await self.db.lock_account(conn, to_id)
            if account is None:
                raise AccountMissing(f"no account {to_id} in bank2")
            await self.db.set_balance(conn, to_id, account.balance + money)

        try:
            async with self.db.connection() as conn:
                applied = await apply_once(conn, tx_no, credit, table="tx_duplication",
                                           key_column="tx_no", time_column="create_time")
        except AccountMissing as exc:
            log.warning("transfer %s (msg %s, attempt %d): %s; retrying later",
                        tx_no, message.msg_id, message.reconsume_times + 1, exc)
            self._record(message, tx_no, f"retry: {exc}")
            return ConsumeResult.RECONSUME_LATER
        if not applied:
            log.info("transfer %s (msg %s) already credited; acking the duplicate",
                     tx_no, message.msg_id)
            self._record(message, tx_no, "duplicate")
            return ConsumeResult.SUCCESS
        log.info("transfer %s: credited %s to account %d", tx_no, money, to_id)
        self._record(message, tx_no, "credited")
        if self.lose_ack_once:
            self.lose_ack_once = False
            log.warning("fault injection: the ack of %s is lost; it will be redelivered", tx_no)
            return ConsumeResult.RECONSUME_LATER
        return ConsumeResult.SUCCESS

    def credited(self, tx_no: str) -> int:
        """How many deliveries of ``tx_no`` credited the account (should be at most 1)."""
        return sum(1 for d in self.deliveries if d.tx_no == tx_no and d.outcome == "credited")

    async def balance(self, account_id: int) -> Decimal | None:
        account = await self.db.get_account(account_id)
        return None if account is None else account.balance


async def _run(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with Bank2Service(args.db, args.broker, host=args.host, port=args.port,
                            topic=args.topic, group=args.group,
                            max_reconsume_times=args.max_reconsume_times) as bank:
        print(f"bank2 ready http={bank.url} db={bank.db.url.describe()} broker={args.broker}",
              flush=True)
        await stop.wait()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m examples.bank.bank2",
                                description="bank2: consumes transfers and credits once")
    p.add_argument("--broker", default="127.0.0.1:7600", help="broker address [127.0.0.1:7600]")
    p.add_argument("--host", default="127.0.0.1", help="HTTP listen address [127.0.0.1]")
    p.add_argument("--port", type=int, default=8082, help="HTTP port, 0 = any free one [8082]")
    p.add_argument("--db", default="bank2.db",
                   help="sqlite file or mysql://user:pass@host:3306/name [bank2.db]")
    p.add_argument("--topic", default=TOPIC, help=f"[{TOPIC}]")
    p.add_argument("--group", default=CONSUMER_GROUP, help=f"consumer group [{CONSUMER_GROUP}]")
    p.add_argument("--max-reconsume-times", type=int, default=16,
                   help="retries before a message goes to %%DLQ%%<group> [16]")
    return p


def main(argv: list[str] | None = None) -> int:
    return run_service("bank2", _run(build_parser().parse_args(argv)))

if __name__ == "__main__":
    sys.exit(main())
