"""SPEC §2 behaviours of a real ``python -m broker`` process, driven over raw sockets.

Ready line, graceful stop on SIGTERM/SIGINT, the lock refusal, option precedence, and
bad input (malformed frames, bad names, oversized bodies) answered with a clear error
while other clients keep working and nothing is stored.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from consumer_sdk import ConsumeResult, PushConsumer
from producer_sdk import Producer
from protocol import FrameDecoder, Op, encode_frame
from tests.conftest import ROOT, wait_for


class RawClient:
    """A minimal protocol client: one request at a time, frames in order."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.decoder = FrameDecoder()
        self.frames: list[tuple[int, int, object]] = []
        self.rid = 0

    @classmethod
    async def connect(cls, address: str, role: str = "producer", group: str | None = "pg") -> RawClient:
        host, port = address.split(",")[0].rsplit(":", 1)  # the first of a list
        c = cls(*await asyncio.open_connection(host, int(port)))
        op, payload = await c.request(Op.HELLO, {"version": 1, "client_id": f"raw-{id(c)}", "role": role, "group": group})
        assert op == Op.REPLY, payload
        return c

    async def next_frame(self, timeout: float = 5.0) -> tuple[int, int, object]:
        deadline = time.monotonic() + timeout
        while not self.frames:
            data = await asyncio.wait_for(self.reader.read(65536), max(0.01, deadline - time.monotonic()))
            if not data:
                raise ConnectionError("closed by broker")
            self.frames += self.decoder.feed(data)
        return self.frames.pop(0)

    async def request(self, op: int, payload: object) -> tuple[int, object]:
        self.rid += 1
        self.writer.write(encode_frame(op, self.rid, payload))
        while True:
            fop, rid, p = await self.next_frame()
            if rid == self.rid and fop in (Op.REPLY, Op.ERROR):
                return fop, p

    async def send(self, topic: str, body: bytes = b"x", **kw) -> tuple[int, object]:
        msg = [body, kw.get("tags"), kw.get("keys", []), kw.get("props", {}), int(time.time() * 1000)]
        return await self.request(Op.SEND, {"topic": topic, "msgs": [msg]})

    def close(self) -> None:
        self.writer.close()
        self.writer.transport.abort()


def http_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def topic_names(broker) -> set[str]:
    return {t["topic"] for t in http_json(broker.http_url + "/api/topics")["topics"]}


def test_ready_line_names_both_ports_and_the_absolute_data_dir(broker):
    parts = broker.ready_line.split()
    assert parts[:3] == ["halfmq", "broker", "ready"]
    fields = dict(p.split("=", 1) for p in parts[3:])
    assert set(fields) == {"tcp", "http", "data"}
    assert Path(fields["data"]).is_absolute() and Path(fields["data"]) == broker.data_dir.resolve()
    assert http_json(broker.http_url + "/healthz")["status"] == "ok"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_gracefully_with_status_0(broker_factory, sig):
    b = broker_factory()
    b.proc.send_signal(sig)
    assert b.proc.wait(20) == 0


def test_second_broker_on_the_same_data_dir_refuses_naming_dir_and_pid(broker_factory, tmp_path):
    b = broker_factory()
    r = subprocess.run(
        [sys.executable, "-m", "broker", "--data-dir", str(b.data_dir), "--port", "0", "--http-port", "0"],
        cwd=ROOT, capture_output=True, text=True, timeout=30,
    )
    assert r.returncode != 0
    assert str(b.data_dir.resolve()) in r.stderr or str(b.data_dir) in r.stderr
    assert str(b.proc.pid) in r.stderr
    assert "ready" not in r.stdout


