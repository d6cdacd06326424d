"""The embedded engine: everything in one local data directory (``storage/``)."""

from broker.engines.embedded.engine import EmbeddedEngine

__all__ = ["EmbeddedEngine"]
