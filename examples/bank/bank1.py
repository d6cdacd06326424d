"""bank1: debits Zhang San and sends the transfer to bank2 as a transactional message.

    python -m examples.bank.bank1 --broker 127.0.0.1:7600 --port 8081 [--db URL]

``POST /v1/bank1/transfer`` with ``{"fromId": 1, "toId": 2, "money": "20"}`` (optional
``"txNo"``, the idempotency key; generated if missing) runs one flow:

1. ``send_in_transaction`` stores a *half message* (body: the transfer as JSON, key: tx_no).
2. ``execute_local_transaction``, in one local database transaction: record the message
   id with ``record_commit`` (the SDK's check-back log), record ``tx_no`` in
   ``tx_duplication``, lock the account, check the balance, debit it — then commit.
3. The outcome goes to the broker: COMMIT delivers the message to bank2; ROLLBACK (e.g.
   insufficient balance) drops it and the HTTP reply is a 4xx saying why.

If the outcome is lost (bank1 crashes after its commit, the network fails, or the listener
answers UNKNOWN), the broker checks back and the ready-made ``TxLogListener`` answers from
``halfmq_tx_log``: there is no hand-written ``check_local_transaction`` in this file.

``--mode outbox`` ships the same message another way: the debit and a row of the outbox
table (``producer_sdk.Outbox``) commit in one local transaction, and a relay — in this
process, or ``halfmq outbox-relay`` with ``--no-relay`` — sends the row to the broker. No
half message, no check-back: a crash after the commit leaves the row in the table, and the
relay ships it when it runs again.

Replies: 200 committed; 202 outcome left to check-back; 400 bad request; 404 no such source
account; 409 insufficient balance or tx_no already used; 503 broker unavailable (transaction
mode; in outbox mode a transfer never waits for the broker).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import uuid
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from aiohttp import web

from examples.bank.db import BankDatabase, account_routes, parse_money
from examples.bank.runner import run_service
from producer_sdk import (
    BrokerUnavailableError,
    HalfMQError,
    LocalTransactionState,
    Message,
    Outbox,
    Producer,
    RequestTimeoutError,
    TransactionProducer,
)
from producer_sdk.local_tx import TxLogListener, record_commit

__all__ = ["Bank1Service", "TransferListener", "OutboxTransfer", "TransferRequest",
           "TransferRefused", "debit", "main", "TOPIC", "PRODUCER_GROUP", "SEED", "FAULTS", "MODES"]

log = logging.getLogger("halfmq.examples.bank1")

TOPIC = "bank_transfer"
PRODUCER_GROUP = "producer_bank1"
SEED = [(1, "zhangsan", "100.00")]
#: Fault injection for tests and the demo: the local transaction commits, then the outcome is
#: lost — answered UNKNOWN, or the process is killed with SIGKILL before reporting it.
FAULTS = ("unknown-outcome", "kill-after-commit")
#: ``transaction``: a half message and check-back; ``outbox``: a row of the outbox table.
MODES = ("transaction", "outbox")


class TransferRefused(Exception):
    """A business reason not to transfer; the local transaction rolls back."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass
class TransferRequest:
    """What ``send_in_transaction`` passes to the listener as ``arg``."""

    tx_no: str
    from_id: int
    to_id: int
    money: Decimal
    refused: TransferRefused | None = None

    def body(self) -> bytes:
        return json.dumps({"txNo": self.tx_no, "fromId": self.from_id, "toId": self.to_id,
                           "money": str(self.money)}).encode()


async def debit(db: BankDatabase, conn: Any, request: TransferRequest) -> None:
    """bank1's part of a transfer, inside the open transaction on ``conn``: record ``tx_no``
    in ``tx_duplication``, lock the account, check the balance, debit it. Raises
    ``TransferRefused`` (409 already made or insufficient balance, 404 no such account)."""
    if not await db.claim_tx_no(conn, request.tx_no):
        raise TransferRefused(409, f"transfer {request.tx_no} was already made")
    account = await db.lock_account(conn, request.from_id)
    if account is None:
        raise TransferRefused(404, f"no account {request.from_id} in bank1")
    if account.balance < request.money:
        raise TransferRefused(
            409, f"insufficient balance: account {account.id} has {account.balance}, "
                 f"the transfer needs {request.money}")
    await db.set_balance(conn, account.id, account.balance - request.money)


class TransferListener(TxLogListener):
    """The local transaction of a transfer. ``check_local_transaction`` is inherited."""

    def __init__(self, service: Bank1Service) -> None:
        super().__init__(service.db.tx_log_checker())
        self.service = service

    async def execute_local_transaction(self, message: Message,
                                        request: TransferRequest) -> LocalTransactionState:
        db = self.service.db
        try:
            async with db.transaction() as conn:
                # first statement: a check-back arriving now waits for this transaction
                await record_commit(conn, message.msg_id)
                await debit(db, conn, request)
        except TransferRefused as exc:
            request.refused = exc
            log.info("transfer %s refused: %s", request.tx_no, exc.reason)
            return LocalTransactionState.ROLLBACK
        # Any other exception propagates: the outcome is UNKNOWN and check-back decides,
        # because a failed COMMIT may or may not have committed.
        fault = self.service.fault
        if fault == "kill-after-commit":
            _kill_after_commit(request)
        if fault == "unknown-outcome":
            log.warning("fault injection: answering UNKNOWN after the local commit of %s",
                        request.tx_no)
            return LocalTransactionState.UNKNOWN
        return LocalTransactionState.COMMIT


