"""The JetStream data layer against a real 3-node cluster (R3, sync always)."""

from __future__ import annotations

import asyncio
import json

import pytest

from broker.engines.jetstream import naming
from broker.engines.jetstream.client import EngineClient
from broker.engines.jetstream.streams import StreamSet

pytestmark = pytest.mark.timeout(90)


def _msg(body: bytes, tags: str | None = None, keys=(), props=None, born=1000) -> list:
    return [body, tags, list(keys), dict(props or {}), born]


async def _subject_counts(client, stream: str, filt: str) -> dict[str, int]:
    info = await client.api(f"STREAM.INFO.{stream}", {"subjects_filter": filt})
    return dict(info["state"].get("subjects") or {})


async def test_topic_stream_is_r3_with_retention_dedup_and_direct_get(layer, unique):
    ts = await layer.streams.ensure_topic(unique)
    info = await layer.client.api(f"STREAM.INFO.{ts.name}")
    cfg = info["config"]
    assert cfg["num_replicas"] == 3 and cfg["storage"] == "file"
    assert cfg["max_age"] == 72 * 3600 * 10**9 and cfg["duplicate_window"] == 600 * 10**9
    assert cfg["allow_direct"] is True and cfg["subjects"] == [f"hmq.{unique}.>"]
    assert len(info["cluster"]["replicas"]) == 2  # a leader and two followers
    tx = (await layer.client.api(f"STREAM.INFO.{naming.TX_STREAM}"))["config"]
    assert tx["max_age"] == 3600 * 10**9 and tx["num_replicas"] == 3


async def test_two_gateways_agree_on_a_stream_prefix(layer, nats_cluster, unique):
    other = EngineClient(nats_cluster.urls[::-1])
    await other.connect()
    try:
        s2 = StreamSet(other)
        a, b = await asyncio.gather(layer.streams.ensure_topic(unique), s2.ensure_topic(unique))
        assert a == b
        # a third, fresh process decodes the prefix back to the stream
        s3 = StreamSet(other)
        assert await s3.topic_of_prefix(a.prefix) == a
        assert await s3.topic_of_prefix("00000000") is None
        ids = await other.get_last(naming.IDS_STREAM, naming.id_subject(a.prefix))
        assert json.loads(ids.data) == {"stream": a.name, "created": a.created}
        assert unique in await s3.topics()
    finally:
        await other.close()


async def test_send_replies_positions_and_a_resent_publish_is_stored_once(layer, unique):
    ts, rows = await layer.writer.store(unique, [_msg(b"a", "A"), _msg(b"b", None), _msg(b"c", "x.y")])
    assert [r[0] for r in rows] == sorted(r[0] for r in rows) and [r[1] for r in rows] == [0, 1, 2]
    assert all(r[0] == r[2] for r in rows)
    got = await layer.client.get(ts.name, rows[2][0])
    assert got.subject == f"hmq.{unique}.m.2.x_2Ey"
    # the same Nats-Msg-Id again (a publish retried after a lost ack): stored once
    subject = naming.message_subject(unique, 0, "D")
    first = await layer.client.publish(subject, b"p", msg_id="dup-1")
    again = await layer.client.publish(subject, b"p", msg_id="dup-1")
    assert (again.seq, again.duplicate, first.duplicate) == (first.seq, True, False)
    assert (await _subject_counts(layer.client, ts.name, subject)) == {subject: 1}
    # half messages: queue_offset -1
    _, halves = await layer.writer.store(unique, [_msg(b"h")], half=True, group=f"pg{unique}", instance="p1")
    assert halves[0][2] == -1


async def test_decisions_repeat_and_conflict(layer, unique):
    from protocol.errors import TransactionStateError

    ts, rows = await layer.writer.store(unique, [_msg(b"t1", "A"), _msg(b"t2", "A")], half=True,
                                        group=f"pg{unique}", instance="p1")
    m1, m2 = (naming.encode_msg_id(ts.prefix, r[0]) for r in rows)
    d = await layer.ledger.end(m1, "COMMIT")
    assert (d.state, d.changed) == ("COMMITTED", True)
    d = await layer.ledger.end(m1, "COMMIT")  # repeat: the recorded state, nothing written
    assert (d.state, d.changed) == ("COMMITTED", False)
    with pytest.raises(TransactionStateError, match="already COMMITTED; ROLLED_BACK refused"):
        await layer.ledger.end(m1, "ROLLBACK")
    assert (await layer.ledger.end(m2, "ROLLBACK")).state == "ROLLED_BACK"
    with pytest.raises(TransactionStateError):
        await layer.ledger.end(m2, "COMMIT")
    for m in (m1, m2):
        c = await _subject_counts(layer.client, naming.TX_STREAM, naming.tx_decision_subject(m))
        assert c == {naming.tx_decision_subject(m): 1}
    # one pointer for the commit, none for the rollback
    visible = await _subject_counts(layer.client, ts.name, f"hmq.{unique}.m.>")
    assert sum(visible.values()) == 1
    # unknown ids: malformed, no such stream, a normal message, beyond the stream's end
    _, normal = await layer.writer.store(unique, [_msg(b"n")])
    for bad in ("nope", "00000000" + "0" * 15 + "1", naming.encode_msg_id(ts.prefix, normal[0][0]),
                naming.encode_msg_id(ts.prefix, 10**9)):
        with pytest.raises(TransactionStateError, match="unknown transaction"):
            await layer.ledger.end(bad, "COMMIT")


