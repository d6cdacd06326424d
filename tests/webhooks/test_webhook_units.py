"""The pure parts of webhooks, with an injected clock: the circuit breaker, the receiver's
verifier, the bounded delivery record, definitions and secret rotation."""

from __future__ import annotations

import itertools

import pytest

from broker.core.lifecycle import InvalidTransition, transition
from broker.webhooks.breaker import (
    BREAKER_TRANSITIONS,
    Admission,
    BreakerEvent,
    BreakerState,
    CircuitBreaker,
)
from broker.webhooks.deliveries import DeliveryLog
from broker.webhooks.spec import WebhookSpec, WebhookSpecError
from consumer_sdk import WebhookVerificationError, WebhookVerifier
from protocol.webhooks import (
    decode_list,
    encode_list,
    parse_signature_header,
    sign,
    signature_header,
)

SECRET = "0123456789abcdef"

# -- circuit breaker -------------------------------------------------------------------


def test_every_breaker_state_and_event_pair_is_allowed_or_refused_by_the_table():
    for state, event in itertools.product(BreakerState, BreakerEvent):
        if (state, event) in BREAKER_TRANSITIONS:
            assert transition(BREAKER_TRANSITIONS, state, event) is BREAKER_TRANSITIONS[(state, event)]
        else:
            with pytest.raises(InvalidTransition):
                transition(BREAKER_TRANSITIONS, state, event)


def test_breaker_opens_after_k_failures_admits_one_probe_and_closes():
    b = CircuitBreaker(failures_to_open=3, cooldown=10.0)
    assert b.admit(0.0) is Admission.NORMAL
    assert b.record(False, Admission.NORMAL, 1.0) is None
    assert b.record(True, Admission.NORMAL, 1.0) is None  # a success resets the count
    assert b.record(False, Admission.NORMAL, 2.0) is None
    assert b.record(False, Admission.NORMAL, 2.0) is None
    assert b.record(False, Admission.NORMAL, 3.0) is BreakerState.OPEN
    assert b.retry_at == 13.0 and b.opened_at == 3.0
    assert b.admit(12.9) is Admission.REFUSED
    # a late result of a request admitted before it opened changes nothing
    assert b.record(True, Admission.NORMAL, 5.0) is None and b.state is BreakerState.OPEN
    assert b.admit(13.0) is Admission.PROBE and b.state is BreakerState.HALF_OPEN
    assert b.admit(13.0) is Admission.REFUSED  # one probe at a time
    assert b.record(False, Admission.NORMAL, 13.5) is None  # only the probe decides
    assert b.record(False, Admission.PROBE, 14.0) is BreakerState.OPEN
    assert b.retry_at == 24.0 and b.times_opened == 2 and b.consecutive_failures == 4
    assert not b.cool(23.0) and b.cool(24.0)
    assert b.admit(24.0) is Admission.PROBE
    assert b.record(True, Admission.PROBE, 24.5) is BreakerState.CLOSED
    assert b.consecutive_failures == 0 and b.admit(25.0) is Admission.NORMAL


# -- the receiver's verifier ------------------------------------------------------------------


def _request(msg_id: str, ts_ms: int, body: bytes, secrets=(SECRET,)) -> dict[str, str]:
    return {"halfmq-id": msg_id, "halfmq-timestamp": str(ts_ms),
            "halfmq-signature": signature_header(secrets, msg_id, ts_ms, body)}