def _kill_after_commit(request: TransferRequest) -> None:
    log.warning("fault injection: SIGKILL after the local commit of %s", request.tx_no)
    os.kill(os.getpid(), signal.SIGKILL)


class OutboxTransfer:
    """The local transaction of a transfer in outbox mode: the debit and the outbox row
    commit together (or neither does)."""

    def __init__(self, service: Bank1Service) -> None:
        self.service = service

    async def execute(self, request: TransferRequest) -> int:
        """Debit and add the transfer message to the outbox; return the outbox row's id.
        Raises ``TransferRefused`` (nothing is kept), or what the database raised."""
        service = self.service
        assert service.outbox is not None
        async with service.db.transaction() as conn:
            await debit(service.db, conn, request)
            return await service.outbox.add(conn, service.topic, request.body(),
                                            tags="transfer", keys=[request.tx_no])


class Bank1Service:
    """bank1: its database, its producer (transactional, or the outbox's relay) and its HTTP API.

    ``mode``: one of ``MODES``. ``relay`` (outbox mode): run the outbox relay in this
    process [True]; with ``False`` run ``halfmq outbox-relay`` beside it. ``fault`` (one of
    ``FAULTS`` or ``None``; outbox mode: ``kill-after-commit`` only) may be changed while
    running. ``port=0`` picks a free port; ``url`` is the base URL once started. ``broker_options`` go to
    the producers (``user``, ``password``, ``tls``; by default the SDK reads
    ``HALFMQ_USER``/``HALFMQ_PASSWORD``).
    """

    def __init__(self, db_url: str, broker: str, *, host: str = "127.0.0.1", port: int = 8081,
                 topic: str = TOPIC, group: str = PRODUCER_GROUP, fault: str | None = None,
                 reset: bool = False, mode: str = "transaction", relay: bool = True,
                 broker_options: dict[str, Any] | None = None) -> None:
        if fault is not None and fault not in FAULTS:
            raise ValueError(f"fault must be one of {FAULTS}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        if mode == "outbox" and fault == "unknown-outcome":
            raise ValueError("outbox mode has no outcome to lose: its fault is kill-after-commit")
        self.db = BankDatabase(db_url, seed=SEED)
        self.broker = broker
        self.host, self.port = host, port
        self.topic, self.group = topic, group
        self.fault = fault
        self.reset = reset
        self.mode, self.relay = mode, relay
        self.broker_options = broker_options or {}
        self.url = ""
        self.producer: TransactionProducer | None = None
        self.outbox: Outbox | None = None
        self.outbox_transfer = OutboxTransfer(self)
        self.relay_producer: Producer | None = None
        self._relay_task: asyncio.Task[None] | None = None
        self._runner: web.AppRunner | None = None

    async def start(self) -> Bank1Service:
        await self.db.open(reset=self.reset)
        if self.mode == "outbox":
            self.outbox = self.db.outbox()
            await self.outbox.create_table()
            if self.relay:
                self.relay_producer = Producer(self.broker, group=self.group, **self.broker_options)
                await self.relay_producer.start()
                self.start_relay()
        else:
            self.producer = TransactionProducer(self.broker, group=self.group,
                                                listener=TransferListener(self), **self.broker_options)
            await self.producer.start()
        app = web.Application()
        routes = web.RouteTableDef()
        routes.post("/v1/bank1/transfer")(self._transfer)
        app.add_routes(routes)
        app.add_routes(account_routes(self.db, "bank1"))
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]
        self.url = f"http://{self.host}:{self.port}"
        return self

    def start_relay(self) -> None:
        """Outbox mode: run the outbox relay in this process (again)."""
        assert self.outbox is not None and self.relay_producer is not None
        if self._relay_task is None:
            self._relay_task = asyncio.create_task(
                self.outbox.relay(self.relay_producer, poll_interval=0.05))

    async def stop_relay(self) -> None:
        """Outbox mode: stop the relay of this process (rows wait in the table)."""
        task, self._relay_task = self._relay_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self.stop_relay()
        for producer in (self.producer, self.relay_producer):
            if producer is not None:
                await producer.close()
        self.producer = self.relay_producer = None
        await self.db.close()

    async def __aenter__(self) -> Bank1Service:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def transfer(self, from_id: int, to_id: int, money: Decimal,
                       tx_no: str | None = None) -> tuple[int, dict[str, Any]]:
        """Run one transfer; return ``(http_status, reply)`` as the HTTP API does."""
        request = TransferRequest(tx_no or uuid.uuid4().hex, from_id, to_id, money)
        if self.mode == "outbox":
            return await self._transfer_by_outbox(request)
        assert self.producer is not None
        try:
            result = await self.producer.send_in_transaction(
                self.topic, request.body(), arg=request, tags="transfer", keys=[request.tx_no])
        except HalfMQError as exc:
            if isinstance(exc, BrokerUnavailableError | RequestTimeoutError):
                return 503, {"error": f"broker unavailable, nothing was transferred: {exc}",
                             "txNo": request.tx_no}
            return 500, {"error": f"{type(exc).__name__}: {exc}", "txNo": request.tx_no}
        except Exception as exc:  # the local transaction failed in an unknown way
            log.exception("transfer %s: local transaction failed", request.tx_no)
            return 500, {"error": f"local transaction failed ({exc}); its outcome will be "
                                  "settled by the broker's check-back", "txNo": request.tx_no}
        reply = {"txNo": request.tx_no, "msgId": result.msg_id, "state": result.state.value}
        if result.state is LocalTransactionState.ROLLBACK:
            refused = request.refused
            reply["error"] = refused.reason if refused else "the local transaction rolled back"
            return (refused.status if refused else 409), reply
        if result.state is LocalTransactionState.UNKNOWN:
            reply["message"] = "debited; delivery will be confirmed by the broker's check-back"
            return 202, reply
        return 200, reply

    async def _transfer_by_outbox(self, request: TransferRequest) -> tuple[int, dict[str, Any]]:
        try:
            outbox_id = await self.outbox_transfer.execute(request)
        except TransferRefused as exc:
            log.info("transfer %s refused: %s", request.tx_no, exc.reason)
            return exc.status, {"txNo": request.tx_no, "state": "ROLLBACK", "error": exc.reason}
        except Exception as exc:  # the local transaction failed; a failed COMMIT may still
            log.exception("transfer %s: local transaction failed", request.tx_no)  # be durable
            return 500, {"error": f"local transaction failed ({exc}); if it committed, the "
                                  "outbox relay delivers it", "txNo": request.tx_no}
        if self.fault == "kill-after-commit":
            _kill_after_commit(request)
        return 200, {"txNo": request.tx_no, "outboxId": outbox_id, "state": "COMMIT"}

    async def _transfer(self, req: web.Request) -> web.Response:
        try:
            data = await req.json()
            from_id, to_id = data["fromId"], data["toId"]
            if not (isinstance(from_id, int) and isinstance(to_id, int)) \
                    or isinstance(from_id, bool) or isinstance(to_id, bool):
                raise ValueError("fromId and toId must be integers")
            if from_id == to_id:
                raise ValueError("fromId and toId must differ")
            money = parse_money(data["money"])
            tx_no = data.get("txNo")
            if tx_no is not None and (not isinstance(tx_no, str) or not 0 < len(tx_no) <= 64):
                raise ValueError("txNo must be a string of 1 to 64 characters")
        except (ValueError, KeyError, TypeError) as exc:
            reason = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
            return web.json_response({"error": f"bad transfer request: {reason}"}, status=400)
        status, reply = await self.transfer(from_id, to_id, money, tx_no)
        return web.json_response(reply, status=status)


