"""A dead letter resent to a group that has its own, shorter retry ladder.

A resent message's retry record goes to ``EXPIRED_LEVEL``, which every group reads with
no delay (it once went to level ``len(config.retry_delays)``, the broker's ladder, which
a group with a shorter ladder of its own never read).
"""

from __future__ import annotations

import pytest

from consumer_sdk import ConsumeResult, PushConsumer
from producer_sdk import Producer
from tests.conftest import wait_for
from tests.webhooks.conftest import api

pytestmark = pytest.mark.timeout(30)


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
