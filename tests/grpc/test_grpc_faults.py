"""A broker serving gRPC killed with ``kill -9`` while official clients hold leases and a
transaction is unresolved; delayed messages (when the engine schedules them)."""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.grpc.conftest import Clients, message
from tests.grpc.test_grpc_consume import code_of, receive_one
from tests.grpc.test_grpc_produce import receive_all

pytestmark = pytest.mark.timeout(90)


def _schedules() -> bool:
    from broker.config import BrokerConfig
    from broker.engines.embedded import EmbeddedEngine

    return hasattr(EmbeddedEngine, "recall") and hasattr(BrokerConfig, "max_delay")


needs_delay = pytest.mark.skipif(not _schedules(), reason="delayed messages (SEND options delay/at, RECALL) are "
                                 "not in this engine yet: the gRPC front end answers DELAY sends UNSUPPORTED")


def once_reachable(call: Any, deadline: float = 20.0) -> BaseException:
    """The exception ``call`` raises once the broker is reachable again: the client's
    channel reconnects with a back-off after the broker was down (UNAVAILABLE meanwhile)."""
    import grpc

    end = time.monotonic() + deadline
    while True:
        try:
            call()
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > end:
                return exc
            time.sleep(0.1)  # the channel's own reconnect back-off: nothing to poll on
        except Exception as exc:
            return exc
        else:
            raise AssertionError("the call succeeded")


def test_kill9_with_leases_and_a_half_message_outstanding(rmq, grpc_broker_process):
    broker, address = grpc_broker_process("--tx-timeout", "1s", "--tx-check-interval", "300ms")
    clients = Clients(rmq, address)
    try:
        p = clients.producer("k9")
        ids = [p.send(message(rmq, "k9", f"m{i}")).message_id for i in range(3)]
        half = p.send(message(rmq, "k9", "half"), p.begin_transaction()).message_id  # no outcome
        c = clients.simple("g-k9", "k9")
        leased = receive_one(c, 60)  # leased for a minute, not acked
        clients.shutdown(p)
        broker.kill9()
        broker.start()  # same data directory and ports

        err = once_reachable(lambda: c.ack(leased))  # a handle of the previous run is stale
        assert code_of(err) == 40013
        checked: list[str] = []

        class Commit(rmq.TransactionChecker):
            def check(self, m: Any) -> Any:
                checked.append(m.message_id)
                return rmq.TransactionResolution.COMMIT

        clients.producer("k9", checker=Commit())  # the restarted producer resolves the orphan
        got = receive_all(c, 4, deadline=30)
        assert sorted(m.message_id for m in got) == sorted([*ids, half])
        assert checked == [half]
        assert {m.message_id: m.delivery_attempt for m in got}[leased.message_id] == 1  # never acked: again
        assert c.receive(32, 10) == []
    finally:
        clients.close()


@needs_delay
def test_kill9_with_a_scheduled_message_outstanding(rmq, grpc_broker_process):
    broker, address = grpc_broker_process()
    clients = Clients(rmq, address)
    try:
        p = clients.producer("k9d")
        due = int(time.time()) + 3
        sent = p.send(message(rmq, "k9d", "later", delivery_timestamp=due)).message_id
        clients.shutdown(p)
        broker.kill9()
        broker.start()
        c = clients.simple("g-k9d", "k9d", wait=2)
        (m,) = receive_all(c, 1, deadline=30)
        assert m.message_id == sent and time.time() >= due - 0.01
    finally:
        clients.close()


@needs_delay
async def test_delayed_message_is_delivered_at_its_time_and_can_be_recalled(rmq, clients):
    import asyncio

    def run() -> None:
        p = clients.producer("delay-t")
        due = int(time.time()) + 2
        kept = p.send(message(rmq, "delay-t", "kept", delivery_timestamp=due))
        gone = p.send(message(rmq, "delay-t", "gone", delivery_timestamp=due))
        assert gone.recall_handle
        p.recall_message("delay-t", gone.recall_handle)
        c = clients.simple("g-delay", "delay-t", wait=1)
        assert c.receive(32, 10) == []  # not yet due
        (m,) = receive_all(c, 1)
        assert m.message_id == kept.message_id and time.time() >= due - 0.01
        assert c.receive(32, 10) == []  # the recalled one never comes

    await asyncio.to_thread(run)
