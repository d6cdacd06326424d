"""Helpers for the bank soak test: a listener (transaction mode) and an outbox transfer
(outbox mode) with injected outcomes, bank2 and the outbox relay as subprocesses, the
transfer plan and the ledger checks.

Nothing here sleeps to wait for something: processes are awaited through their ready line
and their exit, and the test polls the databases and the admin API with deadlines.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from examples.bank.bank1 import (
    Bank1Service,
    OutboxTransfer,
    TransferListener,
    TransferRefused,
    TransferRequest,
)
from producer_sdk import LocalTransactionState, Message
from producer_sdk.local_tx import record_commit

ROOT = Path(__file__).resolve().parents[2]
D = Decimal

#: The listener outcomes a transfer can be given, and how often each is drawn.
#: ``COMMIT``       the normal path: local transaction committed (or refused: insufficient
#:                  balance rolls back and answers ROLLBACK), outcome reported.
#: ``ROLLBACK``     the local transaction makes all its writes (tx log, tx_no, debit), then
#:                  rolls back and ROLLBACK is reported.
#: ``UNKNOWN``      the normal local transaction, then UNKNOWN is reported: check-back decides.
#: ``RAISE_AFTER``  the normal local transaction, then the listener raises (T5): check-back.
#: ``RAISE_BEFORE`` the listener raises inside its local transaction, after its writes and
#:                  before the commit, so nothing is kept (T5): check-back must say ROLLBACK.
OUTCOMES = {"COMMIT": 50, "ROLLBACK": 10, "UNKNOWN": 15, "RAISE_AFTER": 15, "RAISE_BEFORE": 10}
#: Outcomes after which the transfer can never have been debited in bank1.
NEVER_DEBITED = frozenset({"ROLLBACK", "RAISE_BEFORE"})


class InjectedFault(RuntimeError):
    """Raised by ``SoakListener`` for the RAISE_* outcomes."""


@dataclass(frozen=True)
class PlannedTransfer:
    tx_no: str
    from_id: int
    to_id: int
    money: Decimal
    outcome: str  # one of OUTCOMES

    def request_json(self) -> dict[str, Any]:
        return {"txNo": self.tx_no, "fromId": self.from_id, "toId": self.to_id,
                "money": str(self.money)}


def make_plan(seed: int, count: int, from_ids: list[int], to_ids: list[int],
              max_cents: int) -> list[PlannedTransfer]:
    """``count`` transfers with seeded random accounts, amounts and listener outcomes."""
    rnd = random.Random(seed)
    names, weights = list(OUTCOMES), list(OUTCOMES.values())
    return [
        PlannedTransfer(f"soak-{seed}-{i:04d}", rnd.choice(from_ids), rnd.choice(to_ids),
                        (D(rnd.randint(1, max_cents)) / 100).quantize(D("0.01")),
                        rnd.choices(names, weights)[0])
        for i in range(count)
    ]


class SoakListener(TransferListener):
    """bank1's listener, with the outcome of each transfer taken from the plan (by tx_no).

    The local database and the reported outcome always agree: a transfer reported COMMIT
    was committed locally, one reported ROLLBACK was rolled back; UNKNOWN and an exception
    leave the decision to the inherited, ready-made check-back (``TxLogChecker``).
    """

    def __init__(self, service: Bank1Service, plan: Iterable[PlannedTransfer]) -> None:
        super().__init__(service)
        self.outcomes = {t.tx_no: t.outcome for t in plan}
        self.executed: dict[str, int] = {}
        #: check-backs answered: how many, per answer, and the slowest answer (seconds)
        self.checks: dict[str, int] = {}
        self.checks_per_message: dict[str, int] = {}
        self.slowest_check = 0.0

    async def check_local_transaction(self, message: Message) -> LocalTransactionState:
        started = time.monotonic()
        state = await super().check_local_transaction(message)
        self.slowest_check = max(self.slowest_check, time.monotonic() - started)
        self.checks[state.value] = self.checks.get(state.value, 0) + 1
        self.checks_per_message[message.msg_id] = \
            self.checks_per_message.get(message.msg_id, 0) + 1
        return state

    async def execute_local_transaction(self, message: Message,
                                        request: TransferRequest) -> LocalTransactionState:
        outcome = self.outcomes.get(request.tx_no, "COMMIT")
        self.executed[outcome] = self.executed.get(outcome, 0) + 1
        if outcome == "ROLLBACK":
            try:
                await self._doomed_local_transaction(
                    message, request, TransferRefused(409, "injected rollback"))
            except TransferRefused as exc:
                request.refused = exc
                return LocalTransactionState.ROLLBACK
        if outcome == "RAISE_BEFORE":
            await self._doomed_local_transaction(
                message, request, InjectedFault(f"injected failure before the commit of "
                                                f"{request.tx_no}"))
        state = await super().execute_local_transaction(message, request)
        if outcome == "UNKNOWN":
            return LocalTransactionState.UNKNOWN
        if outcome == "RAISE_AFTER":
            raise InjectedFault(f"injected failure after the local transaction of "
                                f"{request.tx_no} ({state.value})")
        return state

    async def _doomed_local_transaction(self, message: Message, request: TransferRequest,
                                        exc: Exception) -> None:
        """bank1's writes for the transfer, then ``exc`` inside the transaction: rolled back."""
        db = self.service.db
        async with db.transaction() as conn:
            await record_commit(conn, message.msg_id)
            await db.claim_tx_no(conn, request.tx_no)
            account = await db.lock_account(conn, request.from_id)
            if account is not None and account.balance >= request.money:
                await db.set_balance(conn, account.id, account.balance - request.money)
            raise exc


