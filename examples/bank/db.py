"""The banks' databases: SQLite files by default, MySQL/MariaDB with ``--db mysql://...``.

Each bank owns one database with the tables of the original Spring example, plus the
helper tables of the SDK::

    t_account(id, account, balance DECIMAL(10,2))   -- the accounts
    tx_duplication(tx_no, create_time)              -- transfers applied here (by tx_no)
    halfmq_tx_log(msg_id, state, created_at)        -- bank1: what check-backs read
    halfmq_outbox(id, topic, body, ...)             -- bank1 in outbox mode: what the relay ships

Money is ``Decimal`` end to end. SQLite has no decimal type (a ``DECIMAL`` column would
store binary floats), so on SQLite the balance column holds the canonical text ``"80.00"``.
Arithmetic is always done in Python's ``Decimal`` on a row locked by the transaction
(``BEGIN IMMEDIATE`` on SQLite, ``SELECT ... FOR UPDATE`` on MySQL).

URLs: ``sqlite:///path/bank1.db``, ``sqlite:bank1.db`` or a plain file path; and
``mysql://user:pass@host:3306/name`` (the database is created if it is missing).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from aiohttp import web

from consumer_sdk.dedup import claim_key, create_dedup_table
from producer_sdk import Outbox
from producer_sdk.local_tx import TxLogChecker, create_tx_log
from producer_sdk.outbox import OUTBOX_TABLE

__all__ = [
    "CENT",
    "Account",
    "BankDatabase",
    "DbUrl",
    "account_routes",
    "parse_db_url",
    "parse_money",
]

CENT = Decimal("0.01")
#: Seconds a SQLite connection waits for another writer (busy timeout).
SQLITE_BUSY_TIMEOUT = 10.0


@dataclass(frozen=True)
class DbUrl:
    """A parsed ``--db`` value: ``kind`` is ``"sqlite"`` (``path``) or ``"mysql"``."""

    kind: str
    path: str = ""
    host: str = "127.0.0.1"
    port: int = 3306
    user: str = "root"
    password: str = ""
    database: str = ""

    def describe(self) -> str:
        """The URL without its password."""
        if self.kind == "sqlite":
            return f"sqlite:{self.path}"
        return f"mysql://{self.user}@{self.host}:{self.port}/{self.database}"


def parse_db_url(url: str) -> DbUrl:
    """Parse ``sqlite:...``, a file path, or ``mysql://user:pass@host:port/name``.

    Raises ``ValueError`` for a MySQL URL without a valid database name.
    """
    if url.startswith(("mysql://", "mysql+aiomysql://")):
        u = urlsplit(url)
        name = u.path.lstrip("/")
        if not re.fullmatch(r"[A-Za-z0-9_]{1,64}", name):
            raise ValueError(f"{url!r}: the database name must match [A-Za-z0-9_]{{1,64}}")
        return DbUrl("mysql", host=u.hostname or "127.0.0.1", port=u.port or 3306,
                     user=unquote(u.username or "root"), password=unquote(u.password or ""),
                     database=name)
    if url.startswith("sqlite:"):
        path = url[len("sqlite:"):]
        if path.startswith("///"):  # sqlite:///relative.db, sqlite:////absolute.db
            path = path[3:]
        elif path.startswith("//"):
            path = path[2:]
        return DbUrl("sqlite", path=path)
    return DbUrl("sqlite", path=url)


def parse_money(value: Any) -> Decimal:
    """A positive amount with at most two decimals, as ``Decimal``; ``ValueError`` otherwise.

    Floats are refused (send money as a string: ``"20"`` or ``"20.50"``).
    """
    if isinstance(value, bool) or isinstance(value, float):
        raise ValueError("money must be a string such as \"20.00\" (or an integer), never a float")
    try:
        amount = Decimal(str(value))
    except InvalidOperation:
        raise ValueError(f"money {value!r} is not a number") from None
    if not amount.is_finite() or amount <= 0:
        raise ValueError(f"money must be positive, got {value!r}")
    if amount != amount.quantize(CENT):
        raise ValueError(f"money {value!r} has more than two decimals")
    if amount >= Decimal("100000000"):
        raise ValueError(f"money {value!r} is too large")
    return amount.quantize(CENT)


@dataclass(frozen=True)
class Account:
    """One row of ``t_account``."""

    id: int
    account: str
    balance: Decimal

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "account": self.account, "balance": str(self.balance)}


def _money(value: Any) -> Decimal:
    return Decimal(str(value)).quantize(CENT)


class BankDatabase:
    """One bank's database: schema, seed rows, transactions and the queries the banks need.

    ``seed`` is ``[(id, account, balance), ...]`` inserted when the account is missing.
    Use ``async with BankDatabase(url, seed=...) as db`` or ``open()`` / ``close()``.
    """

    def __init__(self, url: str, *, seed: Iterable[tuple[int, str, str]] = ()) -> None:
        self.url = parse_db_url(url)
        self.seed = [(int(i), name, _money(b)) for i, name, b in seed]
        self._pool: Any = None

    @property
    def kind(self) -> str:
        return self.url.kind

    def _sql(self, sql: str) -> str:
        return sql if self.kind == "sqlite" else sql.replace("?", "%s")

    # -- lifecycle -------------------------------------------------------------------

    async def open(self, *, reset: bool = False) -> BankDatabase:
        """Create the database (MySQL) and the tables if missing, insert the seed rows.

        ``reset=True`` first drops this example's tables (the demo starts from scratch).
        """
        if self.kind == "mysql":
            import aiomysql

            u = self.url
            admin = await aiomysql.connect(host=u.host, port=u.port, user=u.user,
                                           password=u.password, autocommit=True)
            try:
                async with admin.cursor() as cur:
                    await cur.execute("SELECT 1 FROM information_schema.schemata "
                                      "WHERE schema_name = %s", (u.database,))
                    if not await cur.fetchall():
                        await cur.execute(f"CREATE DATABASE `{u.database}`")
            finally:
                admin.close()
            self._pool = await aiomysql.create_pool(
                host=u.host, port=u.port, user=u.user, password=u.password, db=u.database,
                autocommit=False, minsize=1, maxsize=10)
        async with self.connection() as conn:
            if reset:
                for table in ("t_account", "tx_duplication", "halfmq_tx_log", OUTBOX_TABLE,
                              OUTBOX_TABLE + "_archive"):
                    await self._exec(conn, f"DROP TABLE IF EXISTS {table}", notes=False)
                await conn.commit()
            if self.kind == "sqlite":
                await self._exec(conn, "PRAGMA journal_mode=WAL")
            balance_type = "TEXT" if self.kind == "sqlite" else "DECIMAL(10,2)"
            await self._exec(conn, "CREATE TABLE IF NOT EXISTS t_account ("
                                   "id INTEGER NOT NULL PRIMARY KEY, "
                                   "account VARCHAR(50) NOT NULL, "
                                   f"balance {balance_type} NOT NULL)", notes=False)
            await conn.commit()
            await create_dedup_table(conn, table="tx_duplication", key_column="tx_no",
                                     time_column="create_time")
            await create_tx_log(conn)
        for account_id, name, balance in self.seed:
            if await self.get_account(account_id) is None:
                await self.create_account(account_id, name, balance)
        return self

    async def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            await self._pool.wait_closed()
            self._pool = None

    async def __aenter__(self) -> BankDatabase:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def outbox(self) -> Outbox:
        """The outbox of this database (``halfmq_outbox``), for bank1's outbox mode."""
        u = self.url
        if self.kind == "sqlite":
            return Outbox.sqlite(u.path)
        return Outbox.mysql(f"mysql://{quote(u.user)}:{quote(u.password)}@{u.host}:{u.port}/"
                            f"{u.database}")

    def tx_log_checker(self) -> TxLogChecker:
        """The ready-made check-back for this database's ``halfmq_tx_log``."""
        if self.kind == "sqlite":
            return TxLogChecker.sqlite(self.url.path)
        return TxLogChecker.mysql(self._pool)

    # -- connections and transactions -------------------------------------------------

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[Any]:
        """A connection with no open transaction (aiosqlite in explicit mode, or aiomysql)."""
        if self.kind == "sqlite":
            import aiosqlite

            async with aiosqlite.connect(self.url.path, timeout=SQLITE_BUSY_TIMEOUT,
                                         isolation_level=None) as conn:
                yield conn
        else:
            assert self._pool is not None, "open() the database first"
            async with self._pool.acquire() as conn:
                try:
                    yield conn
                finally:
                    with contextlib.suppress(Exception):
                        await conn.rollback()

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Any]:
        """A write transaction: committed if the block ends normally, else rolled back."""
        async with self.connection() as conn:
            if self.kind == "sqlite":
                await conn.execute("BEGIN IMMEDIATE")
            else:
                await conn.begin()
            try:
                yield conn
            except BaseException:
                with contextlib.suppress(Exception):
                    await conn.rollback()
                raise
            await conn.commit()

    async def _exec(self, conn: Any, sql: str, params: tuple[Any, ...] = (),
                    *, notes: bool = True) -> list[tuple[Any, ...]]:
        if self.kind == "sqlite":
            cur = await conn.execute(sql, params)
            try:
                return list(await cur.fetchall())
            finally:
                await cur.close()
        async with conn.cursor() as cur:
            if not notes:  # "already exists" notes would surface as Python warnings
                await cur.execute("SET @@session.sql_notes = 0")
            try:
                await cur.execute(self._sql(sql), params)
                return list(await cur.fetchall())
            finally:
                if not notes:
                    await cur.execute("SET @@session.sql_notes = 1")

    # -- queries ------------------------------------------------------------------------

    async def lock_account(self, conn: Any, account_id: int) -> Account | None:
        """Read an account inside the transaction on ``conn``, locked until it ends."""
        suffix = "" if self.kind == "sqlite" else " FOR UPDATE"
        rows = await self._exec(conn, "SELECT id, account, balance FROM t_account WHERE id = ?"
                                + suffix, (account_id,))
        return Account(int(rows[0][0]), rows[0][1], _money(rows[0][2])) if rows else None

    async def set_balance(self, conn: Any, account_id: int, balance: Decimal) -> None:
        """Write a balance inside the transaction on ``conn``."""
        await self._exec(conn, "UPDATE t_account SET balance = ? WHERE id = ?",
                         (str(balance.quantize(CENT)), account_id))

    async def claim_tx_no(self, conn: Any, tx_no: str) -> bool:
        """Record ``tx_no`` in ``tx_duplication`` inside the transaction; ``False`` if present."""
        return await claim_key(conn, tx_no, table="tx_duplication", key_column="tx_no",
                               time_column="create_time")

    async def get_account(self, account_id: int) -> Account | None:
        async with self.connection() as conn:
            rows = await self._exec(conn, "SELECT id, account, balance FROM t_account "
                                          "WHERE id = ?", (account_id,))
        return Account(int(rows[0][0]), rows[0][1], _money(rows[0][2])) if rows else None

    async def accounts(self) -> list[Account]:
        async with self.connection() as conn:
            rows = await self._exec(conn, "SELECT id, account, balance FROM t_account ORDER BY id")
        return [Account(int(r[0]), r[1], _money(r[2])) for r in rows]

    async def total(self) -> Decimal:
        """The sum of all balances (computed in ``Decimal``)."""
        return sum((a.balance for a in await self.accounts()), Decimal("0.00"))

    async def create_account(self, account_id: int, name: str,
                             balance: Decimal = Decimal("0.00")) -> bool:
        """Insert an account; ``False`` if the id exists already."""
        async with self.transaction() as conn:
            if await self.lock_account(conn, account_id) is not None:
                return False
            await self._exec(conn, "INSERT INTO t_account (id, account, balance) VALUES (?, ?, ?)",
                             (account_id, name, str(_money(balance))))
        return True

    async def tx_numbers(self) -> set[str]:
        """Every ``tx_no`` in ``tx_duplication`` (transfers applied by this bank)."""
        async with self.connection() as conn:
            rows = await self._exec(conn, "SELECT tx_no FROM tx_duplication")
        return {r[0] for r in rows}


