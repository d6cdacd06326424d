"""TransactionProducer against a real broker: SPEC §6 T2-T5, T8, T10 and check-back."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import urllib.request

import pytest

from consumer_sdk import PushConsumer
from producer_sdk import (
    BrokerUnavailableError,
    InvalidNameError,
    LocalTransactionState,
    TopicNotFoundError,
    TransactionListener,
    TransactionProducer,
    TransactionStateError,
)
from tests.conftest import wait_for
from tests.sdk.sdk_helpers import Recorder

pytestmark = pytest.mark.timeout(30)

COMMIT, ROLLBACK, UNKNOWN = (LocalTransactionState.COMMIT, LocalTransactionState.ROLLBACK,
                             LocalTransactionState.UNKNOWN)


class Bank(TransactionListener):
    """Async listener: ``execute`` returns ``arg`` (or raises it); ``check`` answers ``checks``."""

    def __init__(self, check_answer: LocalTransactionState = COMMIT) -> None:
        self.executed: list = []
        self.checked: list = []
        self.check_answer = check_answer

    async def execute_local_transaction(self, message, arg):
        self.executed.append(message)
        if isinstance(arg, Exception):
            raise arg
        return arg

    async def check_local_transaction(self, message):
        self.checked.append(message)
        return self.check_answer


class ThreadedBank(TransactionListener):
    """Plain-def listener recording the threads its methods ran on."""

    def __init__(self, on_execute=None) -> None:
        self.threads: list[int] = []
        self.checked: list = []
        self.on_execute = on_execute

    def execute_local_transaction(self, message, arg):
        self.threads.append(threading.get_ident())
        if self.on_execute:
            self.on_execute()
        return arg

    def check_local_transaction(self, message):
        self.threads.append(threading.get_ident())
        self.checked.append(message)
        return COMMIT


@contextlib.asynccontextmanager
async def bank1_and_bank2(broker, bank: TransactionListener, rec: Recorder):
    """A transactional producer of group bank1 with ``bank`` as its listener, and a
    PushConsumer of group bank2 on topic tx handing messages to ``rec``; yields the producer."""
    async with (
        TransactionProducer(broker.address, group="bank1", listener=bank) as p,
        PushConsumer(broker.address, group="bank2", topic="tx", listener=rec),
    ):
        yield p


async def test_commit_delivered_rollback_never(broker):
    bank = Bank()
    rec = Recorder()
    async with bank1_and_bank2(broker, bank, rec) as p:
        rb = await p.send_in_transaction("tx", b"rolled back", arg=ROLLBACK)
        c = await p.send_in_transaction("tx", b"committed", arg=COMMIT, tags="T",
                                        keys=["tx-1"], properties={"p": "v"})
        assert (c.state, rb.state) == (COMMIT, ROLLBACK)
        await wait_for(lambda: c.msg_id in rec.ids(), what="the committed message")
        # a later plain message arrives; the rolled-back one still never does
        marker = await p.send("tx", b"marker")
        await wait_for(lambda: marker.msg_id in rec.ids(), what="the marker")
    m = next(m for m in rec.messages if m.msg_id == c.msg_id)
    assert (m.body, m.tags, m.keys, m.properties.get("p")) == (b"committed", "T", ("tx-1",), "v")
    assert rb.msg_id not in rec.ids()
    assert bank.executed[1].msg_id == c.msg_id and bank.executed[1].keys == ("tx-1",)
    assert not bank.checked


async def test_unknown_resolved_by_check_back(broker):
    bank = Bank(check_answer=COMMIT)
    rec = Recorder()
    async with bank1_and_bank2(broker, bank, rec) as p:
        r = await p.send_in_transaction("tx", b"later", arg=UNKNOWN)
        assert r.state is UNKNOWN and r.queue_offset == -1
        await wait_for(lambda: r.msg_id in rec.ids(), what="commit by check-back")
    assert bank.checked and bank.checked[0].msg_id == r.msg_id
    assert bank.checked[0].body == b"later" and bank.checked[0].topic == "tx"


async def test_check_back_rollback(broker):
    bank = Bank(check_answer=ROLLBACK)
    rec = Recorder()
    async with bank1_and_bank2(broker, bank, rec) as p:
        r = await p.send_in_transaction("tx", b"never", arg=UNKNOWN)
        await wait_for(lambda: bank.checked, what="a check-back")
        # recorded as rolled back, the message can never be delivered (T6 refuses a commit)
        await wait_for(lambda: _states(broker, r.msg_id) == ["rolled_back"], what="the rollback recorded")
        marker = await p.send("tx", b"marker")
        await wait_for(lambda: marker.msg_id in rec.ids(), what="the marker")
    assert r.msg_id not in rec.ids()


def _states(b, msg_id: str) -> list[str]:
    """The states the broker lists transaction ``msg_id`` in (its admin API)."""
    found = []
    for state in ("prepared", "committed", "rolled_back"):
        with urllib.request.urlopen(f"{b.http_url}/api/transactions?state={state}", timeout=5) as r:
            if any(t["msg_id"] == msg_id for t in json.loads(r.read())["transactions"]):
                found.append(state)
    return found


async def test_late_commit_after_check_back_rollback_raises(broker):
    # the local transaction outlives --tx-timeout; a check-back answers ROLLBACK and the
    # broker records it; then the local transaction returns COMMIT: refused (T6), so
    # send_in_transaction raises and the message is never delivered
    class Late(Bank):
        async def execute_local_transaction(self, message, arg):
            self.executed.append(message)
            await wait_for(lambda: _states(broker, message.msg_id) == ["rolled_back"],
                           what="the check-back's rollback recorded")
            return COMMIT

    bank = Late(check_answer=ROLLBACK)
    rec = Recorder()
    async with bank1_and_bank2(broker, bank, rec) as p:
        with pytest.raises(TransactionStateError):
            await p.send_in_transaction("tx", b"late commit")
        msg_id = bank.executed[0].msg_id
        assert _states(broker, msg_id) == ["rolled_back"]
        marker = await p.send("tx", b"marker")
        await wait_for(lambda: marker.msg_id in rec.ids(), what="the marker")
    assert msg_id not in rec.ids()


async def test_t5_execute_raises_reraised_and_check_back_decides(broker):
    bank = Bank(check_answer=COMMIT)
    rec = Recorder()
    async with bank1_and_bank2(broker, bank, rec) as p:
        with pytest.raises(ZeroDivisionError):
            await p.send_in_transaction("tx", b"boom", arg=ZeroDivisionError("db down"))
        assert len(bank.executed) == 1
        msg_id = bank.executed[0].msg_id
        await wait_for(lambda: msg_id in rec.ids(), what="commit by check-back")


async def test_t8_half_not_stored_listener_not_called(broker_factory):
    # refused by the SDK's own checks, by the broker, and with the broker gone after the
    # producer started: the half message is not stored and the local transaction never runs
    b = broker_factory("--no-auto-create-topics", "--tx-timeout", "1s", "--tx-check-interval", "200ms")
    bank = Bank()
    async with TransactionProducer(b.address, group="bank1", listener=bank, send_timeout=0.5) as p:
        for bad in ["bad topic", "%DLQ%g"]:
            with pytest.raises(InvalidNameError):
                await p.send_in_transaction(bad, b"x", arg=COMMIT)
        with pytest.raises(TopicNotFoundError):
            await p.send_in_transaction("no-such-topic", b"x", arg=COMMIT)
        assert not bank.executed
        assert _all_transactions(b) == []
        b.stop()
        with pytest.raises(BrokerUnavailableError):
            await p.send_in_transaction("no-such-topic", b"x", arg=COMMIT)
    assert not bank.executed
    b.start()
    assert _all_transactions(b) == []


def _all_transactions(b) -> list[dict]:
    """Every transaction the broker lists, in any state (its admin API)."""
    found = []
    for state in ("prepared", "committed", "rolled_back", "abandoned"):
        with urllib.request.urlopen(f"{b.http_url}/api/transactions?state={state}", timeout=5) as r:
            found += json.loads(r.read())["transactions"]
    return found


def _kill9_and_release(broker) -> None:
    """SIGKILL the broker and close its pipes (``start()`` opens new ones)."""
    broker.kill9()
    for stream in (broker.proc.stdout, broker.proc.stderr):
        if stream:
            stream.close()


@pytest.mark.timeout(60)
async def test_t10_outcome_lost_returns_state_and_check_back_resolves(broker):
    # the broker dies during the local transaction, so END_TX cannot reach it
    listener = ThreadedBank(on_execute=lambda: _kill9_and_release(broker))
    rec = Recorder()
    async with TransactionProducer(broker.address, group="bank1", listener=listener,
                                   send_timeout=1.0) as p:
        r = await p.send_in_transaction("tx", b"transfer", arg=COMMIT)
        assert r.state is COMMIT
        await asyncio.to_thread(broker.start)  # same ports, same data dir
        async with PushConsumer(broker.address, group="bank2", topic="tx", listener=rec):
            # cluster mode: a half the killed gateway had just fetched for checking comes
            # back after the engine's 10 s lease
            await wait_for(lambda: r.msg_id in rec.ids(), timeout=25, what="commit by check-back")
    assert listener.checked and listener.checked[0].msg_id == r.msg_id
    assert threading.get_ident() not in listener.threads


async def test_plain_def_listener_off_loop(broker):
    listener = ThreadedBank()
    rec = Recorder()
    async with (
        TransactionProducer(broker.address, group="bank1", listener=listener) as p,
        PushConsumer(broker.address, group="bank2", topic="tx", listener=rec),
    ):
        r = await p.send_in_transaction("tx", b"x", arg=UNKNOWN)
        await wait_for(lambda: r.msg_id in rec.ids(), what="commit by check-back")
    assert len(listener.threads) >= 2
    assert threading.get_ident() not in listener.threads


@pytest.mark.timeout(60)
async def test_check_back_reaches_producer_after_reconnect(broker):
    bank = Bank(check_answer=COMMIT)
    rec = Recorder()
    async with TransactionProducer(broker.address, group="bank1", listener=bank) as p:
        r = await p.send_in_transaction("tx", b"x", arg=UNKNOWN)
        await asyncio.to_thread(broker.restart)
        async with PushConsumer(broker.address, group="bank2", topic="tx", listener=rec):
            # cluster mode: a half fetched by a gateway as it stopped comes back after the
            # engine's 10 s lease
            await wait_for(lambda: r.msg_id in rec.ids(), timeout=25, what="commit by check-back")


async def test_malformed_end_tx_items_are_answered_one_by_one(broker):
    # each engine answers every item, a bad one with an error naming it (the cluster engine
    # raised inside its task on a non-pair item: the request got no reply at all)
    from protocol import Op
    from tests.broker.test_process import RawClient

    p = await RawClient.connect(broker.address, group="bank1")
    try:
        answer, reply = await p.request(Op.END_TX, {"items": [5, ["only-one"], [1, "COMMIT"], ["id", "MAYBE"],
                                                              ["unknown-id", "COMMIT"]]})
        assert answer == Op.REPLY, reply
        codes = [r[0] for r in reply["r"]]
        assert codes[:4] == [8, 8, 8, 8] and codes[4] == TransactionStateError.code, reply
        assert [r[1].split(":")[0] for r in reply["r"][:4]] == [f"END_TX item {i}" for i in range(4)]
    finally:
        p.close()