class SoakOutboxTransfer(OutboxTransfer):
    """bank1's local transaction in outbox mode, with the outcome of each transfer taken from
    the plan. ``COMMIT``: the debit and the outbox row commit. ``ROLLBACK`` /
    ``RAISE_BEFORE``: all the writes, then a refusal / an exception inside the transaction:
    nothing is kept. ``UNKNOWN`` / ``RAISE_AFTER``: the transaction commits, then an
    exception (the client gets a 500, the relay still ships the committed row)."""

    def __init__(self, service: Bank1Service, plan: Iterable[PlannedTransfer]) -> None:
        super().__init__(service)
        self.outcomes = {t.tx_no: t.outcome for t in plan}
        self.executed: dict[str, int] = {}

    async def execute(self, request: TransferRequest) -> int:
        outcome = self.outcomes.get(request.tx_no, "COMMIT")
        self.executed[outcome] = self.executed.get(outcome, 0) + 1
        if outcome == "ROLLBACK":
            await self._doomed(request, TransferRefused(409, "injected rollback"))
        if outcome == "RAISE_BEFORE":
            await self._doomed(request, InjectedFault(
                f"injected failure before the commit of {request.tx_no}"))
        row_id = await super().execute(request)
        if outcome in ("UNKNOWN", "RAISE_AFTER"):
            raise InjectedFault(f"injected failure after the local transaction of {request.tx_no}")
        return row_id

    async def _doomed(self, request: TransferRequest, exc: Exception) -> None:
        """bank1's writes for the transfer, outbox row included, then ``exc``: rolled back."""
        service = self.service
        assert service.outbox is not None
        db = service.db
        async with db.transaction() as conn:
            await db.claim_tx_no(conn, request.tx_no)
            account = await db.lock_account(conn, request.from_id)
            if account is not None and account.balance >= request.money:
                await db.set_balance(conn, account.id, account.balance - request.money)
            await service.outbox.add(conn, service.topic, request.body(), keys=[request.tx_no])
            raise exc


class QuietInjectedFaults(logging.Filter):
    """Drops bank1's tracebacks of ``InjectedFault`` (hundreds of expected ones); any
    other error is still logged. ``with QuietInjectedFaults(): ...``"""

    logger = logging.getLogger("halfmq.examples.bank1")

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, InjectedFault)

    def __enter__(self) -> QuietInjectedFaults:
        self.logger.addFilter(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self.logger.removeFilter(self)


class ServiceProcess:
    """A service as a subprocess that prints one ready line (starting with ``ready``) on
    standard output when it serves; it can be ``kill -9``ed and restarted."""

    def __init__(self, argv: list[str], ready: str, log_path: Path, env: dict[str, str] | None = None) -> None:
        self.argv, self.ready, self.log_path = argv, ready, log_path
        self.env = env or {}  # added to this process's environment (e.g. a login)
        self.proc: subprocess.Popen[str] | None = None
        self.ready_line = ""
        self.kills = 0

    def start(self) -> ServiceProcess:
        with open(self.log_path, "a") as log:
            self.proc = subprocess.Popen(
                [sys.executable, *self.argv], cwd=ROOT, stdout=subprocess.PIPE, stderr=log,
                text=True, env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env})
        assert self.proc.stdout is not None
        self.ready_line = self.proc.stdout.readline()
        if not self.ready_line.startswith(self.ready):
            self._reap(signal.SIGKILL)
            raise AssertionError(f"{self.argv[:3]} did not start: {self.ready_line!r}; "
                                 f"see {self.log_path}")
        return self

    def kill9(self) -> None:
        self.kills += 1
        self._reap(signal.SIGKILL)

    def stop(self) -> None:
        self._reap(signal.SIGTERM)

    def _reap(self, sig: int) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
        self.proc = None


