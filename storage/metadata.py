"""Small, slow-changing state in SQLite (via aiosqlite): key/value pairs and topics.

How this works: ``<data_dir>/meta.sqlite`` in WAL mode holds a ``kv`` table (values are
msgpack-encoded) and a ``topics`` table. The store keeps its epoch, segment size and
recovery checkpoint here; the broker keeps topics, group offsets and the like. It is never
written per message.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiosqlite
import msgpack

__all__ = ["Metadata"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS topics (name TEXT PRIMARY KEY, queues INTEGER NOT NULL);
"""


def _enc(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def _dec(raw: bytes) -> Any:
    return msgpack.unpackb(raw, raw=False, strict_map_key=False)


class Metadata:
    """Async key/value store on SQLite. Open with :meth:`open`, finish with :meth:`close`."""

    def __init__(self, db: aiosqlite.Connection, path: Path) -> None:
        self._db = db
        self.path = path

    @classmethod
    async def open(cls, path: str | Path) -> Metadata:
        """Open (creating if needed) the database file at ``path``."""
        db = await aiosqlite.connect(str(path))
        try:
            await db.execute("PRAGMA journal_mode=WAL")
            await db.execute("PRAGMA synchronous=NORMAL")
            await db.executescript(_SCHEMA)
            await db.commit()
        except BaseException:
            await db.close()
            raise
        return cls(db, Path(path))

    async def get(self, key: str, default: Any = None) -> Any:
        """The value stored under ``key``, or ``default``."""
        async with self._db.execute("SELECT value FROM kv WHERE key = ?", (key,)) as cur:
            row = await cur.fetchone()
        return default if row is None else _dec(row[0])

    async def put(self, key: str, value: Any) -> None:
        """Store ``value`` (msgpack-able) under ``key``."""
        await self.put_many({key: value})

    async def put_many(self, items: dict[str, Any]) -> None:
        """Store several keys in one transaction."""
        await self._db.executemany(
            "INSERT INTO kv (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            [(k, _enc(v)) for k, v in items.items()],
        )
        await self._db.commit()

    async def items(self, prefix: str) -> dict[str, Any]:
        """Every key starting with ``prefix`` with its value."""
        async with self._db.execute(
            "SELECT key, value FROM kv WHERE substr(key, 1, ?) = ? ORDER BY key", (len(prefix), prefix)
        ) as cur:
            rows = await cur.fetchall()
        return {k: _dec(v) for k, v in rows}

    async def delete(self, key: str) -> None:
        """Remove ``key`` (no error if absent)."""
        await self._db.execute("DELETE FROM kv WHERE key = ?", (key,))
        await self._db.commit()

    async def get_topics(self) -> dict[str, int]:
        """Every topic with its queue count."""
        async with self._db.execute("SELECT name, queues FROM topics ORDER BY name") as cur:
            rows = await cur.fetchall()
        return {name: int(q) for name, q in rows}

    async def put_topic(self, name: str, queues: int) -> None:
        """Create or update a topic."""
        await self._db.execute(
            "INSERT INTO topics (name, queues) VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET queues = excluded.queues",
            (name, queues),
        )
        await self._db.commit()

    async def delete_topic(self, name: str) -> None:
        """Remove a topic (its log data stays until retention)."""
        await self._db.execute("DELETE FROM topics WHERE name = ?", (name,))
        await self._db.commit()

    async def close(self) -> None:
        """Close the database. Idempotent."""
        if self._db is not None:
            db, self._db = self._db, None  # type: ignore[assignment]  # (closed: no further use)
            await db.close()
