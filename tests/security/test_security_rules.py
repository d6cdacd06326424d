"""The security rules without I/O: globs and rights, verifiers, SCRAM logins (replay
included), the login throttle, tokens, the users file, and the END_TX group rule."""

from __future__ import annotations

import pytest
from scramp import ScramClient

from broker.core.transactions import OPERATOR, HalfMessageTable, TxState
from broker.security import (
    ALL_RIGHTS,
    Grant,
    LoginThrottle,
    Rights,
    SecurityState,
    User,
    Verifier,
    check_password,
    glob_matches,
    load_users_file,
    make_verifier,
)
from broker.security.scram import LOGIN_FAILED, ScramLogin
from broker.security.users import new_token
from protocol.errors import AuthError, TransactionStateError


def test_globs_match_names_case_sensitively():
    assert glob_matches("*", "anything")
    assert glob_matches("orders-*", "orders-eu")
    assert not glob_matches("orders-*", "Orders-eu")
    assert glob_matches("%DLQ%*", "%DLQ%consumer_bank2")
    assert not glob_matches("transfer", "transfers")
    assert glob_matches("t?", "t1") and not glob_matches("t?", "t12")


def test_rights_per_operation():
    r = Rights([Grant("publish", "transfer", "producer_bank1"), Grant("publish", "logs-*"),
                Grant("subscribe", "transfer", "consumer_*"), Grant("read", "transfer")])
    assert r.may_send("transfer", None, half=False)
    assert r.may_send("logs-a", "producer_bank1", half=False)
    assert r.may_send("transfer", "producer_bank1", half=True)
    assert not r.may_send("logs-a", "producer_bank1", half=True)  # that grant has no group
    assert not r.may_send("other", None, half=False)
    assert r.may_announce_producer_group("producer_bank1")
    assert not r.may_announce_producer_group("producer_bank9")
    assert r.may_subscribe("transfer", "consumer_bank2")
    assert not r.may_subscribe("transfer", "auditors")
    assert not r.may_subscribe("%DLQ%consumer_bank2", "consumer_bank2")  # DLQs need their own grant
    assert r.may_read("transfer") and not r.may_read("*") and not r.may_admin("transfer")
    admin = Rights([Grant("admin", "*")])
    assert admin.may_admin("*") and admin.may_read("x") and admin.may_read("*")
    assert not admin.may_send("x", None, half=False)
    assert ALL_RIGHTS.may_subscribe("%DLQ%g", "g") and ALL_RIGHTS.may_admin("*")


@pytest.mark.parametrize("args", [("publish", "bad topic"), ("fly", "t"), ("subscribe", "t"),
                                  ("admin", "t", "g"), ("read", "")])
def test_bad_grants_are_refused(args):
    with pytest.raises(ValueError):
        Grant(*args)


def test_verifier_round_trip_and_password_check():
    v = make_verifier("s3cret")
    assert "s3cret" not in v.to_text()
    again = Verifier.from_text(v.to_text())
    assert again == v
    assert check_password(again, "s3cret")
    assert not check_password(again, "s3cret ")
    assert make_verifier("s3cret").salt != v.salt  # salted
    with pytest.raises(ValueError):
        Verifier.from_text("SCRAM-SHA-256$1:AAAA$AAAA:AAAA")
    with pytest.raises(ValueError):
        make_verifier("")


def _client_login(user: str, password: str, verifiers: dict[str, Verifier], key: bytes = b"k" * 32):
    """A full exchange; returns (login, client, server_final) or raises AuthError."""
    client = ScramClient(["SCRAM-SHA-256"], user, password)
    login = ScramLogin(verifiers.get, key)
    server_first = login.first(client.get_client_first())
    client.set_server_first(server_first)
    final = client.get_client_final()
    server_final = login.final(final)
    client.set_server_final(server_final)  # the broker proved it knows the verifier
    return login, final


def test_scram_login_good_wrong_unknown():
    verifiers = {"alice": make_verifier("pw")}
    login, _ = _client_login("alice", "pw", verifiers)
    assert login.user == "alice"
    with pytest.raises(AuthError, match=LOGIN_FAILED):
        _client_login("alice", "nope", verifiers)
    with pytest.raises(AuthError, match=LOGIN_FAILED):
        _client_login("mallory", "pw", verifiers)


