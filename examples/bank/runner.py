"""Running a bank service as a program: logging, uvloop, one event loop until it stops."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

__all__ = ["run_service"]


def run_service(name: str, main: Coroutine[Any, Any, Any]) -> int:
    """Configure logging for service ``name`` and run ``main`` on uvloop (if available)."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {name} %(levelname)s %(message)s")
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:  # pragma: no cover - uvloop is not on Windows
        runner = asyncio.Runner()
    with runner:
        runner.run(main)
    return 0
