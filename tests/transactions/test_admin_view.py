"""The admin view of a committed transactional message (a bug found, not fixed here)."""

from __future__ import annotations

import asyncio

import pytest

from consumer_sdk import PushConsumer
from producer_sdk import LocalTransactionState, TransactionListener, TransactionProducer
from tests.conftest import wait_for
from tests.sdk.schedule_helpers import Arrivals, admin

pytestmark = pytest.mark.timeout(30)


class _CommitLater(TransactionListener):
    async def execute_local_transaction(self, message, arg):
        await asyncio.sleep(0.05)  # the commit comes a few ms after the half message is stored
        return LocalTransactionState.COMMIT

    async def check_local_transaction(self, message):
        return LocalTransactionState.COMMIT


async def test_view_of_a_committed_transaction_shows_the_group_acked(broker):
    rec = Arrivals()
    async with PushConsumer(broker.address, group="g", topic="txview", listener=rec):
        async with TransactionProducer(broker.address, group="pg", listener=_CommitLater()) as tp:
            r = await tp.send_in_transaction("txview", b"x")
        await wait_for(lambda: rec.messages, what="the committed message")

    async def acked() -> bool:
        _status, view = admin(broker.http_url, f"/api/messages/{r.msg_id}")
        return view["groups"]["g"]["state"] == "acked"

    await wait_for(acked, timeout=2, what="the view to show the group's ack")
