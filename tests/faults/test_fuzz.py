"""Fuzz over a real socket (issue 11): whatever a client sends, the broker answers it as
docs/protocol.md says, stores nothing for what it refuses, and every other client goes on.

Hypothesis draws examples of one to three client sessions (``fuzz_wire.sessions``): every
op (HELLO, SEND, END_TX, SUBSCRIBE, ACK, UNSUBSCRIBE, PING, RECALL, RECEIVE, SETTLE, the
client-side REPLY and ERROR, the broker-only DELIVER and CHECK, unknown codes) with
payloads that are valid or mutated (fields dropped, added, replaced by garbage: wrong
types, huge and negative ints, infinities, nesting 1,000 deep, long lists, bad names,
oversized bodies, message options, bad UTF-8), odd request ids, out-of-order handshakes
(requests before HELLO, two HELLOs, two SUBSCRIBEs, ACKs of unknown tokens, receipt
handles of nothing, END_TX for unknown or other groups' transactions), malformed frames
(zero length, over the size limit, not an array, bad UTF-8, undecodable, too deep, random
bytes, cut short), bytes split into any number of writes or one write per byte,
connections that close abruptly (with FIN or RST) and clients that never read their
socket. ``fuzz_driver`` says what is checked after every example and at the end; the
model of the answers is ``fuzz_model``.

Budgets: ``test_fuzz_frames_over_a_real_socket`` runs in the default suite
(``HALFMQ_FUZZ_CI_EXAMPLES``, default 250 examples, about 30 s, with a fixed seed so that
every run draws the same examples); the long run, with new examples each time, is
``HALFMQ_FUZZ_EXAMPLES=100000 python -m pytest -m slow tests/faults/test_fuzz.py -k long``.
Each prints how many examples, sessions and frames it tried.

Replaying a failure: Hypothesis prints the falsifying example and a
``@reproduce_failure(...)`` blob, and saves the example in ``.hypothesis/`` so that the
next run of the same test tries it first. ``HALFMQ_FUZZ_SEED=N`` fixes the random seed
(a run with a seed draws the same examples every time); the broker's log is kept in the
test's ``tmp_path`` (``data0.log``).
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from protocol import Op, encode_frame
from tests.faults.fuzz_driver import BROKER_ARGS, FuzzRun
from tests.faults.fuzz_support import BrokerWatch, MiB, RawClient
from tests.faults.fuzz_wire import sessions

#: Broker RSS may grow at most this much over its baseline (measured after setup).
RSS_BOUND = 192 * MiB
#: No canary message may wait longer than this for its delivery.
CANARY_BOUND = 5.0
CI_EXAMPLES = int(os.environ.get("HALFMQ_FUZZ_CI_EXAMPLES", "250"))
LONG_EXAMPLES = int(os.environ.get("HALFMQ_FUZZ_EXAMPLES", "0"))
SEED = os.environ.get("HALFMQ_FUZZ_SEED")


#: The CI budget draws the same examples on every run (a test that passes on one run and
#: fails on the next would be a flaky one); the long budget draws new ones each time.
CI_SEED = 20261206


def _fuzz(broker_factory, capsys, record_property, examples: int, fixed_seed: int | None = None) -> None:
    broker = broker_factory(*BROKER_ARGS)
    run = FuzzRun(broker, rss_bound=RSS_BOUND, canary_bound=CANARY_BOUND)
    run.setup()

    @settings(max_examples=examples, deadline=None, print_blob=True,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(sessions(), min_size=1, max_size=3))
    def one_example(example):
        problems = run.run_example(example)
        assert not problems, "\n".join(problems[:20])

    if SEED is not None or fixed_seed is not None:
        one_example = seed(int(SEED) if SEED is not None else fixed_seed)(one_example)
    try:
        one_example()
        problems = run.finish()
    finally:
        run.close()
    stats = dict(run.stats)
    assert run.canary is not None
    summary = (f"fuzz: {stats.get('examples', 0)} examples, {stats.get('sessions', 0)} sessions, "
               f"{stats.get('frames', 0)} frames ({stats.get('requests', 0)} requests, "
               f"{stats.get('barriers', 0)} barriers, {stats.get('malformed_answered', 0)} malformed frames "
               f"answered), {stats.get('bytes', 0) / MiB:.1f} MiB sent; broker RSS {run.base_rss / MiB:.0f} -> "
               f"max {run.max_rss / MiB:.0f} MiB; broker descriptors {stats.get('fds_at_start')} -> "
               f"{stats.get('fds_at_end')} (TCP sockets back to {run.base_sockets}); "
               f"canary {run.canary.summary()}; known broker bugs hit: "
               f"{dict(run.bugs_seen)}")
    for key in ("examples", "sessions", "frames", "requests"):
        record_property(f"fuzz_{key}", stats.get(key, 0))
    with capsys.disabled():
        print("\n" + summary)
    assert not problems, "\n".join(problems)
    assert stats["examples"] >= examples  # Hypothesis ran the whole budget


@pytest.mark.timeout(300)
def test_fuzz_frames_over_a_real_socket(broker_factory, capsys, record_property):
    """The CI budget (see the module docstring)."""
    _fuzz(broker_factory, capsys, record_property, CI_EXAMPLES, fixed_seed=CI_SEED)


@pytest.mark.slow
@pytest.mark.skipif(LONG_EXAMPLES <= 0, reason="set HALFMQ_FUZZ_EXAMPLES=N to run the long fuzz budget")
@pytest.mark.timeout(max(600, LONG_EXAMPLES))  # about 0.1 s per example; a second each is plenty
def test_fuzz_frames_long(broker_factory, capsys, record_property):
    """The long budget, by hand: ``HALFMQ_FUZZ_EXAMPLES=100000``."""
    _fuzz(broker_factory, capsys, record_property, LONG_EXAMPLES)


# -- frames split at every byte boundary ------------------------------------------------

def _script() -> list[tuple[int, int, object]]:
    return [
        (Op.HELLO, 1, {"version": 1, "client_id": "split", "role": "consumer", "group": "fzg0"}),
        (Op.SEND, 2, {"topic": "fzsplit", "msgs": [[b"x" * 40, "TagA", ["k"], {"p": "v"}, 1]]}),
        (Op.SUBSCRIBE, 3, {"group": "fzsplitg", "topic": "fzsplitsub", "prefetch": 4}),
        (Op.ACK, 4, {"a": [[999, True]]}),
        (Op.END_TX, 5, {"msg_id": "FFFFFFFF0000000000000001", "outcome": "COMMIT"}),
        (Op.PING, 0, {}),
        (Op.SEND, 6, {"topic": "bad name", "msgs": [[b"y", None, [], {}, 0]]}),
        (Op.UNSUBSCRIBE, 7, {}),
        (Op.PING, 8, {}),
    ]


def _answers(client: RawClient, rids: set[int]) -> list[tuple[int, int, object]]:
    assert client.read_until(lambda: rids <= {f[1] for f in client.frames}, 10), client.frames
    return sorted((op, rid, p.get("code") if op == Op.ERROR else sorted(p)) for op, rid, p in client.frames
                  if op != Op.DELIVER)


@pytest.mark.timeout(120)
def test_every_split_of_a_request_stream_is_answered_alike(broker_factory):
    """The same requests cut at each byte boundary into two writes, and once one byte per
    write, get the same answers as in one write; the broker stores each SEND once.

    When the first part holds whole requests, their answers are awaited before the rest is
    written: the broker has then read the first part on its own, so the cut really fell
    where intended."""
    broker = broker_factory(*BROKER_ARGS)
    watch = BrokerWatch(broker.proc.pid, broker.http_url, broker.log_path, broker.data_dir)
    frames = [encode_frame(op, rid, p) for op, rid, p in _script()]
    stream = b"".join(frames)
    rids = {rid for _op, rid, _p in _script() if rid}
    ends = [sum(map(len, frames[: i + 1])) for i in range(len(frames))]

    whole = RawClient(broker.address)
    whole.write(stream)
    expected = _answers(whole, rids)
    whole.close()
    assert [a[:2] for a in expected] == [(Op.REPLY, 1), (Op.REPLY, 2), (Op.REPLY, 3), (Op.REPLY, 4),
                                         (Op.REPLY, 7), (Op.REPLY, 8), (Op.ERROR, 5), (Op.ERROR, 6)]
    for cut in range(1, len(stream)):
        client = RawClient(broker.address)
        client.write(stream[:cut])
        done_rids = {rid for (_op, rid, _p), end in zip(_script(), ends, strict=True) if end <= cut and rid}
        if done_rids - {2}:  # a SEND's answer waits for the disk: the others say the part was read
            assert client.read_until(lambda c=client, r=done_rids - {2}: r <= {f[1] for f in c.frames}, 10)
        client.write(stream[cut:])
        assert _answers(client, rids) == expected, f"cut at byte {cut} of {len(stream)}"
        client.close()
    bytewise = RawClient(broker.address)
    for i in range(len(stream)):
        bytewise.write(stream[i : i + 1])
    assert _answers(bytewise, rids) == expected
    bytewise.close()
    assert watch.topic_counts()["fzsplit"] == len(stream) + 1  # every cut, the whole and the bytewise run
    assert not watch.new_log_errors()
