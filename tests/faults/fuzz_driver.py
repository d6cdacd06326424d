"""The socket fuzzer's driver: plays drawn sessions against a broker process and checks
every answer, what the broker stored, and the broker's health.

How this works
--------------
``FuzzRun.setup`` creates the shared names (pool topics with a known message count, a sink
topic, 200 prepared half messages of group ``fztx``), starts the ``Canary`` and takes the
baselines. ``run_example`` plays each ``Session`` on a new connection:

1. *Plan.* Placeholders are resolved, each request is encoded and decoded again with the
   project's ``FrameDecoder``. A request the decoder refuses becomes the session's
   malformed tail (nothing after it is sent). After every ``rid = 0`` request a PING with
   its own rid is inserted, and one more ends the stream: a barrier. The broker answers
   in the order it processes frames, so an ``ERROR`` with rid 0 received between two
   barrier replies belongs to the one rid-0 request between those barriers. A few values
   are lowered so that examples stay short and known bugs do not swamp the run (each
   lowering says why): RECEIVE waits at most 300 ms; while the matching bug is open, a
   RECEIVE leases for at most 5 s, a half-message SEND holds at most 50 messages, and a
   tag-filtered SUBSCRIBE or RECEIVE goes to a topic and group of its own.
2. *Send* the bytes in the drawn number of writes (or one write per byte).
3. *Judge* (``reading`` sessions): wait until every request with a rid and every barrier
   is answered, then hold each answer against ``ConnectionModel.expect``. Only then is the
   malformed tail written (a broker bug drops good frames that arrive in the same read as
   a bad one: ``test_frames_before_a_malformed_one_in_the_same_read_are_answered``); it
   must get ``ERROR`` rid 0, code 8 (4 for a size), and the connection must end.
   ``abrupt`` sessions close (sometimes with RST) as soon as their bytes are written;
   ``never_read`` ones never read and are closed a few sessions later.
4. *Stored state.* A request answered ERROR (or, unread, refused whatever the state) must
   have left no topic or group behind: every name it used was fresh, so ``/api/topics``
   and ``/api/groups`` must not know them. An accepted SEND, SUBSCRIBE or RECEIVE must
   have created its topic (and group); accepted SENDs to the pool topics must add exactly
   their messages (polled, as rid-0 sends are stored without an answer). Valid SENDs of
   sessions that do not read go to a sink topic that is not counted.
5. *Health* after every example: the process is alive, its RSS is under the bound, its log
   gained no ERROR record (except those of known bugs), and no canary message waits, or
   waited since the last example, longer than its bound. ``finish`` then closes every fuzz connection and waits for
   the broker's TCP sockets to return to the baseline, and checks it holds no open file
   outside its data directory.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from protocol import MAX_FRAME_ITEMS, FrameDecoder, FrameTooLargeError, Op, ProtocolError
from tests.conftest import BrokerProcess
from tests.faults.fuzz_model import (
    INVISIBLE_MS,
    KNOWN_BROKER_BUGS,
    WAIT_MS_MAX,
    ConnectionModel,
    Expect,
    World,
)
from tests.faults.fuzz_support import BrokerWatch, Canary, MiB, RawClient
from tests.faults.fuzz_wire import (
    MAX_MESSAGE_SIZE,
    DlqOf,
    Name,
    Request,
    Session,
    Tail,
    TxId,
    UnknownTxId,
    Wide,
    frame_bytes,
)

__all__ = ["FuzzRun", "BROKER_ARGS", "POOL_TOPICS"]

#: The broker under fuzz: small messages (cheap oversized frames), one queue per topic
#: (fewer index files), short ack timeout and retry delays (leases held by fuzz clients
#: come back quickly).
BROKER_ARGS = ("--max-message-size", str(MAX_MESSAGE_SIZE), "--default-queues", "1",
               "--ack-timeout", "2s", "--retry-delays", "200ms,400ms", "--tx-timeout", "60s")
FRAME_LIMIT = MAX_MESSAGE_SIZE + 64 * 1024
POOL_TOPICS = [f"fzpool{i}" for i in range(4)]
POOL_GROUPS = [f"fzg{i}" for i in range(3)]
SINK_TOPIC = "fzsink"  # valid sends of sessions that never read their answers
#: RECEIVE long polls wait at most this long (ms): a longer wait only makes examples slow.
RECEIVE_WAIT_MS = 300
#: What tag-filtered SUBSCRIBEs and RECEIVEs use while "filter-scan" is a known bug: a topic
#: nobody sends to and a group of their own.
FILTERED_TOPIC, FILTERED_GROUP = "fzfiltered", "fzfilterg"
#: RECEIVE leases last at most this long (ms) while "unbounded-leases" is a known bug.
RECEIVE_INVISIBLE_MS = 5000
TX_GROUP, TX_TOPIC, TX_POOL = "fztx", "fzhalf", 200
#: Fresh names that may be *accepted* (and so create a topic or group); past this many,
#: fresh names are only used where the request is refused whatever the state.
FRESH_CAP = 300
#: Half messages per SEND while unresolved ones hold broker memory (see KNOWN_BROKER_BUGS).
MAX_HALVES = 50
ANSWER_TIMEOUT = 10.0
TAIL_TIMEOUT = 5.0
ALLOWED_LOG_ERRORS = ("RecursionError", "OverflowError: cannot convert float infinity")


@dataclass
class Planned:
    """One frame of a session's stream."""

    op: int
    rid: int
    payload: Any
    fresh: list[str] = field(default_factory=list)
    barrier: bool = False
    expect: Expect | None = None
    answer: str = "unknown"  # ok | error | none | unknown