class Bank2Process(ServiceProcess):
    """``python -m examples.bank.bank2`` as a subprocess; ``url`` once started."""

    def __init__(self, broker_address: str, db: str, log_path: Path, env: dict[str, str] | None = None) -> None:
        super().__init__(["-m", "examples.bank.bank2", "--broker", broker_address, "--port", "0",
                          "--db", db], "bank2 ready", log_path, env)
        self.url = ""

    def start(self) -> Bank2Process:
        super().start()
        self.url = dict(p.split("=", 1) for p in self.ready_line.split()[2:])["http"]
        return self


class OutboxRelayProcess(ServiceProcess):
    """``halfmq outbox-relay`` for bank1's database (outbox mode), with short settings: a
    2 s lease (a killed relay's rows are sent again after it), 1 s send timeout."""

    def __init__(self, broker_address: str, db: str, log_path: Path, env: dict[str, str] | None = None) -> None:
        super().__init__(["-m", "broker.cli", "outbox-relay", "--db", db, "--broker",
                          broker_address, "--lease", "2s", "--send-timeout", "1s",
                          "--max-backoff", "200ms", "--poll-interval", "20ms",
                          "--progress-interval", "1s"], "halfmq outbox-relay ready", log_path, env)


def ledger_problems(plan: list[PlannedTransfer], start1: dict[int, Decimal],
                    start2: dict[int, Decimal], debited: set[str], credited: set[str],
                    balances1: dict[int, Decimal], balances2: dict[int, Decimal]) -> list[str]:
    """Everything wrong with the two banks' final state (empty when it is right).

    ``debited`` / ``credited``: the tx_no rows of bank1's / bank2's ``tx_duplication``.
    Each account's balance must be its start balance moved by exactly the transfers in
    those sets — so a transfer credited twice, or debited and never credited, shows here.
    """
    problems = []
    by_tx = {t.tx_no: t for t in plan}
    total_start = sum(start1.values()) + sum(start2.values())
    total_end = sum(balances1.values()) + sum(balances2.values())
    if total_end != total_start:
        problems.append(f"money does not add up: {total_end} != {total_start}")
    if unknown := (debited | credited) - set(by_tx):
        problems.append(f"tx_no rows that were never sent: {sorted(unknown)[:10]}")
    if lost := debited - credited:
        problems.append(f"{len(lost)} transfers debited in bank1 but not credited in bank2: "
                        f"{sorted(lost)[:10]}")
    if phantom := credited - debited:
        problems.append(f"{len(phantom)} transfers credited in bank2 but not debited in "
                        f"bank1: {sorted(phantom)[:10]}")
    if wrong := sorted(t for t in debited & set(by_tx) if by_tx[t].outcome in NEVER_DEBITED):
        problems.append(f"{len(wrong)} transfers debited although their local transaction "
                        f"rolled back: {wrong[:10]}")
    expected1, expected2 = dict(start1), dict(start2)
    for tx_no in debited & set(by_tx):
        t = by_tx[tx_no]
        expected1[t.from_id] = expected1.get(t.from_id, D("0.00")) - t.money
    for tx_no in credited & set(by_tx):
        t = by_tx[tx_no]
        expected2[t.to_id] = expected2.get(t.to_id, D("0.00")) + t.money
    for bank, expected, actual in (("bank1", expected1, balances1), ("bank2", expected2, balances2)):
        for account_id in sorted(set(expected) | set(actual)):
            if expected.get(account_id) != actual.get(account_id):
                problems.append(f"{bank} account {account_id}: balance {actual.get(account_id)}, "
                                f"expected {expected.get(account_id)} from its tx_duplication rows")
    for account_id, balance in balances1.items():
        if balance < 0:
            problems.append(f"bank1 account {account_id} is overdrawn: {balance}")
    return problems