def account_routes(db: BankDatabase, bank: str) -> web.RouteTableDef:
    """``GET /v1/<bank>/accounts/{id}`` and ``POST /v1/<bank>/accounts`` (``{"id", "account"}``)."""
    routes = web.RouteTableDef()

    @routes.get(f"/v1/{bank}/accounts/{{id}}")
    async def get_account(req: web.Request) -> web.Response:
        try:
            account_id = int(req.match_info["id"])
        except ValueError:
            return web.json_response({"error": "the account id must be an integer"}, status=400)
        account = await db.get_account(account_id)
        if account is None:
            return web.json_response({"error": f"no account {account_id} in {bank}"}, status=404)
        return web.json_response(account.to_json())

    @routes.post(f"/v1/{bank}/accounts")
    async def create_account(req: web.Request) -> web.Response:
        try:
            data = await req.json()
            account_id, name = int(data["id"]), str(data["account"])
        except (ValueError, KeyError, TypeError):
            return web.json_response({"error": 'expected {"id": int, "account": str}'}, status=400)
        if not await db.create_account(account_id, name):
            return web.json_response({"error": f"account {account_id} exists"}, status=409)
        account = await db.get_account(account_id)
        assert account is not None  # (just created)
        return web.json_response(account.to_json(), status=201)

    return routes