def _ready_data_dir(args: list[str], env: dict[str, str], cwd: Path) -> str:
    p = subprocess.Popen([sys.executable, "-m", "broker", "--port", "0", "--http-port", "0", *args],
                         cwd=cwd, env={**os.environ, "PYTHONPATH": str(ROOT), **env},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = p.stdout.readline()
        assert line.startswith("halfmq broker ready"), p.stderr.read() if p.poll() is not None else line
        return line.split("data=", 1)[1].strip()
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(20)
        p.stdout.close()
        p.stderr.close()


def test_option_precedence_flag_over_env_over_file(tmp_path):
    cfg = tmp_path / "halfmq.toml"
    cfg.write_text(f'[broker]\ndata_dir = "{(tmp_path / "from-file").as_posix()}"\n')
    env_dir = str(tmp_path / "from-env")
    flag_dir = str(tmp_path / "from-flag")
    base = ["--config", str(cfg)]
    assert _ready_data_dir(base, {}, tmp_path) == str(tmp_path / "from-file")
    assert _ready_data_dir(base, {"HALFMQ_DATA_DIR": env_dir}, tmp_path) == env_dir
    assert _ready_data_dir([*base, "--data-dir", flag_dir], {"HALFMQ_DATA_DIR": env_dir}, tmp_path) == flag_dir


def test_bad_option_value_is_a_clear_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "broker", "--tx-timeout", "soon", "--data-dir", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "tx_timeout" in r.stderr and "soon" in r.stderr


def test_segments_too_small_for_the_largest_message_are_refused_at_start(tmp_path):
    r = subprocess.run([sys.executable, "-m", "broker", "--segment-size", "128KiB", "--data-dir", str(tmp_path),
                        "--port", "0", "--http-port", "0"],
                       cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "ready" not in r.stdout
    assert "--segment-size 131072" in r.stderr and "--max-message-size 4194304" in r.stderr
    # the data directory is not left locked; the store keeps its segment size, and a
    # smaller largest message fits it
    assert _ready_data_dir(["--data-dir", str(tmp_path), "--max-message-size", "32KiB"], {}, ROOT)


async def test_malformed_frames_close_only_that_connection(broker):
    good = await RawClient.connect(broker.address)
    for garbage in [b"\x00\x00\x00\x03\xc1\xc1\xc1", (1 << 30).to_bytes(4, "big"), b"\x00\x00\x00\x02\x92\x01"]:
        bad = await RawClient.connect(broker.address)
        bad.writer.write(garbage)
        op, rid, payload = await bad.next_frame()
        assert op == Op.ERROR and payload["code"] in (4, 8) and payload["message"]
        with pytest.raises(ConnectionError):
            await bad.next_frame()
        bad.close()
        op, reply = await good.send("still-works")
        assert op == Op.REPLY, reply
    good.close()


async def test_request_before_hello_and_malformed_requests_get_errors_and_store_nothing(broker):
    host, port = broker.address.rsplit(":", 1)
    c = RawClient(*await asyncio.open_connection(host, int(port)))
    op, p = await c.request(Op.SUBSCRIBE, {"group": "g", "topic": "t"})
    assert op == Op.ERROR and p["code"] == 8 and "HELLO" in p["message"]
    c.close()
    c = await RawClient.connect(broker.address)
    for payload in [{"topic": "t1"}, {"topic": "t1", "msgs": "nope"}, {"topic": "t1", "msgs": [[1, None, [], {}, 0]]},
                    {"topic": "t1", "msgs": [[b"x", 5, [], {}, 0]]}, {"topic": "t1", "msgs": [[b"x", None, [1], {}, 0]]}]:
        op, p = await c.request(Op.SEND, payload)
        assert op == Op.ERROR and p["code"] == 8, p
    op, p = await c.request(99, {})
    assert op == Op.ERROR and p["code"] == 8
    assert "t1" not in topic_names(broker)
    op, _ = await c.send("ok-topic")
    assert op == Op.REPLY
    c.close()


@pytest.mark.parametrize("name", ["bad name", "x" * 128, "%DLQ%g", "a/b", ""])
async def test_bad_topic_names_are_refused_and_nothing_stored(broker, name):
    c = await RawClient.connect(broker.address)
    op, p = await c.send(name)
    assert op == Op.ERROR and p["code"] == 3 and "topic" in p["message"]
    assert name not in topic_names(broker)
    op, _ = await c.send("fine")
    assert op == Op.REPLY  # the connection stays usable
    c.close()


async def test_oversized_body_is_refused_and_others_unaffected(broker_factory):
    b = broker_factory("--max-message-size", "1000")
    c = await RawClient.connect(b.address)
    other = await RawClient.connect(b.address)
    op, p = await c.send("big", b"x" * 1001)
    assert op == Op.ERROR and p["code"] == 4 and "1000" in p["message"]
    assert "big" not in topic_names(b)
    op, _ = await c.send("big", b"x" * 1000)
    assert op == Op.REPLY
    op, _ = await other.send("other")
    assert op == Op.REPLY
    c.close()
    other.close()


async def test_a_topic_whose_metadata_row_was_lost_is_listed_again_with_its_messages(broker_factory):
    # the state a crash leaves between an auto-created topic's first stored messages and
    # its metadata row (written right after): the log and the queue indexes hold them
    b = broker_factory()
    async with Producer(b.address) as p:
        sent = {(await p.send("lost", f"m{i}")).msg_id for i in range(5)}
    assert b.stop() == 0
    with sqlite3.connect(b.data_dir / "meta.sqlite") as db:
        assert db.execute("DELETE FROM topics WHERE name = 'lost'").rowcount == 1
    again = broker_factory("--no-auto-create-topics", data_dir=b.data_dir)
    assert "lost" in topic_names(again)
    assert "recovered topic lost (4 queues)" in again.log_path.read_text()
    got: list[str] = []

    def take(m):
        got.append(m.msg_id)
        return ConsumeResult.SUCCESS

    async with PushConsumer(again.address, group="g", topic="lost", listener=take):
        await wait_for(lambda: set(got) == sent, what="the 5 messages")


async def test_no_auto_create_refuses_unknown_topics_and_default_queues_apply(broker_factory):
    closed = broker_factory("--no-auto-create-topics")
    c = await RawClient.connect(closed.address)
    op, p = await c.send("nowhere")
    assert op == Op.ERROR and p["code"] == 9 and "nowhere" in p["message"]
    assert "nowhere" not in topic_names(closed)
    c.close()
    open_ = broker_factory("--default-queues", "3")
    c = await RawClient.connect(open_.address)
    assert (await c.send("three"))[0] == Op.REPLY
    topics = http_json(open_.http_url + "/api/topics")["topics"]
    assert [len(t["queues"]) for t in topics if t["topic"] == "three"] == [3]
    c.close()