def test_verifier_accepts_a_good_request_and_refuses_each_kind_of_bad_one():
    now = [1000.0]
    v = WebhookVerifier(SECRET, tolerance=300, clock=lambda: now[0])
    h = _request("A" * 24, 1_000_000, b"body")
    got = v.verify(h, b"body")
    assert got.msg_id == "A" * 24 and got.timestamp_ms == 1_000_000 and got.attempt is None

    def reason(headers, body=b"body") -> str:
        with pytest.raises(WebhookVerificationError) as e:
            v.verify(headers, body)
        return e.value.reason

    assert reason(h) == "replayed"
    assert reason(_request("B" * 24, 1_000_000, b"body"), b"bodY") == "bad_signature"
    assert reason(_request("B" * 24, 1_000_000, b"body", secrets=("another-secret-1234",))) == "bad_signature"
    assert reason({**_request("B" * 24, 1_000_000, b"body"), "halfmq-signature": "v2=" + "0" * 64}) == "bad_signature"
    assert reason(_request("B" * 24, 1_000_000 - 300_001, b"body")) == "stale"
    assert reason(_request("B" * 24, 1_000_000 + 300_001, b"body")) == "stale"  # from the future
    assert reason({"halfmq-id": "x", "halfmq-timestamp": "1"}) == "missing_header"
    assert reason({**_request("B" * 24, 1_000_000, b"body"), "halfmq-timestamp": "-5"}) == "bad_timestamp"
    # a retry of the same message is a new request (a new timestamp), not a replay
    assert v.verify(_request("A" * 24, 1_000_500, b"body"), b"body").timestamp_ms == 1_000_500
    # header names in any case, from a plain dict
    other = {k.title(): val for k, val in _request("C" * 24, 1_000_000, b"body").items()}
    assert v.verify(other, b"body").msg_id == "C" * 24


def test_verifier_accepts_any_known_secret_and_any_signature_of_the_header():
    v = WebhookVerifier(["new-secret-new-secret", SECRET], clock=lambda: 1000.0)
    v.verify(_request("A" * 24, 1_000_000, b"x", secrets=(SECRET,)), b"x")
    v.verify(_request("B" * 24, 1_000_000, b"x", secrets=("newest-secret-xyz", "new-secret-new-secret")), b"x")


def test_verifier_memory_is_bounded_and_a_forgotten_request_cannot_be_replayed():
    now = [1000.0]
    v = WebhookVerifier(SECRET, tolerance=300, max_remembered=3, clock=lambda: now[0])
    reqs = [_request(f"{i:024d}", 1_000_000 + i, b"b") for i in range(5)]
    for r in reqs:
        v.verify(r, b"b")
    assert len(v._seen) == 3  # noqa: SLF001
    for r in reqs[:2]:  # forgotten, yet refused
        with pytest.raises(WebhookVerificationError) as e:
            v.verify(r, b"b")
        assert e.value.reason == "stale"
    # once out of the window, entries are dropped on the next request
    now[0] = 1000.0 + 301
    v.verify(_request("N" * 24, 1_301_000, b"b"), b"b")
    assert list(v._seen) == [("N" * 24, 1_301_000)]  # noqa: SLF001


def test_verifier_refuses_bad_arguments():
    with pytest.raises(ValueError):
        WebhookVerifier([])
    with pytest.raises(ValueError):
        WebhookVerifier(SECRET, tolerance=0)


def test_signature_format_helpers():
    assert sign(SECRET, "ID", 5, b"b") == sign(SECRET.encode(), "ID", 5, b"b")
    assert parse_signature_header("v1=" + "A" * 64 + ", v0=zz,junk, v1=short") == ["a" * 64]
    assert decode_list(encode_list(["a,b", "é %", ""])) == ("a,b", "é %", "")
    assert decode_list("") == ()


# -- delivery record --------------------------------------------------------------------------


