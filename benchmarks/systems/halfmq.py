"""halfmq: a broker subprocess per cell with a fresh data dir; the public SDKs as clients.

Durability: ``--flush sync`` acknowledges a send only after its record is fsynced (group
commit); ``--flush async`` acknowledges after the write and fsyncs every 200 ms.

``halfmq-secure`` is ``--flush sync`` with security on: a user with a SCRAM-SHA-256 login
(made in the data dir before the broker starts) and TLS on both ports, with a test CA
made by ``trustme`` for the run; every client logs in over TLS. ``halfmq-trace`` is
``--flush sync`` with ``--trace`` (every delivery attempt and sender logged).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import urllib.request
from typing import Any

from benchmarks.systems.base import Client as BaseClient
from benchmarks.systems.base import OnBody
from benchmarks.systems.base import Server as BaseServer
from producer_sdk import LocalTransactionState

__all__ = ["Server", "Client", "start_broker", "BrokerProcess"]

READY_PREFIX = "halfmq broker ready "
FIFO_GROUPS = tuple(f"group-{i}" for i in range(1000))
START_TIMEOUT = 20.0


class BrokerProcess:
    """One ``python -m broker`` subprocess (optionally under cProfile)."""

    def __init__(self, proc: asyncio.subprocess.Process, address: str, data_dir: str,
                 own_dir: bool, stderr_path: str, http: str = "") -> None:
        self.proc = proc
        self.address = address
        self.http = http
        self.data_dir = data_dir
        self.own_dir = own_dir
        self.stderr_path = stderr_path

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, wait (SIGKILL after ``timeout``), delete the data dir we created."""
        proc = self.proc
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if self.own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)
        return proc.returncode


def _open_log(path: str) -> Any:
    return open(path, "wb")  # noqa: SIM115 - handed to the subprocess, closed by the caller


def _read_tail(path: str, size: int = 2000) -> str:
    with open(path, errors="replace") as f:
        return f.read()[-size:]


async def start_broker(flush: str = "sync", *, workdir: str | None = None,
                       extra: list[str] | None = None,
                       profile_out: str | None = None,
                       users: dict[str, tuple[str, list[tuple[str, str, str | None]]]] | None = None) -> BrokerProcess:
    """Start a broker on free ports with a fresh data dir under ``workdir`` (default: the
    system temp dir); return once it printed its ready line. ``profile_out``: run it under
    cProfile and write the stats there when it stops. ``users``: {name: (password,
    [(right, topic, group), ...])} written into the data dir first."""
    data_dir = tempfile.mkdtemp(prefix="halfmq-bench-", dir=workdir)
    if users:
        from broker.security.cli import add_users_offline

        await add_users_offline(data_dir, users)
    cmd = [sys.executable]
    if profile_out:
        cmd += ["-m", "cProfile", "-o", profile_out]
    cmd += ["-m", "broker", "--port", "0", "--http-port", "0", "--data-dir", data_dir,
            "--flush", flush, *(extra or [])]
    stderr_path = data_dir + ".log"
    err = _open_log(stderr_path)
    try:
        proc = await asyncio.create_subprocess_exec(
            *cmd, stdout=asyncio.subprocess.PIPE, stderr=err, stdin=asyncio.subprocess.DEVNULL
        )
    finally:
        err.close()
    assert proc.stdout is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), START_TIMEOUT)
    except TimeoutError:
        line = b""
    text = line.decode(errors="replace").strip()
    if not text.startswith(READY_PREFIX):
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        tail = _read_tail(stderr_path)
        shutil.rmtree(data_dir, ignore_errors=True)
        raise RuntimeError(f"broker did not start ({text!r}); stderr:\n{tail}")
    fields = dict(part.split("=", 1) for part in text[len(READY_PREFIX):].split())
    return BrokerProcess(proc, fields["tcp"], data_dir, True, stderr_path, fields.get("http", ""))