class FuzzRun:
    """One fuzz run against ``broker`` (see the module docstring)."""

    def __init__(self, broker: BrokerProcess, *, rss_bound: int, canary_bound: float) -> None:
        assert broker.proc is not None and broker.log_path is not None
        self.broker = broker
        self.watch = BrokerWatch(broker.proc.pid, broker.http_url, broker.log_path, broker.data_dir)
        self.world = World(max_message_size=MAX_MESSAGE_SIZE, tx_group=TX_GROUP)
        self.rss_bound = rss_bound
        self.canary_bound = canary_bound
        self.stats: Counter[str] = Counter()
        self.bugs_seen: Counter[str] = Counter()
        self._fresh_seq = itertools.count()
        self.fresh_accepted = 0
        self.expected: dict[str, int] = {}
        self.lingering: deque[RawClient] = deque()
        self.canary: Canary | None = None
        self.base_rss = self.max_rss = 0
        self.base_sockets = 0

    # -- setup and teardown ---------------------------------------------------------------

    def setup(self) -> None:
        """Shared names, the prepared transactions, the canary, the baselines."""
        c = RawClient(self.broker.address)
        c.request(Op.HELLO, 1, {"version": 1, "client_id": "fz-setup", "role": "producer", "group": TX_GROUP})
        for i, topic in enumerate([*POOL_TOPICS, SINK_TOPIC]):
            op, _rid, _p = c.request(Op.SEND, 10 + i, {"topic": topic, "msgs": [[b"seed", None, [], {}, 0]]})
            assert op == Op.REPLY
        op, _rid, reply = c.request(Op.SEND, 2, {"topic": TX_TOPIC, "half": True,
                                                  "msgs": [[b"tx", None, [], {}, 0]] * TX_POOL})
        assert op == Op.REPLY, reply
        self.world.tx_ids = [f"{reply['p']}{pos:016X}" for pos, _q, _o in reply["r"]]
        c.close()
        counts = self.watch.topic_counts()
        self.expected = {t: counts[t] for t in POOL_TOPICS}
        self.canary = Canary(self.broker.address).start()
        self.base_rss = self.max_rss = self.watch.rss()
        self.base_sockets = self._settled_sockets()
        self.stats["fds_at_start"] = self.watch.fds()
        self.watch.new_log_errors()

    def _settled_sockets(self) -> int:
        """The broker's TCP socket count once it stops changing (admin HTTP requests end)."""
        last, since = self.watch.tcp_sockets(), time.monotonic()
        deadline = since + 10
        while time.monotonic() < deadline:
            time.sleep(0.05)
            now = self.watch.tcp_sockets()
            if now != last:
                last, since = now, time.monotonic()
            elif time.monotonic() - since >= 0.3:
                break
        return last

    def finish(self) -> list[str]:
        """Close every fuzz connection; sockets back to the baseline, no foreign files, canary healthy."""
        problems = self.health()
        while self.lingering:
            self.lingering.popleft().close()
        deadline = time.monotonic() + 15
        while self.watch.tcp_sockets() != self.base_sockets and time.monotonic() < deadline:
            time.sleep(0.05)
        sockets = self.watch.tcp_sockets()
        self.stats["fds_at_end"] = self.watch.fds()
        if sockets != self.base_sockets:
            problems.append(f"broker holds {sockets} TCP sockets after the fuzz, {self.base_sockets} before")
        if foreign := self.watch.foreign_files():
            problems.append(f"broker holds files outside its data directory: {foreign[:5]}")
        assert self.canary is not None
        self.canary.stop()
        if stall := self.canary.stall(self.canary_bound):
            problems.append(stall)
        summary = self.canary.summary()
        if summary["delivered"] != summary["sent"]:
            problems.append(f"canary: {summary}")
        return problems

    def close(self) -> None:
        """Release whatever is still open (after a failure too)."""
        while self.lingering:
            self.lingering.popleft().close()
        if self.canary is not None and not self.canary._stop.is_set():
            self.canary.stop()

    # -- one example ---------------------------------------------------------------------

    def run_example(self, example: list[Session]) -> list[str]:
        """Play every session, then check what was stored and the broker's health."""
        self.stats["examples"] += 1
        problems: list[str] = []
        played: list[tuple[Session, list[Planned]]] = []
        for i, session in enumerate(example):
            planned, session_problems = self._play(session)
            played.append((session, planned))
            problems += [f"session {i} ({session.mode}): {p}" for p in session_problems]
        problems += self._check_stored(played)
        problems += self.health()
        return problems

    def health(self) -> list[str]:
        """The broker runs, its RSS is bounded, its log is clean, the canary is on time."""
        if not self.watch.alive():
            return ["the broker process is gone"]
        problems = []
        rss = self.watch.rss()
        self.max_rss = max(self.max_rss, rss)
        if rss > self.base_rss + self.rss_bound:
            problems.append(f"broker RSS {rss / MiB:.0f} MiB > baseline {self.base_rss / MiB:.0f} MiB "
                            f"+ {self.rss_bound / MiB:.0f} MiB")
        for record in self.watch.new_log_errors():
            if "internal-error" in KNOWN_BROKER_BUGS and any(s in record for s in ALLOWED_LOG_ERRORS):
                self.bugs_seen["internal-error (log)"] += 1
                continue
            problems.append(f"broker logged: {record[:1500]}")
        assert self.canary is not None
        if stall := self.canary.stall(self.canary_bound):
            problems.append(stall)
        return problems

    # -- planning ------------------------------------------------------------------------

    def _resolve(self, v: Any, mode: str, fresh: list[str] | None) -> Any:
        if isinstance(v, Name):
            if v.source == "fresh" and fresh is not None:
                name = f"fz{'t' if v.kind == 'topic' else 'g'}f{next(self._fresh_seq)}"
                fresh.append(name)
                return name
            if v.kind == "topic":
                return POOL_TOPICS[v.index % len(POOL_TOPICS)] if mode == "reading" else SINK_TOPIC
            return TX_GROUP if v.source == "tx" else POOL_GROUPS[v.index % len(POOL_GROUPS)]
        if isinstance(v, DlqOf):
            group = self._resolve(v.group, mode, fresh)
            return "%DLQ%" + group if isinstance(group, str) else group
        if isinstance(v, TxId):
            return self.world.tx_ids[v.index % len(self.world.tx_ids)]
        if isinstance(v, UnknownTxId):
            return f"FFFFFFFF{v.pos % 2**64:016X}"
        if isinstance(v, Wide):
            return Wide(self._resolve(v.value, mode, fresh))
        if isinstance(v, list | tuple):
            return [self._resolve(x, mode, fresh) for x in v]
        if isinstance(v, dict):
            return {k: self._resolve(x, mode, fresh) for k, x in v.items()}
        return v

    def _encode(self, req: Request, rid: int, mode: str, model: ConnectionModel) -> tuple[bytes, list[str]]:
        """The request's bytes, and the fresh names in it (see FRESH_CAP)."""
        fresh: list[str] = []
        payload = self._resolve(req.payload, mode, fresh)
        if (req.op in (Op.SUBSCRIBE, Op.RECEIVE) and "filter-scan" in KNOWN_BROKER_BUGS and type(payload) is dict
                and _filters(payload.get("tags"))):
            # a filter reads the whole backlog at once (a known bug): not on the big pool topics,
            # nor in a pool group (a group's filter is its last member's)
            payload["topic"], payload["group"] = FILTERED_TOPIC, FILTERED_GROUP
        if req.op == Op.RECEIVE and type(payload) is dict:
            if _in_range(payload.get("wait_ms", 20_000), RECEIVE_WAIT_MS, WAIT_MS_MAX):
                payload["wait_ms"] = RECEIVE_WAIT_MS  # a long poll on an empty topic only makes examples slow
            if "unbounded-leases" in KNOWN_BROKER_BUGS and _in_range(payload.get("invisible_ms", 30_000),
                                                                     RECEIVE_INVISIBLE_MS, INVISIBLE_MS[1]):
                # leases held for hours pile up in broker memory (a known bug): not on the pool topics
                payload["invisible_ms"] = RECEIVE_INVISIBLE_MS
        if req.op == Op.SEND and "unbounded-prepared" in KNOWN_BROKER_BUGS and _many_halves(payload):
            # each unresolved half message holds broker memory (a known bug): not thousands at once
            payload["msgs"] = payload["msgs"][:MAX_HALVES]
        data = frame_bytes(req.op, rid, payload)
        if fresh:
            decoded = _decode_one(data)
            if decoded is not None and not model.refused_whatever_the_state(req.op, decoded[2]):
                if self.fresh_accepted >= FRESH_CAP:
                    return self._encode(Request(req.op, req.rid_kind, self._resolve(req.payload, mode, None)),
                                        rid, mode, model)
                self.fresh_accepted += len(fresh)
        return data, fresh

    def _plan(self, s: Session, model: ConnectionModel) -> tuple[list[Planned], bytes, bytes | None]:
        planned: list[Planned] = []
        stream = bytearray()
        counter = itertools.count(1)

        def rid_of(kind: str) -> int:
            if kind == "zero":
                return 0
            n = next(counter)
            return {"next": n, "negative": -n, "huge": 2**64 - n, "lowest": -(2**63) + n}[kind]

        def barrier() -> None:
            rid = rid_of("next")
            planned.append(Planned(Op.PING, rid, {}, barrier=True))
            stream.extend(frame_bytes(Op.PING, rid, {}))

        tail: bytes | None = None
        for req in s.requests:
            rid = rid_of(req.rid_kind)
            data, fresh = self._encode(req, rid, s.mode, model)
            decoded = _decode_one(data)
            if decoded is None:  # the broker must refuse the frame itself: it ends the session
                tail = data
                break
            planned.append(Planned(decoded[0], decoded[1], decoded[2], fresh))
            stream += data
            if rid == 0:
                barrier()
        if s.mode == "reading":
            barrier()
        if tail is None and s.tail is not None:
            tail = self._tail_bytes(s.tail, s.mode)
        self.stats["frames"] += len(planned) + (tail is not None)
        self.stats["requests"] += sum(not p.barrier for p in planned)
        self.stats["barriers"] += sum(p.barrier for p in planned)
        return planned, bytes(stream), tail

    def _tail_bytes(self, tail: Tail, mode: str) -> bytes:
        if tail.kind == "partial":
            req = tail.data
            data = frame_bytes(req.op, 1, self._resolve(req.payload, mode, []))
            return data[: max(1, len(data) // 2)]
        return tail.data

    # -- playing -------------------------------------------------------------------------

    def _play(self, s: Session) -> tuple[list[Planned], list[str]]:
        model = ConnectionModel(self.world)
        planned, stream, tail = self._plan(s, model)
        self.stats["sessions"] += 1
        self.stats[f"sessions_{s.mode}"] += 1
        self.stats["bytes"] += len(stream) + len(tail or b"")
        client = RawClient(self.broker.address)
        for chunk in _chunks(stream, s):
            client.write(chunk)
        problems: list[str] = []
        if s.mode == "reading":
            try:
                problems = self._judge(client, planned, model)
                if tail is not None and not problems:
                    problems += self._malformed_tail(client, tail)
            finally:
                client.close(reset=s.reset)
        else:
            if tail is not None:
                client.write(tail)
            for p in planned:
                if not p.barrier and model.refused_whatever_the_state(p.op, p.payload):
                    p.answer = "refused"
            if s.linger:
                self.lingering.append(client)
                while len(self.lingering) > 4:
                    self.lingering.popleft().close(reset=True)
            else:
                client.close(reset=s.reset)
        return planned, problems

    def _judge(self, client: RawClient, planned: list[Planned], model: ConnectionModel) -> list[str]:
        awaited = {p.rid for p in planned if p.rid != 0 and (p.barrier or p.op not in (Op.REPLY, Op.ERROR))}
        answers: dict[int, tuple[int, Any]] = {}
        zero_errors: dict[int, list[Any]] = {}  # barrier index -> rid-0 ERROR payloads before it
        barrier_rids = [p.rid for p in planned if p.barrier]
        problems: list[str] = []
        seen = 0

        def absorb() -> None:
            nonlocal seen
            for op, rid, payload in client.frames[seen:]:
                seen += 1
                if op in (Op.DELIVER, Op.CHECK):
                    continue
                if op not in (Op.REPLY, Op.ERROR):
                    problems.append(f"unexpected op {op} rid {rid} from the broker")
                elif rid == 0 and op == Op.ERROR:
                    done = sum(r in answers for r in barrier_rids)
                    zero_errors.setdefault(done, []).append(payload)
                elif rid in answers:
                    problems.append(f"second answer to rid {rid}: {op} {str(payload)[:200]}")
                else:
                    answers[rid] = (op, payload)

        def complete() -> bool:
            absorb()
            return awaited <= answers.keys()

        if not client.read_until(complete, ANSWER_TIMEOUT):
            missing = sorted(awaited - answers.keys())[:10]
            return problems + [f"no answer to rids {missing} within {ANSWER_TIMEOUT}s (eof={client.eof}, "
                               f"broken={client.broken}); planned: {_describe(planned)}"]
        segment = 0
        for p in planned:
            if p.barrier:
                segment += 1
            expect = p.expect = model.expect(p.op, p.payload)
            code: int | None = None
            reply = None
            if p.rid == 0:
                errs = zero_errors.get(segment, [])
                if len(errs) > 1:
                    problems.append(f"{len(errs)} ERRORs with rid 0 for one request: {errs}")
                p.answer = "error" if errs else ("none" if p.op in (Op.REPLY, Op.ERROR) else "ok")
                payload = errs[0] if errs else None
            else:
                op, payload = answers.get(p.rid, (None, None))
                p.answer = "ok" if op == Op.REPLY else "error" if op == Op.ERROR else "none"
                reply = payload if op == Op.REPLY else None
            if p.answer == "error":
                if not isinstance(payload, dict) or type(payload.get("code")) is not int \
                        or type(payload.get("message")) is not str:
                    problems.append(f"malformed ERROR payload {str(payload)[:200]}")
                    continue
                code = payload["code"]
            why = expect.problem(p.answer, code)
            if why is None and p.answer == "error" and code == 1:
                self.bugs_seen["internal-error"] += 1
            elif why is None and expect.bugs and p.answer == "ok":
                self.bugs_seen.update(expect.bugs)
            if why:
                detail = f" ({payload.get('message', '')[:200]})" if isinstance(payload, dict) else ""
                problems.append(f"{_name(p.op)} rid {p.rid} {_short(p.payload)}: {why}{detail}")
            problems += model.observe(p.op, p.payload, expect, p.answer, reply)
        if zero_errors.get(segment):
            problems.append(f"ERROR rid 0 after the last barrier: {zero_errors[segment]}")
        return problems

    def _malformed_tail(self, client: RawClient, tail: bytes) -> list[str]:
        try:
            FrameDecoder(FRAME_LIMIT, MAX_FRAME_ITEMS).feed(tail)
        except FrameTooLargeError:
            want = 4
        except ProtocolError:
            want = 8
        else:  # incomplete (the broker waits for the rest) or, by chance, well formed: not judged
            client.write(tail)
            return []
        start = len(client.frames)
        client.write(tail)
        client.read_until(lambda: False, TAIL_TIMEOUT)  # until the broker closes
        self.stats["malformed_answered"] += 1
        got = [f for f in client.frames[start:] if f[0] not in (Op.DELIVER, Op.CHECK)]
        errors = [f for f in got if f[0] == Op.ERROR and f[1] == 0]
        problems = []
        if not client.eof and not client.broken:
            problems.append(f"connection still open {TAIL_TIMEOUT}s after a malformed frame {tail[:40]!r}")
        if len(errors) != 1 or len(got) != 1 or not isinstance(errors[0][2], dict) \
                or errors[0][2].get("code") != want:
            problems.append(f"malformed frame {tail[:40]!r}: expected one ERROR rid 0 code {want}, got {got!r}")
        return problems

    # -- stored state --------------------------------------------------------------------

    def _check_stored(self, played: list[tuple[Session, list[Planned]]]) -> list[str]:
        topics = set(self.watch.topic_counts())
        groups = self.watch.group_names()
        problems: list[str] = []
        for _session, planned in played:
            for p in planned:
                created: set[str] = set()
                if p.answer == "ok" and p.op == Op.SEND:
                    topic = p.payload["topic"]
                    created.add(topic)
                    if not bool(p.payload.get("half", False)) and topic in self.expected:
                        self.expected[topic] += len(p.payload["msgs"])
                elif p.answer == "ok" and p.op in (Op.SUBSCRIBE, Op.RECEIVE):
                    created.add(p.payload["group"])
                    if not p.payload["topic"].startswith("%"):
                        created.add(p.payload["topic"])
                for name in created:
                    if name not in topics and name not in groups and name.startswith("fz"):
                        problems.append(f"accepted {_name(p.op)} {_short(p.payload)}: {name} not listed")
                if p.answer in ("error", "none", "refused", "ok"):
                    for name in p.fresh:
                        if name not in created and (name in topics or name in groups):
                            problems.append(f"{_name(p.op)} answered {p.answer} {_short(p.payload)} "
                                            f"left {name} behind")
        deadline = time.monotonic() + 10
        while True:
            counts = self.watch.topic_counts()
            got = {t: counts.get(t, 0) for t in self.expected}
            over = {t: (got[t], n) for t, n in self.expected.items() if got[t] > n}
            if over:
                return problems + [f"pool topics hold more messages than accepted (got, expected): {over}"]
            if got == self.expected:
                return problems
            if time.monotonic() > deadline:
                return problems + [f"pool topic counts {got}, expected {self.expected}"]
            time.sleep(0.02)


def _filters(tags: Any) -> bool:
    """Whether a subscription's ``tags`` select some tags (not all: ``*``, empty, ``||``)."""
    return type(tags) is str and any(t.strip() for t in tags.split("||")) and tags.strip() != "*"


def _in_range(value: Any, above: int, up_to: int) -> bool:
    return type(value) is int and above < value <= up_to


def _many_halves(payload: Any) -> bool:
    return (type(payload) is dict and type(payload.get("msgs")) is list and len(payload["msgs"]) > MAX_HALVES
            and bool(payload.get("half", False)))


def _decode_one(data: bytes) -> tuple[int, int, Any] | None:
    """The frame as the broker decodes it, or None if the broker must refuse it."""
    try:
        frames = FrameDecoder(FRAME_LIMIT, MAX_FRAME_ITEMS).feed(data)
    except (ProtocolError, FrameTooLargeError):
        return None
    assert len(frames) == 1
    return frames[0]


def _chunks(stream: bytes, s: Session) -> list[bytes]:
    if s.bytewise and len(stream) <= 4096:
        return [stream[i : i + 1] for i in range(len(stream))]
    cuts = sorted({int(f * len(stream)) for f in s.cuts} - {0, len(stream)})
    bounds = [0, *cuts, len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(bounds) if b > a]


def _name(op: int) -> str:
    try:
        return Op(op).name
    except ValueError:
        return f"op {op}"


def _short(value: Any) -> str:
    import reprlib

    r = reprlib.Repr()
    r.maxlevel, r.maxstring, r.maxother, r.maxlist, r.maxdict = 4, 60, 60, 6, 8
    return r.repr(value)


def _describe(planned: list[Planned]) -> str:
    return "; ".join(f"{_name(p.op)} rid {p.rid}" for p in planned)[:2000]
