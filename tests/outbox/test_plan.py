"""The relay's planning rules and the SQL helpers, without a database or a broker."""

from __future__ import annotations

import json

import pytest

from producer_sdk.outbox.plan import (
    OUTBOX_ID,
    POISON,
    SUSPECT,
    TRANSIENT,
    BatchOutcome,
    OutboxRow,
    PoisonRowError,
    classify,
    decode_row,
    encode_keys,
    encode_properties,
    hold_back,
    runs,
)
from producer_sdk.outbox.sql import MYSQL, POSTGRES, SQLITE, Dialect, _to_postgres, has_skip_locked
from protocol import (
    AuthError,
    BrokerUnavailableError,
    HalfMQError,
    InvalidNameError,
    MessageTooLargeError,
    RequestTimeoutError,
)
from protocol.errors import BadRequestError, TopicNotFoundError


def row(row_id: int, key: str | None = None, topic: str = "t", size: int = 1) -> OutboxRow:
    return OutboxRow(row_id, topic, key, b"x" * size, None, (), {})


def test_decode_row_builds_the_message_and_carries_the_row_id():
    r = decode_row((7, "orders", "acct-1", b"body", "TagA", '["k1", "k2"]', '{"a": "1"}', 2))
    assert (r.id, r.topic, r.order_key, r.body, r.tags, r.keys, r.attempts) == \
        (7, "orders", "acct-1", b"body", "TagA", ("k1", "k2"), 2)
    assert r.item() == {"body": b"body", "tags": "TagA", "keys": ["k1", "k2"],
                        "properties": {"a": "1", OUTBOX_ID: "7"}}


@pytest.mark.parametrize("raw, reason", [
    ((1, "%DLQ%g", None, b"", None, "[]", "{}", 0), "reserved"),
    ((1, "bad topic", None, b"", None, "[]", "{}", 0), "invalid topic"),
    ((1, "t", None, b"", None, "not json", "{}", 0), "malformed"),
    ((1, "t", None, b"", None, "[1]", "{}", 0), "list of strings"),
    ((1, "t", None, b"", None, "[]", '{"a": 1}', 0), "object of strings"),
    ((1, "t", None, b"", None, "[]", "[]", 0), "object of strings"),
])
def test_decode_row_refuses_poison_rows_with_the_reason(raw, reason):
    with pytest.raises(PoisonRowError, match=reason):
        decode_row(raw)


def test_encoders_validate_what_add_stores():
    assert json.loads(encode_keys("k")) == ["k"]
    assert json.loads(encode_keys(["a", "b"])) == ["a", "b"]
    assert encode_keys(None) == "[]"
    with pytest.raises(TypeError):
        encode_keys([1])
    with pytest.raises(TypeError):
        encode_keys([""])
    assert json.loads(encode_properties({"a": "é"})) == {"a": "é"}
    with pytest.raises(TypeError):
        encode_properties({"a": 1})
    with pytest.raises(ValueError, match=OUTBOX_ID):
        encode_properties({OUTBOX_ID: "1"})


def test_hold_back_keeps_rows_whose_key_has_an_earlier_unsent_row_elsewhere():
    rows = [row(5, "a"), row(6, "b"), row(7, "a"), row(8, None), row(9, "c"), row(11, "b"),
            row(12, "b")]
    # a: row 3 is unsent and not ours (another relay holds it, or it is FAILED);
    # b: row 10, between two of ours, is claimed by another relay: 11 and 12 wait, 6 goes;
    # c: only our own rows are unsent
    unsent = {"a": [3, 5, 7], "b": [6, 10, 11, 12], "c": [9]}
    ready, held = hold_back(rows, unsent)
    assert [r.id for r in ready] == [6, 8, 9]
    assert [r.id for r in held] == [5, 7, 11, 12]
    ready, held = hold_back(rows, {})  # nothing else unsent
    assert [r.id for r in ready] == [5, 6, 7, 8, 9, 11, 12] and held == []


