"""Failpoints: crash points for fault tests, off unless ``HALFMQ_FAILPOINT`` names one.

How this works
--------------
A failpoint is a named place in the code (``hit("after-decision", detail)``) where a
test can make the process die at once, as ``kill -9`` would there: no cleanup, no flush,
no reply. ``HALFMQ_FAILPOINT=NAME`` arms the point ``NAME`` for the first time it is
passed, ``HALFMQ_FAILPOINT=NAME:N`` for the N-th time (so a test can let a load warm up
first). When it fires the process writes one line to standard error (``halfmq failpoint
NAME fired: DETAIL``) and calls ``os._exit(FAILPOINT_EXIT_STATUS)``.

The variable is read once, at import. Unset (always, outside tests) ``hit`` returns after
one comparison. Points:

- ``after-decision``: a gateway recorded a COMMIT decision in the engine (won, not a
  repeat) and has not published the commit pointer yet (``TxLedger.end``, cluster mode;
  the detail is the transaction's msg_id).
"""

from __future__ import annotations

import os
import sys

__all__ = ["FAILPOINT_EXIT_STATUS", "POINTS", "hit"]

#: the exit status of a process stopped by a failpoint
FAILPOINT_EXIT_STATUS = 86
#: every failpoint in the code
POINTS = frozenset({"after-decision"})


def _parse(spec: str) -> tuple[str | None, int]:
    name, _, count = spec.strip().partition(":")
    if not name:
        return None, 0
    if name not in POINTS:
        raise ValueError(f"HALFMQ_FAILPOINT: no failpoint called {name!r} (known: {sorted(POINTS)})")
    try:
        n = int(count) if count else 1
    except ValueError:
        raise ValueError(f"HALFMQ_FAILPOINT: {count!r} is not a count") from None
    if n < 1:
        raise ValueError(f"HALFMQ_FAILPOINT: the count must be 1 or more, not {n}")
    return name, n


_ARMED, _LEFT = _parse(os.environ.get("HALFMQ_FAILPOINT", ""))


def hit(name: str, detail: str = "") -> None:
    """Pass the failpoint ``name``: exit at once if it is armed and its count is reached."""
    global _LEFT
    if name != _ARMED:
        return
    _LEFT -= 1
    if _LEFT > 0:
        return
    sys.stderr.write(f"halfmq failpoint {name} fired: {detail}\n")
    sys.stderr.flush()
    os._exit(FAILPOINT_EXIT_STATUS)
