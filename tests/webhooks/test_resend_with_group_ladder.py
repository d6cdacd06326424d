"""A dead letter resent to a group that has its own, shorter retry ladder.

``EmbeddedAdmin.resend_from_dlq`` (broker/engines/embedded/admin.py) writes the resent
message's retry record at level ``len(config.retry_delays)`` — the broker's ladder — but
a group with its own ladder of n delays reads only levels 0..n and ``EXPIRED_LEVEL``
(``GroupDelivery._ensure_levels``): with n shorter than the broker's ladder the resent
message lands on a level nobody reads and is never delivered. (With a longer ladder it
waits that level's delay instead of none.)
"""

from __future__ import annotations

import pytest

from consumer_sdk import ConsumeResult, PushConsumer
from producer_sdk import Producer
from tests.conftest import wait_for
from tests.webhooks.conftest import api

pytestmark = pytest.mark.timeout(30)


@pytest.mark.xfail(strict=True, reason="resend_from_dlq uses the broker's ladder length as the retry level")
async def test_a_resent_dead_letter_reaches_a_group_with_a_short_ladder(broker):
    http = broker.http_url  # the broker's ladder: 200ms,400ms (two delays)
    await api("POST", f"{http}/api/groups/short/settings", {"max_attempts": 1, "retry_delays": "100ms"})
    healthy = False
    got: list = []

    async def listener(m):
        got.append(m)
        return ConsumeResult.SUCCESS if healthy else ConsumeResult.RECONSUME_LATER

    async with Producer(broker.address) as p, \
            PushConsumer(broker.address, group="short", topic="ladder", listener=listener):
        msg_id = (await p.send("ladder", b"x")).msg_id

        async def dead() -> bool:
            view = await api("GET", f"{http}/api/messages/{msg_id}")
            return view["groups"].get("short", {}).get("state") == "dead_lettered"

        await wait_for(dead, what="the dead letter")
        healthy = True
        await api("POST", f"{http}/api/dlq/short/messages/{msg_id}/resend")
        await wait_for(lambda: len(got) == 2, timeout=5, what="the resent message delivered")