def test_unknown_user_gets_a_stable_made_up_salt():
    """The server-first of an unknown user looks like a real one and does not change, so
    it does not tell which users exist."""
    def salt_of(user: str) -> str:
        client = ScramClient(["SCRAM-SHA-256"], user, "x")
        first = ScramLogin({}.get, b"k" * 32).first(client.get_client_first())
        return [p for p in first.split(",") if p.startswith("s=")][0]

    assert salt_of("ghost") == salt_of("ghost") != salt_of("phantom")


def test_replayed_client_final_fails_on_a_new_login():
    verifiers = {"alice": make_verifier("pw")}
    client = ScramClient(["SCRAM-SHA-256"], "alice", "pw", c_nonce="fixedclientnonce")
    first = client.get_client_first()
    login = ScramLogin(verifiers.get, b"k" * 32)
    client.set_server_first(login.first(first))
    captured_final = client.get_client_final()
    login.final(captured_final)
    replay = ScramLogin(verifiers.get, b"k" * 32)
    replay.first(first)  # same client-first: a fresh server nonce
    with pytest.raises(AuthError):
        replay.final(captured_final)


def test_throttle_waits_double_after_the_free_failures():
    t = LoginThrottle(free_failures=2, first_wait=1.0, max_wait=3.0, window=100.0)
    assert t.failed("1.2.3.4", 0.0) == 0 and t.failed("1.2.3.4", 0.1) == 0
    assert t.failed("1.2.3.4", 0.2) == 1.0
    assert t.wait_left("1.2.3.4", 0.7) == pytest.approx(0.5)
    assert t.wait_left("5.6.7.8", 0.7) == 0  # per address
    assert t.failed("1.2.3.4", 1.3) == 2.0
    assert t.failed("1.2.3.4", 3.4) == 3.0  # capped
    assert t.wait_left("1.2.3.4", 200.0) == 0  # forgotten after the window
    assert t.failures("1.2.3.4") == 0


def test_throttle_memory_is_bounded():
    t = LoginThrottle(max_addresses=10)
    for i in range(100):
        t.failed(f"10.0.0.{i}", 0.0)
    assert len(t._failures) == 10


def test_tokens_and_basic_logins():
    user = User("ops", make_verifier("pw"), [Grant("admin", "*")])
    text, token = new_token("ops")
    state = SecurityState([user], [token])
    assert state.check_bearer(text) is user
    assert state.check_bearer(text[:-1] + ("A" if text[-1] != "A" else "B")) is None
    assert state.check_bearer("hmq_000000000000_" + "x" * 40) is None
    assert token.secret_sha256 not in text and text.split("_", 2)[2] not in str(token.to_stored())
    assert state.check_basic("ops", "pw") is user
    assert state.check_basic("ops", "PW") is None
    assert state.rights_of(None) is None  # users exist: anonymous has nothing
    assert SecurityState().rights_of(None) is ALL_RIGHTS


def test_users_file(tmp_path):
    v = make_verifier("pw").to_text()
    path = tmp_path / "users.toml"
    path.write_text(f'[users.bank1]\nverifier = "{v}"\ngrants = [["publish", "transfer", "producer_bank1"]]\n')
    [user] = load_users_file(str(path))
    assert user.name == "bank1" and user.source == "file"
    assert user.rights.may_send("transfer", "producer_bank1", half=True)
    path.write_text('[users.bad]\nverifier = "plain-password"\n')
    with pytest.raises(ValueError, match="users file .* user 'bad'"):
        load_users_file(str(path))


def test_end_tx_only_by_the_group_that_sent_the_half_message():
    table = HalfMessageTable(tx_timeout=6, tx_check_interval=30, tx_check_max=3)
    table.add("m1", topic="t", group="g1", producer_id="p", keys=(), pos=0, now=0.0)
    with pytest.raises(AuthError, match="belongs to producer group 'g1'"):
        table.resolve("m1", TxState.COMMITTED, 1.0, group="g2")
    with pytest.raises(AuthError):
        table.resolve("m1", TxState.COMMITTED, 1.0, group=None)
    assert table.state_of("m1") is TxState.PREPARED  # nothing changed
    assert table.resolve("m1", TxState.COMMITTED, 1.0, group="g1") == (TxState.COMMITTED, True)
    with pytest.raises(AuthError):  # not even a repeat from another group
        table.resolve("m1", TxState.COMMITTED, 2.0, group="g2")
    table.add("m2", topic="t", group="g1", producer_id="p", keys=(), pos=1, now=0.0)
    assert table.resolve("m2", TxState.ROLLED_BACK, 1.0, group=OPERATOR) == (TxState.ROLLED_BACK, True)
    with pytest.raises(TransactionStateError):
        table.resolve("m3", TxState.COMMITTED, 1.0, group="g1")