async def _run(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with Bank1Service(args.db, args.broker, host=args.host, port=args.port,
                            topic=args.topic, group=args.group, fault=args.fault,
                            mode=args.mode, relay=not args.no_relay) as bank:
        print(f"bank1 ready http={bank.url} db={bank.db.url.describe()} broker={args.broker} "
              f"mode={bank.mode}", flush=True)
        await stop.wait()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m examples.bank.bank1",
                                description="bank1: debits and sends the transfer message")
    p.add_argument("--broker", default="127.0.0.1:7600", help="broker address [127.0.0.1:7600]")
    p.add_argument("--host", default="127.0.0.1", help="HTTP listen address [127.0.0.1]")
    p.add_argument("--port", type=int, default=8081, help="HTTP port, 0 = any free one [8081]")
    p.add_argument("--db", default="bank1.db",
                   help="sqlite file or mysql://user:pass@host:3306/name [bank1.db]")
    p.add_argument("--topic", default=TOPIC, help=f"[{TOPIC}]")
    p.add_argument("--group", default=PRODUCER_GROUP, help=f"producer group [{PRODUCER_GROUP}]")
    p.add_argument("--mode", choices=MODES, default="transaction",
                   help="transaction: a half message and check-back; outbox: the message is a "
                        "row of halfmq_outbox written in the debit's transaction [transaction]")
    p.add_argument("--no-relay", action="store_true",
                   help="outbox mode: do not relay in this process (run halfmq outbox-relay)")
    p.add_argument("--fault", choices=FAULTS, default=None,
                   help="fault injection for tests: lose the outcome after the local commit "
                        "(outbox mode: kill-after-commit only)")
    return p


def main(argv: list[str] | None = None) -> int:
    return run_service("bank1", _run(build_parser().parse_args(argv)))

if __name__ == "__main__":
    sys.exit(main())
