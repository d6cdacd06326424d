"""The embedded engine's settings: keys under ``cfg/`` in the data directory's metadata.

``MetadataSettings`` implements the settings part of :class:`broker.engines.base.Engine`
over a ``storage.Metadata``; the engine uses it while it runs, and offline tools (``halfmq
user --data-dir``) use it on the same metadata, under the data directory's lock, while no
broker runs.
"""

from __future__ import annotations

from typing import Any

from storage import Metadata

__all__ = ["MetadataSettings", "SETTINGS_PREFIX"]

#: Settings live in the data directory's metadata under this prefix.
SETTINGS_PREFIX = "cfg/"


class MetadataSettings:
    """Settings on ``metadata`` (see the module docstring)."""

    def __init__(self, metadata: Metadata) -> None:
        self.metadata = metadata

    async def settings_get(self, key: str, default: Any = None) -> Any:
        """The value stored under ``key``, or ``default``."""
        return await self.metadata.get(SETTINGS_PREFIX + key, default)

    async def settings_put(self, key: str, value: Any) -> None:
        """Store ``value`` under ``key``, durably, before returning."""
        await self.metadata.put(SETTINGS_PREFIX + key, value)

    async def settings_delete(self, key: str) -> None:
        """Remove ``key`` (no error if absent)."""
        await self.metadata.delete(SETTINGS_PREFIX + key)

    async def settings_items(self, prefix: str) -> dict[str, Any]:
        """Every key starting with ``prefix``, with its value, in key order."""
        n = len(SETTINGS_PREFIX)
        return {k[n:]: v for k, v in (await self.metadata.items(SETTINGS_PREFIX + prefix)).items()}
