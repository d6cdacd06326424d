"""Scheduled and delayed messages, and RECALL, on ``JetStreamEngine`` (a real cluster)."""

from __future__ import annotations

import asyncio
import time

import pytest

from protocol.errors import BadRequestError, MessageStateError
from tests.cluster.sessions import RecordingSession, Sub
from tests.cluster.test_engine import _ack, _end, _holds, _ids, _rows, _send, _subscribe
from tests.conftest import wait_for

pytestmark = pytest.mark.timeout(90)


class TimedSession(RecordingSession):
    """Records the wall-clock time (epoch ms) each delivery arrived."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.arrived: list[int] = []

    def deliver(self, items) -> None:
        super().deliver(items)
        self.arrived += [int(time.time() * 1000)] * len(items)


def _at(row: list, **opts) -> list:
    return [*row, opts]


async def _recall(engine, s, msg_id):
    rid = s.rid()
    engine.recall(s, rid, msg_id)
    await wait_for(lambda: s.answered(rid), timeout=20, what="recall reply")
    if rid in s.errors:
        raise s.errors[rid]
    return s.replies[rid]


async def test_scheduled_messages_never_early_then_delivered(engine_factory, unique):
    engine = await engine_factory()
    p = RecordingSession(role="producer")
    c = TimedSession(role="consumer")
    await _subscribe(engine, c, Sub("g", unique))
    now = int(time.time() * 1000)
    due = [now + 1200, now + 1500]
    rows = [_at(r, at=d) for r, d in zip(_rows(b"s1", b"s2", tags="T"), due, strict=True)]
    reply = await _send(engine, p, unique, rows + _rows(b"now", tags="T"))
    ids = _ids(reply)
    assert [r[2] for r in reply["r"][:2]] == [-1, -1] and reply["r"][2][2] == reply["r"][2][0]
    await wait_for(lambda: c.deliveries, what="the plain message")
    assert c.deliveries[0][1][2] == b"now"
    await wait_for(lambda: len(c.deliveries) == 3, timeout=15, what="the scheduled messages")
    for (_token, wire), arrived in zip(c.deliveries[1:], c.arrived[1:], strict=True):
        i = ids.index(wire[0])  # the id the SEND reply gave
        assert wire[2] == (b"s1", b"s2")[i] and wire[3] == "T"
        assert wire[11] == {"at": due[i]}
        assert arrived >= due[i], f"delivered {due[i] - arrived} ms early"
    await _ack(engine, c, [(t, True) for t, _w in c.deliveries])
    found = await engine.admin_message(ids[0])
    assert found is not None and found["msg_id"] == ids[0]
    # cluster mode difference (README): not due before the engine's retention drops it
    with pytest.raises(BadRequestError, match="--retention"):
        engine.send(p, p.rid(), unique, [_at(_rows(b"x")[0], at=now + int(engine.config.retention * 1000))],
                    False)


async def test_recall_before_due_and_its_refusals(engine_factory, unique):
    engine = await engine_factory()
    p = RecordingSession(role="producer", group=f"pg{unique}")
    engine.producer_hello(p)
    c = RecordingSession(role="consumer")
    await _subscribe(engine, c, Sub("g", unique))
    due = int(time.time() * 1000) + 1500
    recalled, kept = _ids(await _send(engine, p, unique, [_at(r, at=due) for r in _rows(b"gone", b"kept")]))
    (plain,) = _ids(await _send(engine, p, unique, _rows(b"plain")))
    (half,) = _ids(await _send(engine, p, unique, [_at(r, delay=500) for r in _rows(b"h")], half=True))
    view = await engine.admin_scheduled(unique)
    assert view["scheduled"] == 2 and view["topics"] == {unique: 2} and view["complete"]
    assert [(n["msg_id"], n["deliver_at"]) for n in view["next"]] in ([(recalled, due), (kept, due)],
                                                                       [(kept, due), (recalled, due)])
    assert await _recall(engine, p, recalled) == {"state": "RECALLED"}
    assert await _recall(engine, p, recalled) == {"state": "RECALLED"}  # again: the same answer
    topics = {t["topic"]: t for t in await engine.admin_topics()}
    assert topics[unique]["scheduled"] == 1 and topics[unique]["messages"] == 1  # the plain one
    for bad, says in ((plain, "not scheduled"), (half, "roll its transaction back"),
                      ("00000000" + "0" * 15 + "1", "no message"), ("junk", "no message")):
        with pytest.raises(MessageStateError, match=says):
            await _recall(engine, p, bad)
    await wait_for(lambda: len(c.deliveries) == 2, timeout=15, what="the plain and the kept message")
    await _ack(engine, c, [(t, True) for t, _w in c.deliveries])
    await _holds(lambda: len(c.deliveries) == 2, max(0.0, (due - time.time() * 1000) / 1000) + 0.6)
    assert sorted(w[0] for _t, w in c.deliveries) == sorted([plain, kept])
    with pytest.raises(MessageStateError, match="already delivered"):
        await _recall(engine, p, kept)


async def test_delayed_transaction_counts_from_its_commit(engine_factory, unique):
    engine = await engine_factory(tx_timeout=60.0)  # no check-back interferes
    p = RecordingSession(role="producer", group=f"pg{unique}")
    engine.producer_hello(p)
    c = TimedSession(role="consumer")
    await _subscribe(engine, c, Sub("g", unique))
    (msg_id,) = _ids(await _send(engine, p, unique, [_at(r, delay=800, group="order-1")
                                                    for r in _rows(b"tx", tags="T")], half=True))
    await asyncio.sleep(0.5)  # the delay must count from the commit, not from the send
    committed_at = int(time.time() * 1000)
    assert await _end(engine, p, [(msg_id, "COMMIT")]) == {"state": "COMMITTED"}
    await wait_for(lambda: c.deliveries, timeout=15, what="the delayed transaction")
    (_token, wire), = c.deliveries
    assert wire[0] == msg_id and wire[2] == b"tx"
    assert wire[11]["g"] == "order-1" and wire[11]["at"] >= committed_at + 800
    assert c.arrived[0] >= committed_at + 800
    # a rolled-back delayed transaction is never scheduled
    (other,) = _ids(await _send(engine, p, unique, [_at(r, delay=300) for r in _rows(b"no")], half=True))
    assert await _end(engine, p, [(other, "ROLLBACK")]) == {"state": "ROLLED_BACK"}
    await _holds(lambda: len(c.deliveries) == 1, 0.8)


async def test_delayed_transaction_committed_by_a_check_back(engine_factory, unique):
    engine = await engine_factory(tx_timeout=0.5, tx_check_interval=0.5)
    asked: list[int] = []

    def answer(_wire):
        asked.append(int(time.time() * 1000))
        return "COMMIT"

    p = RecordingSession(role="producer", group=f"pg{unique}", check_answer=answer)
    engine.producer_hello(p)
    c = TimedSession(role="consumer")
    await _subscribe(engine, c, Sub("g", unique))
    (msg_id,) = _ids(await _send(engine, p, unique, [_at(r, delay=700) for r in _rows(b"checked")], half=True))
    await wait_for(lambda: c.deliveries, timeout=20, what="the message committed by the check-back")
    assert c.deliveries[0][1][0] == msg_id and asked
    assert c.arrived[0] >= asked[0] + 700  # counted from the commit, which came with the answer


async def test_a_topic_stream_made_before_schedules_existed_is_updated(engine_factory, unique):
    from broker.engines.jetstream import naming

    engine = await engine_factory()
    name = naming.topic_stream(unique)
    await engine.client.api(f"STREAM.CREATE.{name}", engine.streams._config(name, [f"hmq.{unique}.>"], 3600))
    p, c = RecordingSession(role="producer"), RecordingSession(role="consumer")
    await _subscribe(engine, c, Sub("g", unique))
    due = int(time.time() * 1000) + 300
    (msg_id,) = _ids(await _send(engine, p, unique, [_at(_rows(b"later")[0], at=due)]))
    await wait_for(lambda: c.deliveries, timeout=15, what="the scheduled message")
    assert c.deliveries[0][1][0] == msg_id
    assert (await engine.client.api(f"STREAM.INFO.{name}"))["config"]["allow_msg_schedules"] is True
