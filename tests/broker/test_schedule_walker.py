"""The embedded engine's schedule walker on uvloop, the broker's event loop.

Asked to call back at a time already reached, uvloop returns a plain ``Handle`` (it runs
the callback at once), which has no ``when()``. The walker is armed again by every send
with a delivery time; once under load in CI it was armed for a time already passed and
then again in the same loop iteration, read ``when()`` off that handle, and the SEND's
flush failed with ``AttributeError``: the client got no reply.
"""

from __future__ import annotations

import asyncio
import time

import uvloop

from broker.core.schedule import ScheduleWheel
from broker.engines.embedded.scheduling import EmbeddedScheduling, wheel_slots


class _Walker:
    """What ``EmbeddedScheduling._arm_walker`` uses of the engine, with a real wheel."""

    _arm_walker = EmbeddedScheduling._arm_walker

    def __init__(self, cursor: int) -> None:
        self._stopping = False
        self._walk_handle: asyncio.Handle | None = None
        self._walk_at = 0.0
        self.schedule = ScheduleWheel(slots=wheel_slots(3600.0), cursor=cursor)
        self.walks = 0

    def _walk(self) -> None:
        self._walk_handle = None
        self.walks += 1


def test_arming_twice_for_a_time_already_reached() -> None:
    async def main() -> tuple[bool, int]:
        # the walker is behind (its next second to load has passed): due at once
        w = _Walker(cursor=int(time.time()) - 5)
        w._arm_walker()
        plain = not hasattr(w._walk_handle, "when")  # uvloop's Handle, not a TimerHandle
        w._arm_walker()  # a second send in the same iteration, before the walk ran
        deadline = time.monotonic() + 5
        while w.walks == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0)
        for _ in range(3):  # (a second timer, had one been armed, would run here too)
            await asyncio.sleep(0)
        return plain, w.walks

    plain, walks = uvloop.run(main())
    assert plain
    assert walks == 1
