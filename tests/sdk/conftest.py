"""Every test here runs on both engines (tests.engines): the embedded broker and cluster mode."""

from tests.engines import broker_factory

__all__ = ["broker_factory"]
