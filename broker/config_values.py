"""The values of broker options: durations, sizes, booleans, integers, strings.

How this works
--------------
One parser per kind of value, shared by every option of the same kind
(:mod:`broker.config`'s ``OPTIONS`` table) and by the admin API and webhooks, which take
the same kinds: ``parse_duration`` ("250ms", "6s", "1m30s" or bare seconds, to float
seconds) and its inverse ``format_duration``, ``parse_duration_list`` (comma list or TOML
array), ``parse_size`` (bytes, "512KiB", "4MiB", "4MB"), ``parse_bool`` (true/false, yes/no,
on/off, 1/0). Each takes a string or the matching TOML value and raises ``ValueError``
saying what it expected; :mod:`broker.config` turns that into a ``ConfigError`` naming the
option and where the value came from.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

__all__ = ["format_duration", "parse_bool", "parse_duration", "parse_duration_list", "parse_size"]


_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|s|m|h|d)")
_DURATION_HELP = "expected a duration like 250ms, 6s, 1m, 2h, 1m30s or bare seconds"


def _check_number(value: float, what: str, original: object) -> float:
    if math.isnan(value) or math.isinf(value):
        raise ValueError(f"invalid {what} {original!r}: must be a finite number")
    if value < 0:
        raise ValueError(f"invalid {what} {original!r}: must not be negative")
    return value


def parse_duration(s: str | int | float) -> float:
    """Return the duration ``s`` in float seconds.

    Accepts ``250ms``, ``6s``, ``1m``, ``2h``, ``1d``, combinations such as ``1m30s``, and
    bare seconds (``"1.5"``, ``3``, ``0.25``). Raises ``ValueError`` for anything else,
    including negative, infinite and NaN values and booleans.
    """
    if isinstance(s, bool):
        raise ValueError(f"invalid duration {s!r}: {_DURATION_HELP}")
    if isinstance(s, int | float):
        return _check_number(float(s), "duration", s)
    if not isinstance(s, str):
        raise ValueError(f"invalid duration {s!r}: {_DURATION_HELP}")
    text = s.strip().lower()
    if not text:
        raise ValueError(f"invalid duration {s!r}: empty; {_DURATION_HELP}")
    if text.startswith("-"):
        raise ValueError(f"invalid duration {s!r}: must not be negative")
    try:
        bare = float(text)
    except ValueError:
        pass
    else:
        return _check_number(bare, "duration", s)
    total = 0.0
    pos = 0
    while pos < len(text):
        match = _DURATION_PART.match(text, pos)
        if match is None:
            raise ValueError(f"invalid duration {s!r}: {_DURATION_HELP}")
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    return _check_number(total, "duration", s)


def format_duration(seconds: float) -> str:
    """Return a short human form of ``seconds`` that ``parse_duration`` reads back (``"1m"``)."""
    for unit, factor in (("h", 3600.0), ("m", 60.0), ("s", 1.0)):
        if seconds >= factor and (seconds / factor).is_integer():
            return f"{int(seconds / factor)}{unit}"
    if seconds < 1 and (seconds * 1000).is_integer():
        return f"{int(seconds * 1000)}ms"
    return f"{seconds:g}s"


def parse_duration_list(s: str | int | float | Sequence[str | int | float]) -> tuple[float, ...]:
    """Return a comma-separated list (``"10s,30s,1m"``) or a sequence of durations as seconds.

    Raises ``ValueError`` if the list is empty or any item is not a valid duration.
    """
    if isinstance(s, str):
        items: list[Any] = [part.strip() for part in s.split(",")]
        if items == [""]:
            items = []
    elif isinstance(s, int | float) and not isinstance(s, bool):
        items = [s]
    elif isinstance(s, Sequence):
        items = list(s)
    else:
        raise ValueError(f"invalid duration list {s!r}: expected e.g. '10s,30s,1m'")
    if not items:
        raise ValueError("invalid duration list: must contain at least one duration")
    out = []
    for i, item in enumerate(items, 1):
        if isinstance(item, str) and not item.strip():
            raise ValueError(f"invalid duration list {s!r}: item {i} is empty")
        out.append(parse_duration(item))
    return tuple(out)


_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1024, "kib": 1024, "kb": 1000,
    "m": 1024**2, "mib": 1024**2, "mb": 1000**2,
    "g": 1024**3, "gib": 1024**3, "gb": 1000**3,
}
_SIZE_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)")
_SIZE_HELP = "expected bytes like 4194304, 512KiB, 4MiB, 4MB or 1GiB"


def parse_size(s: str | int) -> int:
    """Return the size ``s`` in bytes.

    Accepts a bare integer (``4194304``) or a number with a unit: ``B``; ``KiB``/``MiB``/``GiB``
    (powers of 1024, also written ``K``/``M``/``G``); ``KB``/``MB``/``GB`` (powers of 1000).
    Units are case-insensitive. Raises ``ValueError`` for anything else, negative values,
    and sizes that are not a whole number of bytes.
    """
    if isinstance(s, bool):
        raise ValueError(f"invalid size {s!r}: {_SIZE_HELP}")
    if isinstance(s, int):
        if s < 0:
            raise ValueError(f"invalid size {s!r}: must not be negative")
        return s
    if not isinstance(s, str):
        raise ValueError(f"invalid size {s!r}: {_SIZE_HELP}")
    text = s.strip().lower()
    if text.startswith("-"):
        raise ValueError(f"invalid size {s!r}: must not be negative")
    match = _SIZE_RE.fullmatch(text)
    if match is None or match.group(2) not in _SIZE_UNITS:
        raise ValueError(f"invalid size {s!r}: {_SIZE_HELP}")
    value = float(match.group(1)) * _SIZE_UNITS[match.group(2)]
    if not value.is_integer():
        raise ValueError(f"invalid size {s!r}: not a whole number of bytes")
    return int(value)


_TRUE = {"1", "true", "yes", "on", "y"}
_FALSE = {"0", "false", "no", "off", "n"}


def parse_bool(s: str | bool | int) -> bool:
    """Return ``s`` as a bool: ``true/false``, ``1/0``, ``yes/no``, ``on/off`` (any case)."""
    if isinstance(s, bool):
        return s
    if isinstance(s, int) and s in (0, 1):
        return bool(s)
    if isinstance(s, str):
        text = s.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
    raise ValueError(f"invalid boolean {s!r}: expected true/false, 1/0, yes/no or on/off")


def _parse_int(s: str | int) -> int:
    if isinstance(s, bool):
        raise ValueError(f"invalid integer {s!r}")
    if isinstance(s, int):
        return s
    if isinstance(s, str):
        try:
            return int(s.strip())
        except ValueError:
            pass
    raise ValueError(f"invalid integer {s!r}: expected a whole number like 4")


def _parse_str(s: str) -> str:
    if not isinstance(s, str):
        raise ValueError(f"invalid value {s!r}: expected a string")
    return s