def test_runs_cut_at_topic_changes_count_and_bytes():
    rows = [row(1, topic="a"), row(2, topic="a"), row(3, topic="b"), row(4, topic="a"),
            row(5, topic="a", size=10), row(6, topic="a", size=10), row(7, topic="a", size=30)]
    cut = runs(rows, max_count=3, max_bytes=20)
    assert [(r.topic, [x.id for x in r.rows]) for r in cut] == [
        ("a", [1, 2]), ("b", [3]), ("a", [4, 5]), ("a", [6]), ("a", [7])]
    assert [(r.topic, [x.id for x in r.rows]) for r in runs(rows[:2], max_count=1, max_bytes=99)] \
        == [("a", [1]), ("a", [2])]


@pytest.mark.parametrize("exc, kind", [
    (MessageTooLargeError("big"), POISON),
    (InvalidNameError("bad"), POISON),
    (BadRequestError("bad"), POISON),
    (TopicNotFoundError("none"), POISON),
    (TypeError("body"), POISON),
    (BrokerUnavailableError("down"), TRANSIENT),
    (RequestTimeoutError("slow"), TRANSIENT),
    (AuthError("who"), TRANSIENT),
    (ConnectionResetError(), TRANSIENT),
    (HalfMQError("internal"), SUSPECT),
    (RuntimeError("?"), SUSPECT),
])
def test_classify(exc, kind):
    assert classify(exc) == kind


def test_batch_outcome_blocks_later_rows_of_a_key_that_stayed_unsent():
    o = BatchOutcome()
    o.fail(row(1, "a"), "E", final=True)
    o.fail(row(2, "b"), "E", final=False)
    o.leave(row(3, "c"))
    o.leave(row(4, None))
    assert o.failed == {1: "E"} and o.retry == {2: "E"} and o.untouched == [3, 4]
    assert [o.blocks(row(i, k)) for i, k in [(9, "a"), (9, "b"), (9, "c"), (9, None), (9, "d")]] \
        == [True, True, True, False, False]


def test_skip_locked_support_by_server_version():
    assert has_skip_locked(POSTGRES, "")
    assert not has_skip_locked(SQLITE, "3.45")
    assert has_skip_locked(MYSQL, "10.11.19-MariaDB-0+deb12u1")
    assert has_skip_locked(MYSQL, "10.6.0-MariaDB")
    assert not has_skip_locked(MYSQL, "10.5.23-MariaDB")
    assert has_skip_locked(MYSQL, "8.0.36")
    assert not has_skip_locked(MYSQL, "5.7.44-log")


def test_placeholders_and_identifiers():
    assert _to_postgres("a = ? AND b IN (?, ?)") == "a = $1 AND b IN ($2, $3)"
    with pytest.raises(ValueError):
        Dialect(SQLITE, "bad; DROP TABLE x")
    with pytest.raises(ValueError):
        Dialect("oracle", "t")
    for name in (SQLITE, MYSQL, POSTGRES):
        assert all("IF NOT EXISTS" in s for s in Dialect(name, "ob").create_statements())


def test_owner_ids_name_this_machine_and_dead_local_relays_are_recognised():
    import os
    import subprocess
    import sys
    import time

    from producer_sdk.outbox.owner import is_dead_local_owner, machine_id, owner_id

    me = owner_id()
    assert len(me) <= 64 and me != owner_id()
    machine = machine_id()
    if machine is None:
        pytest.skip("the machine cannot be named here (no /proc)")
    assert me.split(":")[1] == machine and me.split(":")[2] == str(os.getpid())
    assert not is_dead_local_owner(me, me=me)
    alive = f"h:{machine}:{os.getppid()}:abcd1234"
    assert not is_dead_local_owner(alive, me=me)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        owner = f"h:{machine}:{child.pid}:abcd1234"
        assert not is_dead_local_owner(owner, me=me)   # running
        child.kill()
        deadline = time.monotonic() + 10
        while not is_dead_local_owner(owner, me=me):  # dead, not reaped yet: a zombie
            assert time.monotonic() < deadline, "the killed child never showed as dead"
            time.sleep(0.01)
    finally:
        child.kill()
        child.wait(10)
    assert is_dead_local_owner(owner, me=me)  # reaped: gone
    assert not is_dead_local_owner(f"h:000000000000:{child.pid}:abcd1234", me=me)  # elsewhere
    assert not is_dead_local_owner("garbage", me=me)
    assert not is_dead_local_owner(f"h:{machine}:notapid:abcd1234", me=me)
