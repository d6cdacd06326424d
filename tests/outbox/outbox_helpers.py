"""Helpers for the outbox tests: the databases, a producer that records every acknowledged
send (and can SIGKILL its own process right after one), a consumer that records what it
got, the per-key order check, and the relay as a subprocess.

Nothing here sleeps to wait for something: processes are awaited through their ready line
and their exit, and tests poll the database and the consumer with deadlines.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from consumer_sdk import ConsumeResult, Message, apply_once, create_dedup_table
from producer_sdk import Outbox, Producer
from producer_sdk.outbox import OUTBOX_ID

ROOT = Path(__file__).resolve().parents[2]


class OutboxDb:
    """One test database: ``url`` for ``Outbox.from_url`` and the relay's ``--db``;
    ``claim`` is the claim mode the tests ask relays for."""

    def __init__(self, kind: str, url: str, *, claim: str = "auto") -> None:
        self.kind, self.url, self.claim = kind, url, claim

    def __repr__(self) -> str:
        return f"OutboxDb({self.kind}, claim={self.claim})"

    def outbox(self, **options: Any) -> Outbox:
        return Outbox.from_url(self.url, **options)

    async def set_wal(self) -> None:
        async with self.outbox().connection() as conn:
            await conn.fetch("PRAGMA journal_mode=WAL")

    @contextlib.asynccontextmanager
    async def transaction(self, outbox: Outbox) -> AsyncIterator[Any]:
        """The application's own transaction: yields the driver's connection; commits at the
        end of the block, rolls back if it raises."""
        async with outbox.connection() as conn:
            await conn.begin()
            try:
                yield conn.raw
            except BaseException:
                await conn.rollback()
                raise
            await conn.commit()

    async def add_rows(self, outbox: Outbox, specs: Iterable[Mapping[str, Any]],
                       per_transaction: int = 10) -> list[int]:
        """Add rows (``topic``, ``body`` and ``add``'s keyword options) in transactions of
        ``per_transaction`` rows; return their ids."""
        specs = list(specs)
        ids: list[int] = []
        for i in range(0, len(specs), per_transaction):
            async with self.transaction(outbox) as conn:
                for spec in specs[i:i + per_transaction]:
                    spec = dict(spec)
                    ids.append(await outbox.add(conn, spec.pop("topic"), spec.pop("body"), **spec))
        return ids

    async def query(self, outbox: Outbox, sql: str, params: tuple[Any, ...] = ()) -> list[tuple]:
        """Run one statement on a connection of its own and commit."""
        async with outbox.connection() as conn:
            if conn.dialect != "postgres":
                await conn.begin()
            rows = await conn.fetch(sql, params)
            if conn.dialect != "postgres":
                await conn.commit()
            return rows

    async def statuses(self, outbox: Outbox) -> dict[int, str]:
        """``{id: status}`` of every row."""
        rows = await self.query(outbox, f"SELECT id, status FROM {outbox.table.t}")
        return {int(r[0]): r[1] for r in rows}


def spec(i: int, *, topic: str = "orders", keys: int = 10, **extra: Any) -> dict[str, Any]:
    """Row ``i``: business key ``row-i``, order key ``acct-(i % keys)``."""
    return {"topic": topic, "body": f"row {i}".encode(), "keys": [f"row-{i}"],
            "order_key": f"acct-{i % keys}", **extra}


# -- recording the relay's sends ------------------------------------------------------------


class RecordingProducer(Producer):
    """A real ``Producer`` whose every acknowledged ``send_batch`` is recorded: in ``calls``
    and, with ``log_path``, as one JSON line appended to that file (it survives a SIGKILL of
    this process). With ``kill_after=N`` the process SIGKILLs itself right after the N-th
    acknowledged call is recorded — before the relay can record the rows SENT."""

    def __init__(self, *args: Any, log_path: Path | None = None, kill_after: int = 0,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.kill_after = kill_after
        self.calls: list[dict[str, Any]] = []
        self._log = open(log_path, "a", buffering=1) if log_path else None  # noqa: SIM115

    async def send_batch(self, topic: str, items: Iterable[Any]) -> list[Any]:
        items = list(items)
        start = time.monotonic()
        results = await super().send_batch(topic, items)
        call = {"pid": os.getpid(), "start": start, "ack": time.monotonic(),
                "ids": [int(it["properties"][OUTBOX_ID]) for it in items],
                "msg_ids": [r.msg_id for r in results]}
        self.calls.append(call)
        if self._log is not None:  # line-buffered: in the kernel before any SIGKILL below
            self._log.write(json.dumps(call) + "\n")
        if self.kill_after and len(self.calls) == self.kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
        return results

    async def close(self) -> None:
        await super().close()
        if self._log is not None:
            self._log.close()


def read_calls(*paths: Path) -> list[dict[str, Any]]:
    calls = []
    for path in paths:
        if path.exists():
            calls += [json.loads(line) for line in path.read_text().splitlines() if line]
    return calls


def order_violations(calls: list[dict[str, Any]], key_of: Mapping[int, str | None]) -> list[str]:
    """Rows sent before an earlier row of their key was acknowledged.

    For rows ``a < b`` of one key, ``b``'s first send must come after ``a``'s first
    acknowledged send (or in the same ``send_batch``, after ``a``). ``calls`` may come
    from several processes: their monotonic clocks are the machine's one clock.
    """
    first: dict[int, tuple[float, float, int, int]] = {}
    for n, call in enumerate(sorted(calls, key=lambda c: c["ack"])):
        for pos, row_id in enumerate(call["ids"]):
            first.setdefault(row_id, (call["start"], call["ack"], n, pos))
    by_key: dict[str, list[int]] = defaultdict(list)
    for row_id in sorted(first):
        if key_of.get(row_id) is not None:
            by_key[key_of[row_id]].append(row_id)  # type: ignore[index]
    problems = []
    for key, ids in by_key.items():
        for a, b in zip(ids, ids[1:], strict=False):
            start_a, ack_a, call_a, pos_a = first[a]
            start_b, _ack_b, call_b, pos_b = first[b]
            if (call_a == call_b and pos_a < pos_b) or start_b >= ack_a:
                continue
            problems.append(f"key {key}: row {b} sent at {start_b:.4f} before row {a} "
                            f"was acknowledged at {ack_a:.4f}")
    return problems


# -- the consumer's side --------------------------------------------------------------------


@dataclass
class Collector:
    """A consumer listener recording, per outbox row, the distinct msg_ids delivered.

    With ``dedup_path`` it also applies each row once through ``apply_once`` (SQLite) by
    its business key, counting applications in ``applied``.
    """

    dedup_path: Path | None = None
    msg_ids: dict[int, set[str]] = field(default_factory=lambda: defaultdict(set))
    applied: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    deliveries: int = 0
    _conn: Any = None
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    async def _apply_once(self, key: str) -> None:
        import aiosqlite

        async with self._lock:  # one connection: one transaction at a time
            if self._conn is None:
                self._conn = await aiosqlite.connect(str(self.dedup_path), timeout=10,
                                                     isolation_level=None)
                await create_dedup_table(self._conn)

            async def work(_c: Any) -> None:
                self.applied[key] += 1

            await apply_once(self._conn, key, work)

    async def __call__(self, message: Message) -> ConsumeResult:
        self.deliveries += 1
        if self.dedup_path is not None:
            await self._apply_once(message.keys[0])
        self.msg_ids[int(message.properties[OUTBOX_ID])].add(message.msg_id)
        return ConsumeResult.SUCCESS

    def rows(self) -> set[int]:
        return set(self.msg_ids)

    def duplicated(self) -> set[int]:
        """Rows stored more than once (several distinct msg_ids)."""
        return {r for r, ids in self.msg_ids.items() if len(ids) > 1}


# -- the relay as a process -----------------------------------------------------------------


class RelayProcess:
    """``python -m tests.outbox.relay_proc`` (the library's relay, recording its sends to
    ``log_path``); ``kill_after=N`` makes it SIGKILL itself after its N-th acknowledged
    send, before recording it."""

    def __init__(self, db: OutboxDb, broker: str, log_path: Path, *, kill_after: int = 0,
                 batch_size: int = 50, lease: float = 1.0, send_timeout: float = 0.4,
                 extra: tuple[str, ...] = ()) -> None:
        self.cmd = [sys.executable, "-m", "tests.outbox.relay_proc", "--db", db.url,
                    "--broker", broker, "--log", str(log_path), "--claim", db.claim,
                    "--batch-size", str(batch_size), "--lease", str(lease),
                    "--send-timeout", str(send_timeout), "--kill-after", str(kill_after), *extra]
        self.stderr_path = log_path.with_suffix(".stderr")
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> RelayProcess:
        with open(self.stderr_path, "a") as err:
            self.proc = subprocess.Popen(self.cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=err,
                                         text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("relay_proc ready"):
            self.kill9()
            raise AssertionError(f"relay did not start: {line!r}; {self.stderr_path.read_text()}")
        return self

    def wait(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        code = self.proc.wait(timeout)
        self._close()
        return code

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self._close()

    def stop(self) -> int:
        """SIGTERM; return the exit status (0 when it stopped gracefully)."""
        return terminate(self.proc) if self.proc is not None else 0

    def _close(self) -> None:
        if self.proc is not None and self.proc.stdout is not None and not self.proc.stdout.closed:
            self.proc.stdout.close()


def terminate(proc: subprocess.Popen[str]) -> int:
    """SIGTERM ``proc`` (SIGKILL if it is still there after 20 s), close its stdout pipe and
    return its exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    if proc.stdout is not None and not proc.stdout.closed:
        proc.stdout.close()
    return proc.returncode


async def sent_ids(db: OutboxDb, outbox: Outbox) -> set[int]:
    return {i for i, s in (await db.statuses(outbox)).items() if s == "SENT"}


__all__ = ["OutboxDb", "RecordingProducer", "Collector", "RelayProcess",
           "order_violations", "read_calls", "spec", "sent_ids", "terminate"]