async def test_racing_decisions_make_exactly_one(layer, nats_cluster, unique):
    """20 transactions x 10 concurrent mixed outcomes from 3 connections: one decision each,
    exactly one pointer per committed one, none per rolled-back one."""
    from broker.engines.jetstream.ledger import TxLedger
    from protocol.errors import TransactionStateError

    ts, rows = await layer.writer.store(unique, [_msg(b"r%d" % i, "T") for i in range(20)], half=True,
                                        group=f"pg{unique}", instance="p1")
    ids = [naming.encode_msg_id(ts.prefix, r[0]) for r in rows]
    extra = [EngineClient(nats_cluster.urls[i:] + nats_cluster.urls[:i]) for i in (1, 2)]
    for c in extra:
        await c.connect()
    try:
        ledgers = [layer.ledger] + [TxLedger(c, StreamSet(c)) for c in extra]
        outcomes: dict[str, list[str]] = {m: [] for m in ids}

        async def one(m: str, k: int) -> None:
            outcome = "COMMIT" if (k + hash(m)) % 2 else "ROLLBACK"
            try:
                d = await ledgers[k % 3].end(m, outcome)
                outcomes[m].append(d.state)
            except TransactionStateError:
                outcomes[m].append("refused:" + outcome)

        await asyncio.gather(*(one(m, k) for m in ids for k in range(10)))
    finally:
        for c in extra:
            await c.close()
    committed = 0
    for m in ids:
        recorded = await layer.ledger.decision(m)
        state = {"C": "COMMITTED", "R": "ROLLED_BACK"}[recorded]
        # every success reported the recorded state; every refusal was the other outcome
        assert all(o == state or o.startswith("refused:") and o != "refused:" + state[:6]
                   for o in outcomes[m]), outcomes[m]
        assert state in outcomes[m]
        subj = naming.tx_decision_subject(m)
        assert await _subject_counts(layer.client, naming.TX_STREAM, subj) == {subj: 1}
        committed += recorded == "C"
    assert 0 < committed < 20
    visible = await _subject_counts(layer.client, ts.name, f"hmq.{unique}.m.>")
    assert sum(visible.values()) == committed


async def test_commit_pointer_is_idempotent(layer, unique):
    ts, rows = await layer.writer.store(unique, [_msg(b"p", "K")], half=True, group=f"pg{unique}", instance="p1")
    msg_id = naming.encode_msg_id(ts.prefix, rows[0][0])
    await layer.ledger.end(msg_id, "COMMIT")
    half = await layer.ledger.half(msg_id)
    again = await layer.ledger.publish_pointer(half)  # a gateway that died after the decision
    assert again.duplicate
    await layer.ledger.end(msg_id, "COMMIT")  # a repeated END_TX re-publishes it: still one
    subj = naming.message_subject(unique, rows[0][1], "K")
    assert await _subject_counts(layer.client, ts.name, subj) == {subj: 1}


async def test_check_counts_are_compare_and_set(layer, unique):
    ts, rows = await layer.writer.store(unique, [_msg(b"c")], half=True, group=f"pg{unique}", instance="p1")
    msg_id = naming.encode_msg_id(ts.prefix, rows[0][0])
    assert (await layer.ledger.checks(msg_id))[0] == 0
    assert [await layer.ledger.count_check(msg_id) for _ in range(3)] == [1, 2, 3]
    results = await asyncio.gather(*(layer.ledger.count_check(msg_id) for _ in range(5)))
    final = (await layer.ledger.checks(msg_id))[0]
    # concurrent increments never write the same count twice; none is lost from 3 on
    assert final == max(results) and 4 <= final <= 8
    subj = naming.tx_check_subject(msg_id)
    counts = await _subject_counts(layer.client, naming.TX_STREAM, subj)
    assert counts == {subj: final}
    # an abandoned transaction: decision A, a late COMMIT is refused
    from protocol.errors import TransactionStateError

    assert (await layer.ledger.end(msg_id, "ABANDON")).state == "ABANDONED"
    with pytest.raises(TransactionStateError, match="already ABANDONED"):
        await layer.ledger.end(msg_id, "COMMIT")
