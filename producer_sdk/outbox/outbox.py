"""``Outbox``: messages written in the application's own database transaction, relayed later.

How this works
--------------
The application writes its business change and, *in the same local transaction*, a row
of the outbox table (``add``). The row commits if and only if the business change does.
A relay (``relay()`` in the application, or ``halfmq outbox-relay`` as its own process)
then sends committed rows to the broker with ``Producer.send_batch`` and marks them SENT
(see ``producer_sdk.outbox.relay``)::

    async with db.transaction() as conn:                       # your transaction
        await debit(conn, ...)                                 # your statements
        await outbox.add(conn, "transfer", body, keys=[tx_no]) # one more row, same commit
    ...
    await outbox.relay(producer)                               # anywhere: runs until cancelled

``Outbox`` holds how to reach the database for the relay and for the operator calls
(``status``, ``failed``, ``retry_failed``, ``discard``); ``add`` and ``create_table`` use
the connection the application passes. Drivers: aiosqlite, aiomysql, asyncpg.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

from producer_sdk.outbox.plan import encode_keys, encode_properties
from producer_sdk.outbox.relay import OutboxRelay
from producer_sdk.outbox.sql import MYSQL, POSTGRES, SQLITE, Dialect, SqlConn, dialect_of
from producer_sdk.outbox.table import FailedRow, OutboxStatus, OutboxTable
from producer_sdk.producer import Producer
from protocol import validate_send_topic

__all__ = ["Outbox", "OUTBOX_TABLE", "OutboxTransactionError"]

#: Default name of the outbox table.
OUTBOX_TABLE = "halfmq_outbox"

_DEFAULT = object()


class OutboxTransactionError(RuntimeError):
    """``add`` was called on a connection with no open transaction: the row would commit on
    its own, apart from the business change it belongs to."""


OpenRaw = Callable[[], Awaitable[Any]]


class Outbox:
    """An outbox table in the application's database, and how to reach it.

    Build one with ``Outbox.sqlite(path)``, ``Outbox.mysql(url)``, ``Outbox.postgres(dsn)``
    or ``Outbox.from_url(url)``. Options (keyword-only): ``table`` [``"halfmq_outbox"``];
    ``archive`` — keep rows past their retention in ``<table>_archive`` instead of
    deleting them [False]; ``notify`` (PostgreSQL) — an insert trigger NOTIFYs relays so
    they wake at once [True].
    """

    def __init__(self, open_raw: OpenRaw, *, dialect: str, describe: str = "",
                 table: str = OUTBOX_TABLE, archive: bool = False, notify: bool = True) -> None:
        self._open_raw = open_raw
        self.dialect = dialect
        self.describe = describe or dialect
        self.notify = notify
        d = Dialect(dialect, table)
        self.table = OutboxTable(d, archive_table=f"{d.table}_archive" if archive else None)
        self._relays: set[OutboxRelay] = set()

    # -- construction ----------------------------------------------------------------------

    @classmethod
    def sqlite(cls, path: str, *, table: str = OUTBOX_TABLE, archive: bool = False,
               busy_timeout: float = 10.0) -> Outbox:
        """An outbox in the SQLite file at ``path``. ``busy_timeout``: seconds the relay
        waits for the application's write lock [10]. Use WAL mode
        (``PRAGMA journal_mode=WAL``) so the relay's reads never wait for your writes."""

        async def open_raw() -> Any:
            import aiosqlite

            return await aiosqlite.connect(path, timeout=busy_timeout, isolation_level=None)

        return cls(open_raw, dialect=SQLITE, describe=f"sqlite:{path}", table=table,
                   archive=archive)

    @classmethod
    def mysql(cls, url: str, *, table: str = OUTBOX_TABLE, archive: bool = False) -> Outbox:
        """An outbox in MySQL or MariaDB at ``mysql://user:password@host:3306/database``
        (aiomysql). The relay's sessions use READ COMMITTED."""
        u = urlsplit(url)
        if u.scheme not in ("mysql", "mysql+aiomysql") or not u.path.strip("/"):
            raise ValueError(f"{url!r}: expected mysql://user:password@host:3306/database")
        params = {"host": u.hostname or "127.0.0.1", "port": u.port or 3306,
                  "user": unquote(u.username or "root"), "password": unquote(u.password or ""),
                  "db": u.path.strip("/")}

        async def open_raw() -> Any:
            import aiomysql  # type: ignore[import-untyped]

            conn = await aiomysql.connect(**params, autocommit=False, connect_timeout=10)
            async with conn.cursor() as cur:
                await cur.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
            await conn.commit()
            return conn

        where = f"mysql://{params['user']}@{params['host']}:{params['port']}/{params['db']}"
        return cls(open_raw, dialect=MYSQL, describe=where, table=table, archive=archive)

    @classmethod
    def postgres(cls, dsn: str, *, table: str = OUTBOX_TABLE, archive: bool = False,
                 notify: bool = True) -> Outbox:
        """An outbox in PostgreSQL at ``dsn`` (``postgresql://user@host:5432/db``, asyncpg;
        query parameters such as ``?search_path=app`` become session settings)."""
        u = urlsplit(dsn)

        async def open_raw() -> Any:
            import asyncpg  # type: ignore[import-untyped]

            return await asyncpg.connect(dsn, timeout=10)

        where = f"postgresql://{u.username or ''}@{u.hostname or ''}:{u.port or 5432}{u.path}"
        return cls(open_raw, dialect=POSTGRES, describe=where, table=table, archive=archive,
                   notify=notify)

    @classmethod
    def from_url(cls, url: str, **options: Any) -> Outbox:
        """``mysql://...``, ``postgresql://...`` / ``postgres://...``, ``sqlite:path`` or a
        plain file path (SQLite). ``options`` go to the matching constructor."""
        if url.startswith(("mysql://", "mysql+aiomysql://")):
            return cls.mysql(url, **options)
        if url.startswith(("postgresql://", "postgres://")):
            return cls.postgres(url, **options)
        path = url[len("sqlite:"):] if url.startswith("sqlite:") else url
        if path.startswith("///"):
            path = path[3:]
        elif path.startswith("//"):
            path = path[2:]
        return cls.sqlite(path, **options)

    # -- the application's side ------------------------------------------------------------

    async def create_table(self, conn: Any = None) -> None:
        """Create the outbox table (and its indexes, archive table, NOTIFY trigger) if
        missing. ``conn``: a connection of yours with no open transaction on SQLite and
        MySQL (this commits); ``None`` opens one of the outbox's own. Idempotent."""
        if conn is not None:
            await self.table.create(SqlConn(conn), notify=self.notify)
            return
        async with self.connection() as own:
            await self.table.create(own, notify=self.notify)

    async def add(self, conn: Any, topic: str, body: bytes | str, *,
                  keys: str | Iterable[str] | None = None, tags: str | None = None,
                  properties: Mapping[str, str] | None = None,
                  order_key: Any = _DEFAULT) -> int:
        """Write one message into the outbox inside the transaction open on ``conn``;
        return the row's id. It neither begins nor commits.

        ``keys``: business keys (the consumer de-duplicates by them); ``order_key``: rows
        with the same order key are sent in the order they were added [the first of
        ``keys``; ``None``: no order]. Raises ``InvalidNameError`` for a bad or reserved
        topic, ``TypeError``/``ValueError`` for malformed fields,
        ``OutboxTransactionError`` if ``conn`` has no open transaction, and whatever the
        driver raises (let it roll your transaction back).
        """
        validate_send_topic(topic)
        if isinstance(body, str):
            data = body.encode("utf-8")
        elif isinstance(body, bytes | bytearray | memoryview):
            data = bytes(body)
        else:
            raise TypeError(f"message body must be bytes or str, not {type(body).__name__}")
        if tags is not None and (not isinstance(tags, str) or len(tags) > 255):
            raise TypeError("tags must be a str of at most 255 characters")
        keys_json = encode_keys(keys)
        if order_key is _DEFAULT:
            listed = [keys] if isinstance(keys, str) else list(keys or ())
            order_key = listed[0] if listed else None
        if order_key is not None and (not isinstance(order_key, str) or not 0 < len(order_key) <= 128):
            raise ValueError("order_key must be None or a str of 1 to 128 characters")
        props_json = encode_properties(properties)
        _require_transaction(conn)
        row_id = await self.table.insert(SqlConn(conn), topic, data, order_key, tags,
                                         keys_json, props_json)
        for relay in tuple(self._relays):
            relay.hint()
        return row_id

    # -- relaying --------------------------------------------------------------------------

    async def relay(self, producer: Producer, **options: Any) -> None:
        """Relay this outbox through ``producer`` until cancelled (see ``OutboxRelay`` for
        the options and what the relay guarantees). Returns only if cancelled (re-raised)
        or if ``OutboxTableMissingError`` is raised."""
        await OutboxRelay(self, producer, **options).run()

    # -- operators -------------------------------------------------------------------------

    async def open_connection(self) -> SqlConn:
        """A new connection of the outbox's own (no open transaction); close it when done."""
        return SqlConn(await self._open_raw())

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[SqlConn]:
        """``async with outbox.connection() as conn``: a connection of the outbox's own."""
        conn = await self.open_connection()
        try:
            yield conn
        finally:
            await conn.close()

    async def status(self) -> OutboxStatus:
        """Row counts by status and the age of the oldest pending row."""
        async with self.connection() as conn:
            return await self.table.status(conn)

    async def failed(self, *, limit: int = 100) -> list[FailedRow]:
        """FAILED rows, oldest first (at most ``limit``), each with its ``last_error``."""
        async with self.connection() as conn:
            return await self.table.failed_rows(conn, limit)

    async def retry_failed(self, ids: Sequence[int] | None = None) -> int:
        """Make FAILED rows pending again (all of them, or ``ids``); return how many."""
        return await self._change(lambda conn: self.table.retry_failed(conn, ids))

    async def discard(self, ids: Sequence[int]) -> int:
        """Give up on FAILED rows ``ids``: they become DISCARDED, are never sent, and later
        rows of their keys are sent. Returns how many rows changed."""
        return await self._change(lambda conn: self.table.discard(conn, list(ids)))

    async def _change(self, change: Callable[[SqlConn], Awaitable[int]]) -> int:
        async with self.connection() as conn:
            await conn.begin()
            try:
                count = await change(conn)
            except BaseException:
                with contextlib.suppress(Exception):
                    await conn.rollback()
                raise
            await conn.commit()
            return count


def _require_transaction(conn: Any) -> None:
    """Raise ``OutboxTransactionError`` if a row inserted on ``conn`` would commit by itself."""
    dialect = dialect_of(conn)
    raw = conn.raw if isinstance(conn, SqlConn) else conn
    if dialect == SQLITE:
        open_tx = raw.in_transaction or raw.isolation_level is not None
    elif dialect == MYSQL:
        open_tx = not raw.get_autocommit() or bool(raw.server_status & 1)  # IN_TRANS
    else:
        open_tx = raw.is_in_transaction()
    if not open_tx:
        raise OutboxTransactionError(
            "outbox.add() needs the transaction of your business change: begin one on this "
            "connection first (the row must commit, or roll back, with your own statements)")