def test_delivery_record_is_bounded_keeps_the_latest_updated_and_saves_changed_pages():
    dlog = DeliveryLog(page_size=2, pages=3)
    recs = [dlog.attempt_started(f"m{i}", 0, 1000 + i) for i in range(6)]  # pages 0, 1, 2
    changes = dlog.take_changes()
    assert sorted(changes) == [0, 1, 2] and [r[0] for r in changes[0] or []] == ["m0", "m1"]
    # updating m0 moves it to the newest page; page 2 is full, so page 3 begins; four pages
    # are one too many: the oldest (0, holding only m1 now) is dropped with m1
    dlog.attempt_finished(recs[0], ok=True, status=200, error=None, last_allowed=False, now_ms=2000)
    assert dlog.get("m1") is None and dlog.get("m0").state == "delivered"  # type: ignore[union-attr]
    changes = dlog.take_changes()
    assert changes[0] is None and [r[0] for r in changes[3] or []] == ["m0"]
    assert dlog.take_changes() == {}
    # a failure on the last allowed attempt is a dead letter; errors are cut short
    rec = dlog.attempt_started("m5", 4, 3000)
    assert rec.attempts == 5  # the broker's count wins over a lost record
    dlog.attempt_finished(rec, ok=False, status=None, error="x" * 500, last_allowed=True, now_ms=3001)
    assert rec.state == "dead_lettered" and len(rec.last_error or "") == 200


def test_delivery_record_round_trips_through_its_saved_pages():
    dlog = DeliveryLog(page_size=2, pages=3)
    for i in range(5):
        rec = dlog.attempt_started(f"m{i}", 0, 1000 + i)
        dlog.attempt_finished(rec, ok=i % 2 == 0, status=200 if i % 2 == 0 else 503,
                              error=None if i % 2 == 0 else "HTTP 503", last_allowed=False, now_ms=1100 + i)
    saved: dict[int, list] = {}
    for page, rows in dlog.take_changes().items():
        if rows is None:
            saved.pop(page, None)
        else:
            saved[page] = rows
    again = DeliveryLog(page_size=2, pages=3)
    again.load(saved)
    assert {m: r.public() for m, r in again.records.items()} == {m: r.public() for m, r in dlog.records.items()}
    # new records go on filling the newest saved page, then the next one
    assert again.attempt_started("m9", 0, 5000).page == max(saved) == 2
    assert again.attempt_started("m10", 0, 5000).page == 3


# -- definitions ------------------------------------------------------------------------------


def test_spec_defaults_group_and_stored_form():
    spec = WebhookSpec.parse({"name": "n", "topic": "t", "url": "https://x.example/h", "secret": SECRET,
                              "timeout": "250ms", "tags": "*"}, ack_timeout=60, max_prefetch=4096)
    assert spec.group == "webhook:n" and spec.tags is None and spec.timeout == 0.25
    assert (spec.max_attempts, spec.concurrency, spec.start) == (17, 8, "latest")
    assert (spec.breaker_failures, spec.breaker_cooldown) == (5, 30.0)
    assert WebhookSpec.from_settings(spec.to_settings()) == spec
    assert "secret" not in spec.public(0) and SECRET not in str(spec.public(0))
    with pytest.raises(WebhookSpecError):
        WebhookSpec.parse({"name": "n", "topic": "t", "url": "https://x/h", "secret": SECRET, "concurrency": 9},
                          ack_timeout=60, max_prefetch=8)


def test_rotation_keeps_the_previous_secret_for_the_overlap_only():
    spec = WebhookSpec(name="n", topic="t", url="http://x/", secrets=(("s1" * 8, None),))
    s2 = spec.rotated("s2" * 8, overlap=60, now_ms=0)
    assert s2.signing_secrets(0) == ["s2" * 8, "s1" * 8]
    assert s2.signing_secrets(60_000) == ["s2" * 8]  # the overlap is over
    s3 = s2.rotated("s3" * 8, overlap=10, now_ms=1000)
    assert s3.signing_secrets(1000) == ["s3" * 8, "s2" * 8, "s1" * 8]
    assert s3.signing_secrets(11_000) == ["s3" * 8, "s1" * 8]
    assert s3.rotated("s4" * 8, overlap=0, now_ms=2000).signing_secrets(2000) == ["s4" * 8]
    with pytest.raises(WebhookSpecError):
        spec.rotated("short", overlap=0, now_ms=0)