class _Secure:
    """A CA and a server certificate for 127.0.0.1 (trustme, files in a temp dir) and the
    benchmark's user, for ``halfmq-secure``."""

    USER, PASSWORD = "bench", "bench-password"
    GRANTS: list[tuple[str, str, str | None]] = [("publish", "*", "*"), ("subscribe", "*", "*"), ("read", "*", None)]

    def __init__(self) -> None:
        import trustme

        self.dir = tempfile.mkdtemp(prefix="halfmq-bench-tls-")
        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1")
        self.ca_file = os.path.join(self.dir, "ca.pem")
        self.cert_file = os.path.join(self.dir, "server.pem")
        self.key_file = os.path.join(self.dir, "server.key")
        ca.cert_pem.write_to_path(self.ca_file)
        cert.cert_chain_pems[0].write_to_path(self.cert_file)
        cert.private_key_pem.write_to_path(self.key_file)

    def broker_args(self) -> list[str]:
        return ["--tls-cert", self.cert_file, "--tls-key", self.key_file]

    def conn(self) -> dict[str, Any]:
        return {"user": self.USER, "password": self.PASSWORD, "ca_file": self.ca_file}


def topic_name(cell: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", f"bench_{cell}")[:120]


class Server(BaseServer):
    scenarios = frozenset({"publish", "latency", "e2e", "batch", "tx", "fifo", "pull",
                           "publish-users", "e2e-users", "e2e-users-default", "pull-users",
                           "tx-users", "tx-users-wal", "tx-users-inline", "tx-users-batch",
                           "tx-users-batch-wal"})
    client_module = "halfmq"

    def __init__(self, flush: str = "sync", *, profile_dir: str | None = None,
                 profiler: str = "cprofile", secure: bool = False, trace: bool = False) -> None:
        self.flush = flush
        self.name = "halfmq-secure" if secure else "halfmq-trace" if trace else f"halfmq-{flush}"
        self.durability = (
            "fsync before ack (group commit)" if flush == "sync"
            else "ack after write, fsync every 200 ms"
        ) + ("; SCRAM login + TLS" if secure else "") + ("; --trace (delivery events logged)" if trace else "")
        self.trace = trace
        self.secure = _Secure() if secure else None
        self.profile_dir = profile_dir
        self.profiler = profiler
        self.broker: BrokerProcess | None = None
        self.spy: asyncio.subprocess.Process | None = None
        self.profiles: list[str] = []

    async def start_cell(self, cell: str, workdir: str) -> dict[str, Any]:
        out = None
        if self.profile_dir and self.profiler == "cprofile":
            out = os.path.join(self.profile_dir, f"profile-{topic_name(cell)}.prof")
            self.profiles.append(out)
        sec = self.secure
        self.broker = await start_broker(
            self.flush, workdir=workdir, profile_out=out,
            extra=[*(sec.broker_args() if sec else []), *(["--trace"] if self.trace else [])],
            users={sec.USER: (sec.PASSWORD, sec.GRANTS)} if sec else None)
        if self.profile_dir and self.profiler == "py-spy":
            out = os.path.join(self.profile_dir, f"profile-{topic_name(cell)}.pyspy.txt")
            self.profiles.append(out)
            self.spy = await asyncio.create_subprocess_exec(
                "py-spy", "record", "--pid", str(self.broker.pid), "--rate", "250",
                "--format", "raw", "--output", out, "--nonblocking",
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
            await asyncio.sleep(0.3)  # let it attach
        return {"address": self.broker.address, "topic": topic_name(cell), **(sec.conn() if sec else {})}

    async def stop_cell(self) -> None:
        if self.broker is not None:
            broker, self.broker = self.broker, None
            await broker.stop()
            with contextlib.suppress(OSError):
                os.unlink(broker.stderr_path)
        if self.spy is not None:
            spy, self.spy = self.spy, None
            try:
                await asyncio.wait_for(spy.wait(), 30)
            except TimeoutError:
                spy.kill()
                await spy.wait()

    def server_pids(self) -> list[int]:
        return [self.broker.pid] if self.broker is not None else []

    async def loop_disk_wait_seconds(self) -> float | None:
        if self.broker is None or not self.broker.http:
            return None
        sec = self.secure
        url = f"{'https' if sec else 'http'}://{self.broker.http}/api/stats"
        headers = {}
        ctx = None
        if sec is not None:
            import base64
            import ssl

            ctx = ssl.create_default_context(cafile=sec.ca_file)
            raw = f"{sec.USER}:{sec.PASSWORD}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(raw).decode()

        def fetch() -> float:
            req = urllib.request.Request(url, headers=headers)
            with urllib.request.urlopen(req, timeout=5, context=ctx) as r:
                return json.loads(r.read())["store"]["loop_disk_wait_ns"] / 1e9

        try:
            return await asyncio.to_thread(fetch)
        except (OSError, ValueError, KeyError):
            return None


class _NoopTransaction:
    """A local transaction that does nothing and commits."""

    async def execute_local_transaction(self, message: Any, arg: Any) -> Any:
        return LocalTransactionState.COMMIT

    async def check_local_transaction(self, message: Any) -> Any:
        return LocalTransactionState.COMMIT


def sqlite_create(path: str, wal: bool = False) -> None:
    """The tx-users listeners' database at ``path``: its table, and with ``wal`` the database
    switched to WAL mode (a setting of the file: done once, here, because switching while
    other connections write can fail with "database is locked")."""
    import sqlite3

    with sqlite3.connect(path, timeout=30.0) as db:
        if wal:
            db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE IF NOT EXISTS transfers (msg_id TEXT PRIMARY KEY, body_len INTEGER)")


def sqlite_connect(path: str, wal: bool = False) -> Any:
    """A connection to the SQLite database at ``path`` (made by :func:`sqlite_create`) as the
    tx-users listeners open it: SQLite's defaults (rollback journal, ``synchronous=FULL``: a
    commit waits for its fsyncs), or with ``wal`` the setting SQLite recommends for WAL
    (``synchronous=NORMAL``: a commit is appended to the WAL without an fsync; the WAL is
    fsynced at checkpoints, so a power cut may lose the last commits, a crash of the
    application loses none)."""
    import sqlite3

    db = sqlite3.connect(path, timeout=30.0)
    if wal:
        db.execute("PRAGMA synchronous=NORMAL")
    return db


class _SqliteTransaction:
    """A local transaction as applications write it: a plain ``def`` (the SDK runs it in a
    worker thread) that inserts one row into an SQLite database and commits (an fsync per
    commit, SQLite's defaults; with ``wal``, see :func:`sqlite_connect`), then commits the half
    message; the check-back looks the row up."""

    def __init__(self, path: str, wal: bool = False) -> None:
        import threading

        self.path = path
        self.wal = wal
        self.local = threading.local()
        sqlite_create(path, wal)

    def _db(self) -> Any:
        db = getattr(self.local, "db", None)
        if db is None:
            db = self.local.db = sqlite_connect(self.path, self.wal)
        return db

    def execute_local_transaction(self, message: Any, arg: Any) -> Any:
        db = self._db()
        with db:
            db.execute("INSERT INTO transfers VALUES (?, ?)", (message.msg_id, len(message.body)))
        return LocalTransactionState.COMMIT

    def check_local_transaction(self, message: Any) -> Any:
        row = self._db().execute("SELECT 1 FROM transfers WHERE msg_id = ?", (message.msg_id,)).fetchone()
        return LocalTransactionState.COMMIT if row else LocalTransactionState.ROLLBACK


class _SqliteBatches(_SqliteTransaction):
    """The batch form of :class:`_SqliteTransaction` (a ``BatchTransactionListener``): a
    batch of local transactions, one row each, in one SQLite transaction with one commit
    (the SDK runs it in one of its threads, one batch at a time)."""

    def execute_local_transaction_batch(self, batch: Any) -> Any:
        db = self._db()
        with db:
            db.executemany("INSERT INTO transfers VALUES (?, ?)",
                           [(message.msg_id, len(message.body)) for message, _ in batch])
        return [LocalTransactionState.COMMIT] * len(batch)


class Client(BaseClient):
    def __init__(self, conn: dict[str, Any]) -> None:
        super().__init__(conn)
        self.address = conn["address"]
        self.topic = conn["topic"]
        self.login: dict[str, Any] = {}
        if conn.get("user"):
            import ssl

            self.login = {"user": conn["user"], "password": conn["password"],
                          "tls": ssl.create_default_context(cafile=conn["ca_file"])}
        self.producer: Any = None
        self.consumer: Any = None

    async def open_producer(self, *, transactional: bool | str = False) -> None:
        """A producer; ``transactional`` True or "tx": a no-op local transaction; "tx-sqlite":
        one that writes a row to an SQLite database (see ``_SqliteTransaction``);
        "tx-sqlite-wal": the same with SQLite in WAL mode (see ``sqlite_connect``);
        "tx-sqlite-inline": "tx-sqlite-wal" with ``execute_workers=0`` (the listener, a plain
        ``def``, called on the event loop instead of in a thread); "tx-sqlite-batch" and
        "tx-sqlite-batch-wal": "tx-sqlite" and "tx-sqlite-wal" with a batch listener
        (``_SqliteBatches``: one commit per batch)."""
        from producer_sdk import (
            BatchTransactionListener,
            Producer,
            TransactionListener,
            TransactionProducer,
        )

        if isinstance(transactional, str) and transactional.startswith("tx-sqlite"):
            class Sqlite(_SqliteTransaction, TransactionListener):
                pass

            class SqliteBatches(_SqliteBatches, BatchTransactionListener):
                pass

            self._sqlite_dir = tempfile.mkdtemp(prefix="halfmq-bench-sqlite-")
            kind = SqliteBatches if transactional.startswith("tx-sqlite-batch") else Sqlite
            listener = kind(os.path.join(self._sqlite_dir, "bank.sqlite"),
                            wal=transactional not in ("tx-sqlite", "tx-sqlite-batch"))
            self.producer = TransactionProducer(
                self.address, group="bench_tx_producer", send_timeout=30.0, **self.login,
                listener=listener, execute_workers=0 if transactional == "tx-sqlite-inline" else None)
        elif transactional:
            class Noop(_NoopTransaction, TransactionListener):
                pass

            self.producer = TransactionProducer(self.address, group="bench_tx_producer",
                                                listener=Noop(), send_timeout=30.0, **self.login)
        else:
            self.producer = Producer(self.address, group="bench_producer", send_timeout=30.0, **self.login)
        await self.producer.start()
        self._send = self.producer.send
        self._topic = self.topic

    async def publish(self, body: bytes) -> None:
        await self._send(self._topic, body)

    async def publish_batch(self, bodies: list[bytes]) -> None:
        await self.producer.send_batch(self.topic, bodies)

    async def publish_tx(self, body: bytes) -> None:
        await self.producer.send_in_transaction(self.topic, body)

    async def publish_fifo(self, body: bytes) -> None:
        """One message of one of 1,000 message groups (round robin)."""
        self._n = n = getattr(self, "_n", -1) + 1
        await self._send(self._topic, body, message_group=FIFO_GROUPS[n % len(FIFO_GROUPS)])

    async def open_consumer(self, on_body: OnBody, *, prefetch: int, delay: float = 0.0,
                            mode: str = "push", concurrency: int | None = None) -> None:
        """A PushConsumer (``mode`` "push" or "fifo"; ``concurrency`` listener calls at a
        time, default 32) or a SimpleConsumer loop ("pull": ack each batch of 32 in one
        request; "pull-each": ack each message on its own, as a first program does)."""
        from consumer_sdk import ConsumeResult, PushConsumer

        if mode in ("pull", "pull-each"):
            await self._open_puller(on_body, each=mode == "pull-each")
            return
        success = ConsumeResult.SUCCESS
        if delay > 0:
            async def listener(message: Any) -> Any:
                await asyncio.sleep(delay)
                on_body(message.body)
                return success
            workers = 1
        else:
            async def listener(message: Any) -> Any:
                on_body(message.body)
                return success
            workers = concurrency or 32
        self.consumer = PushConsumer(self.address, group="bench_fifo" if mode == "fifo" else "bench_consumer",
                                     topic=self.topic, listener=listener, prefetch=prefetch,
                                     concurrency=workers, close_grace=2.0, fifo=mode == "fifo",
                                     **self.login)
        await self.consumer.start()

    async def _open_puller(self, on_body: OnBody, *, each: bool = False) -> None:
        """A SimpleConsumer loop: receive up to 32, hand each body on, ack the batch at once
        (``each``: ack every message with its own request, awaited in turn)."""
        from consumer_sdk import SimpleConsumer

        self.puller = SimpleConsumer(self.address, group="bench_pull", topic=self.topic, wait=1.0, **self.login)
        await self.puller.start()

        async def loop() -> None:
            while True:
                got = await self.puller.receive(max_messages=32)
                for m in got:
                    on_body(m.body)
                    if each:
                        await self.puller.ack(m)
                if got and not each:
                    await self.puller.ack_many(got)

        self.pull_task = asyncio.ensure_future(loop())

    async def close(self) -> None:
        if getattr(self, "pull_task", None) is not None:
            self.pull_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.pull_task
            await self.puller.close()
        if self.consumer is not None:
            await self.consumer.close()
        if self.producer is not None:
            await self.producer.close()
        if getattr(self, "_sqlite_dir", None) is not None:
            shutil.rmtree(self._sqlite_dir, ignore_errors=True)
