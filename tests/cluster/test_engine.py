"""``JetStreamEngine`` through the engine boundary, with in-memory sessions, on a real cluster."""

from __future__ import annotations

import asyncio
import time

import pytest

from protocol.errors import TransactionStateError
from tests.cluster.sessions import RecordingSession, Sub
from tests.conftest import wait_for

pytestmark = pytest.mark.timeout(90)


def _rows(*bodies: bytes, tags: str | None = None, keys=()) -> list[list]:
    return [[b, tags, list(keys), {}, 1234] for b in bodies]


async def _holds(predicate, seconds: float) -> None:
    """Assert ``predicate`` stays true for ``seconds`` while the loop runs (a negative check)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        assert predicate()
        await asyncio.sleep(0.02)


async def _send(engine, s, topic, rows, half=False) -> dict:
    rid = s.rid()
    engine.send(s, rid, topic, rows, half)
    await wait_for(lambda: s.answered(rid), timeout=20, what="send reply")
    if rid in s.errors:
        raise s.errors[rid]
    return s.replies[rid]


def _ids(reply: dict) -> list[str]:
    return [reply["p"] + f"{r[0]:016X}" for r in reply["r"]]


async def _end(engine, s, items, single=True):
    rid = s.rid()
    engine.end_tx(s, rid, items, single)
    await wait_for(lambda: s.answered(rid), timeout=20, what="end_tx reply")
    if rid in s.errors:
        raise s.errors[rid]
    return s.replies[rid]


async def _subscribe(engine, s, sub) -> None:
    rid = s.rid()
    engine.subscribe(s, rid, sub)
    await wait_for(lambda: s.answered(rid), timeout=20, what="subscribe reply")
    assert rid in s.replies, s.errors.get(rid)


async def _ack(engine, s, acks) -> None:
    rid = s.rid()
    engine.ack(s, rid, acks)
    await wait_for(lambda: s.answered(rid), timeout=20, what="ack reply")
    assert rid in s.replies, s.errors.get(rid)


async def test_send_replies_the_native_shape_once_stored(engine_factory, unique):
    engine = await engine_factory()
    p = RecordingSession(role="producer", group=f"pg{unique}")
    engine.producer_hello(p)
    reply = await _send(engine, p, unique, _rows(b"a", b"b", b"c", tags="T"))
    assert len(reply["p"]) == 8 and int(reply["p"], 16) >= 0
    assert [r[1] for r in reply["r"]] == [0, 1, 2] and all(r[0] == r[2] for r in reply["r"])
    for msg_id in _ids(reply):  # stored: readable by id from the engine
        found = await engine.admin_message(msg_id)
        assert found["msg_id"] == msg_id and found["topic"] == unique and found["tags"] == "T"
    half = await _send(engine, p, unique, _rows(b"h"), half=True)
    assert half["r"][0][2] == -1
    assert engine.stats["sent"] == 4


async def test_end_tx_rules_and_delivery_of_commits_only(engine_factory, unique):
    engine = await engine_factory(tx_timeout=60.0)  # no check-back interferes
    p = RecordingSession(role="producer", group=f"pg{unique}")
    engine.producer_hello(p)
    c = RecordingSession(role="consumer")
    await _subscribe(engine, c, Sub("g", unique))
    committed, rolled = _ids(await _send(engine, p, unique, _rows(b"yes", b"no", keys=["k"]), half=True))
    assert await _end(engine, p, [(committed, "COMMIT")]) == {"state": "COMMITTED"}
    assert await _end(engine, p, [(committed, "COMMIT")]) == {"state": "COMMITTED"}  # T6 repeat
    with pytest.raises(TransactionStateError):
        await _end(engine, p, [(committed, "ROLLBACK")])
    many = await _end(engine, p, [(rolled, "ROLLBACK"), (committed, "ROLLBACK"), ("bogus", "COMMIT")],
                      single=False)
    assert many["r"][0] == "ROLLED_BACK"
    assert many["r"][1][0] == TransactionStateError.code and many["r"][2][0] == TransactionStateError.code
    await wait_for(lambda: c.deliveries, what="the committed message")
    (token, wire), = c.deliveries
    assert wire[0] == committed and wire[2] == b"yes" and wire[4] == ["k"]  # T9
    await _ack(engine, c, [(token, True)])
    await _holds(lambda: len(c.deliveries) == 1, 1.0)  # T3: the rollback never shows


async def test_prefetch_bounds_unacked_deliveries(engine_factory, unique):
    engine = await engine_factory()
    p = RecordingSession(role="producer")
    await _send(engine, p, unique, _rows(*[b"%d" % i for i in range(10)]))
    c = RecordingSession(role="consumer")
    await _subscribe(engine, c, Sub("g", unique, prefetch=3))
    await wait_for(lambda: len(c.deliveries) == 3, what="three deliveries")
    await _holds(lambda: len(c.deliveries) == 3, 0.5)  # no more until acked
    seen = []
    while len(seen) < 10:
        batch = c.deliveries[len(seen):]
        if not batch:
            await wait_for(lambda n=len(seen): len(c.deliveries) > n, what="more deliveries")
            continue
        seen += batch
        await _ack(engine, c, [(t, True) for t, _w in batch])
        assert len(c.deliveries) - len(seen) <= 3
    assert sorted(w[2] for _t, w in seen) == sorted(b"%d" % i for i in range(10))


async def test_retry_ladder_then_dead_letter(engine_factory, unique):
    engine = await engine_factory(retry_delays=(0.5, 0.8))
    p = RecordingSession(role="producer")
    (msg_id,) = _ids(await _send(engine, p, unique, _rows(b"poison", tags="X")))
    c = RecordingSession(role="consumer")
    await _subscribe(engine, c, Sub(f"g{unique}", unique, max_reconsume_times=1))
    await wait_for(lambda: c.deliveries, what="first delivery")
    token, wire = c.deliveries[0]
    assert wire[10] == 0
    failed_at = time.monotonic()
    await _ack(engine, c, [(token, False)])  # RECONSUME_LATER: back after retry_delays[0]
    await wait_for(lambda: len(c.deliveries) == 2, what="redelivery")
    assert time.monotonic() - failed_at >= 0.45
    token2, wire2 = c.deliveries[1]
    assert wire2[0] == msg_id and wire2[10] == 1
    await _ack(engine, c, [(token2, False)])  # the last allowed attempt failed: DLQ (C4)
    d = RecordingSession(role="consumer")
    await _subscribe(engine, d, Sub("reader", f"%DLQ%g{unique}"))
    await wait_for(lambda: d.deliveries, what="the dead letter")
    dead = d.deliveries[0][1]
    assert dead[0] == msg_id and dead[2] == b"poison" and dead[5]["ORIGIN_TOPIC"] == unique
    assert len(c.deliveries) == 2


async def test_lease_expiry_goes_to_another_member(engine_factory, unique):
    engine = await engine_factory(ack_timeout=1.0)
    p = RecordingSession(role="producer")
    (msg_id,) = _ids(await _send(engine, p, unique, _rows(b"lease")))
    first = RecordingSession(role="consumer")
    await _subscribe(engine, first, Sub("g", unique))
    await wait_for(lambda: first.deliveries, what="delivery to the first member")
    first.closed = True  # dies without acking
    engine.session_closed(first)
    second = RecordingSession(role="consumer")
    await _subscribe(engine, second, Sub("g", unique))
    await wait_for(lambda: second.deliveries, timeout=10, what="redelivery after the lease")
    token, wire = second.deliveries[0]
    assert wire[0] == msg_id and wire[10] == 1  # counts as an attempt (C5)
    await _ack(engine, second, [(token, True)])


async def test_check_back_commits_an_unresolved_half(engine_factory, unique):
    engine = await engine_factory()
    p = RecordingSession(role="producer", group=f"pg{unique}", check_answer=lambda w: "COMMIT")
    engine.producer_hello(p)
    c = RecordingSession(role="consumer")
    await _subscribe(engine, c, Sub("g", unique))
    (msg_id,) = _ids(await _send(engine, p, unique, _rows(b"ask me"), half=True))
    await wait_for(lambda: c.deliveries, timeout=20, what="the checked-back commit")
    assert c.deliveries[0][1][0] == msg_id
    assert p.checks and p.checks[0][0] == msg_id and p.checks[0][2] == b"ask me"
    assert (await engine.admin_message(msg_id))["transaction"]["state"] == "COMMITTED"


async def test_unknown_answers_abandon_and_unreached_checks_are_not_counted(engine_factory, unique):
    engine = await engine_factory(tx_check_max=2)
    group = f"pg{unique}"
    sender = RecordingSession(role="producer", group=group)
    engine.producer_hello(sender)
    (msg_id,) = _ids(await _send(engine, sender, unique, _rows(b"unknown"), half=True))
    sender.closed = True
    engine.session_closed(sender)  # no producer of the group anywhere: checks are not counted
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        assert (await engine.ledger.checks(msg_id))[0] == 0
    assert await engine.ledger.decision(msg_id) is None
    asker = RecordingSession(role="producer", group=group, check_answer=lambda w: "UNKNOWN")
    engine.producer_hello(asker)
    await wait_for(lambda: engine.ledger.decision(msg_id), timeout=20, what="abandonment")
    assert await engine.ledger.decision(msg_id) == "A"
    assert len(asker.checks) == 2 and (await engine.ledger.checks(msg_id))[0] == 2
    with pytest.raises(TransactionStateError, match="ABANDONED"):
        await _end(engine, asker, [(msg_id, "COMMIT")])


async def test_admin_views_and_settings(engine_factory, unique):
    from broker.core.lifecycle import TxState

    engine = await engine_factory(tx_timeout=60.0)
    p = RecordingSession(role="producer", group=f"pg{unique}")
    engine.producer_hello(p)
    await _send(engine, p, unique, _rows(b"one", b"two", keys=["k1"]))
    (half_id,) = _ids(await _send(engine, p, unique, _rows(b"h", keys=["k2"]), half=True))
    topics = {t["topic"]: t for t in await engine.admin_topics()}
    assert topics[unique]["messages"] == 2 and topics[unique]["half_messages"] == 1
    found = await engine.admin_find(unique, "k1")
    assert sorted(f["body"] for f in found) == ["one", "two"]
    prepared = [t for t in await engine.admin_transactions(TxState.PREPARED) if t["topic"] == unique]
    assert [t["msg_id"] for t in prepared] == [half_id]
    await engine.admin_resolve(half_id, TxState.COMMITTED)
    assert any(t["msg_id"] == half_id for t in await engine.admin_transactions(TxState.COMMITTED))
    assert (await engine.admin_message(half_id))["transaction"]["state"] == "COMMITTED"
    assert await engine.admin_message("0" * 24) is None
    c = RecordingSession(role="consumer")
    await _subscribe(engine, c, Sub(f"g{unique}", unique))
    await wait_for(lambda: len(c.deliveries) == 3, what="deliveries")
    groups = {g["group"]: g for g in await engine.admin_groups()}
    assert groups[f"g{unique}"]["in_flight"] == 3 and groups[f"g{unique}"]["members"] == 1
    # settings: shared by every gateway, survive them
    key = f"users/{unique}"
    await engine.settings_put(key, {"rights": ["send"]})
    other = await engine_factory()
    assert await other.settings_get(key) == {"rights": ["send"]}
    assert await other.settings_items(f"users/{unique}") == {key: {"rights": ["send"]}}
    await other.settings_delete(key)
    assert await engine.settings_get(key, "gone") == "gone"


async def test_stop_is_prompt_while_loops_wait_on_the_engine(engine_factory, unique):
    """Pumps and check-back loops parked in a pull must not hold up a graceful stop."""
    engine = await engine_factory(tx_timeout=60.0)
    p = RecordingSession(role="producer", group=f"pg{unique}")
    engine.producer_hello(p)
    await _send(engine, p, unique, _rows(b"h"), half=True)  # a TXCHECK loop for this topic
    c = RecordingSession(role="consumer")
    await _subscribe(engine, c, Sub("g", unique))  # a pump, waiting for messages
    await wait_for(lambda: unique in engine._txcheck_topics and engine._pumps[("g", unique)].task,
                   what="a check-back loop and a pump")
    started = time.monotonic()
    await asyncio.wait_for(engine.stop(), 10)
    assert time.monotonic() - started < 3.0
    assert engine.client.nc.is_closed
