"""Checks of the SDKs' numeric arguments: counts and numbers of seconds.

How this works
--------------
The constructors of ``Producer``, ``TransactionProducer``, ``PushConsumer`` and
``SimpleConsumer`` check their numeric options once, with these helpers, and so do the
calls that take a number per call (a send's ``delay``, a receive's ``max_messages``) when
the number is given. A value of the wrong type, NaN, an infinity or one out of range
raises ``TypeError`` or ``ValueError`` naming the argument at once, instead of failing
later: in ``start()``, inside the connection (a number msgpack cannot encode), or never
(a worker task per unit of a huge ``concurrency``).

A count is an ``int`` (or anything with ``__index__``), never a ``bool``; a number of
seconds is an ``int`` or a finite ``float``, never a ``bool``.
"""

from __future__ import annotations

import math
import operator
from typing import Any

__all__ = ["MAX_CONCURRENCY", "MAX_PREFETCH", "check_count", "check_seconds"]

#: Most listener calls one client runs at once: ``PushConsumer(concurrency=...)`` (one worker
#: task each, and as many threads for a plain ``def`` listener) and the listener threads of a
#: ``TransactionProducer`` (``check_workers``, ``execute_workers``). More are better spread
#: over several consumers or processes.
MAX_CONCURRENCY = 1024

#: Largest ``prefetch`` (``PushConsumer``) and ``max_messages`` (``SimpleConsumer.receive``)
#: the SDK sends. The broker refuses what is over its own ``--max-prefetch`` (default 4096,
#: configurable) with ``LimitExceededError``; this bound only keeps absurd values out.
MAX_PREFETCH = 1 << 20


def check_count(value: Any, name: str, low: int, high: int | None = None) -> int:
    """``value`` as an ``int`` from ``low`` to ``high`` (None: no upper bound).

    Raises ``TypeError`` if it is not an integer (a ``bool`` is not one here) and
    ``ValueError`` if it is out of range; both name the argument ``name``.
    """
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, not a bool")
    try:
        number = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, not {type(value).__name__}") from None
    if number < low or (high is not None and number > high):
        bound = f">= {low}" if high is None else f"from {low} to {high}"
        raise ValueError(f"{name} must be {bound}, got {number}")
    return number


def check_seconds(value: Any, name: str, *, low: float = 0.0, high: float | None = None,
                  positive: bool = False) -> float:
    """``value`` as a finite number of seconds from ``low`` (above 0 if ``positive``) to
    ``high`` (None: no upper bound), as a ``float``.

    Raises ``TypeError`` if it is not a number (a ``bool`` is not one here) and
    ``ValueError`` if it is NaN, infinite or out of range; both name the argument ``name``.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number of seconds, not {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number of seconds, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
    if value < low or (high is not None and value > high):
        if high is None:
            bound = f">= {low:g}"
        elif low == -math.inf:
            bound = f"at most {high:g}"
        else:
            bound = f"from {low:g} to {high:g}"
        raise ValueError(f"{name} must be {bound} seconds, got {value!r}")
    try:
        return float(value)
    except OverflowError:  # an int beyond any float
        raise ValueError(f"{name} is too large a number of seconds") from None
