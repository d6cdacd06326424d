"""Per-group settings — FIFO, max delivery attempts, retry delays — as every engine keeps them.

How this works
--------------
An engine stores a group's settings as one map under ``groups/<name>`` in its settings
space; ``merge_group_settings`` checks a change against the limits and returns the new
map (a ``None`` leaves that setting as it is). What the settings do is the engine's.
"""

from __future__ import annotations

from typing import Any

from protocol import BadRequestError

__all__ = ["GROUP_SETTINGS_PREFIX", "merge_group_settings"]

GROUP_SETTINGS_PREFIX = "groups/"


def merge_group_settings(current: dict[str, Any], *, fifo: bool | None = None,
                         max_attempts: int | None = None,
                         retry_delays: list[float] | None = None) -> dict[str, Any]:
    """``current`` with the given changes; raises ``BadRequestError`` for out-of-range values."""
    if max_attempts is not None and not 1 <= max_attempts <= 1000:
        raise BadRequestError("max_attempts must be between 1 and 1000")
    if retry_delays is not None and (not retry_delays or len(retry_delays) > 64
                                     or any(not 0 <= d <= 7 * 86400 for d in retry_delays)):
        raise BadRequestError("retry_delays must hold 1 to 64 delays of 0 to 7 days")
    st = dict(current)
    if fifo is not None:
        st["fifo"] = fifo
    if max_attempts is not None:
        st["max_attempts"] = max_attempts
    if retry_delays is not None:
        st["retry_delays"] = [float(d) for d in retry_delays]
    return st
