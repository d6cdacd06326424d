"""Instruments for tests that attack a real broker process over raw sockets.

How this works
--------------
- ``RawClient`` is a blocking TCP client that writes exactly the bytes it is given (in as
  many writes as asked) and decodes whatever comes back, noting end of stream.
- ``BrokerWatch`` looks at the broker process from outside: RSS, descriptors and sockets
  (psutil), its admin HTTP API, and the ERROR records its log gained since the last look.
- ``Canary`` is the well-behaved client: a ``Producer`` and a ``PushConsumer`` on their own
  connections, in a thread with its own event loop, sending a numbered message every
  ``interval`` and timing each one until it is delivered. ``stall()`` says whether one has
  waited longer than a bound; ``summary()`` gives the latencies.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import statistics
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from consumer_sdk import ConsumeResult, PushConsumer
from producer_sdk import HalfMQError, Producer
from protocol import FrameDecoder
from tests.faults.fuzz_wire import frame_bytes

__all__ = ["RawClient", "BrokerWatch", "Canary", "MiB"]

MiB = 1 << 20
_LOG_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (\w+) ")


class RawClient:
    """A blocking TCP connection to ``address`` that sends raw bytes and decodes frames."""

    def __init__(self, address: str, *, rcvbuf: int | None = None, timeout: float = 5.0) -> None:
        host, port = address.rsplit(":", 1)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:  # before connect, so the window is small from the start
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect((host, int(port)))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.decoder = FrameDecoder(1 << 30)
        self.frames: list[tuple[int, int, Any]] = []
        self.eof = False
        self.broken = False  # the peer reset the connection or the decoder refused its bytes

    def write(self, data: bytes) -> bool:
        """Send all of ``data``; False if the broker had already closed the connection."""
        try:
            self.sock.sendall(data)
            return True
        except OSError:
            self.broken = True
            return False

    def read_until(self, done: Callable[[], bool], timeout: float) -> bool:
        """Read frames until ``done()`` is true (returns True), end of stream or ``timeout``."""
        deadline = time.monotonic() + timeout
        while not done():
            if self.eof or self.broken:
                return False
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self.sock.settimeout(min(remaining, 1.0))
            try:
                data = self.sock.recv(1 << 20)
            except TimeoutError:
                continue
            except OSError:
                self.broken = True
                return False
            if not data:
                self.eof = True
                return done()
            try:
                self.frames += self.decoder.feed(data)
            except HalfMQError:
                self.broken = True
                return False
        return True

    def request(self, op: int, rid: int, payload: Any, timeout: float = 10.0) -> tuple[int, int, Any]:
        """Send one frame and return the answer with the same rid (raises AssertionError if none).

        ``payload`` may hold the values of ``fuzz_wire.pack`` (e.g. ``Deep``)."""
        self.write(frame_bytes(op, rid, payload))
        assert self.read_until(lambda: any(f[1] == rid for f in self.frames), timeout), \
            f"no answer to rid {rid} (eof={self.eof}, frames={self.frames[-3:]!r})"
        frame = next(f for f in self.frames if f[1] == rid)
        self.frames.remove(frame)
        return frame

    def close(self, *, reset: bool = False) -> None:
        """Close; with ``reset`` the kernel sends RST instead of FIN (SO_LINGER 0)."""
        if reset:
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            except OSError:
                pass
        self.sock.close()


class BrokerWatch:
    """The broker process seen from outside (psutil, admin HTTP API, its log file)."""

    def __init__(self, pid: int, http_url: str, log_path: Path, data_dir: Path) -> None:
        self.proc = psutil.Process(pid)
        self.http_url = http_url
        self.log_path = log_path
        self.data_dir = str(data_dir.resolve())
        self._log_pos = 0

    def alive(self) -> bool:
        """True while the process runs (not a zombie)."""
        return self.proc.is_running() and self.proc.status() != psutil.STATUS_ZOMBIE

    def rss(self) -> int:
        """Resident set size in bytes."""
        return self.proc.memory_info().rss

    def tcp_sockets(self) -> int:
        """TCP sockets the process holds (listening ones included)."""
        return len(self.proc.net_connections(kind="tcp"))

    def fds(self) -> int:
        """Open descriptors."""
        return self.proc.num_fds()

    def foreign_files(self) -> list[str]:
        """Open regular files that are not in the data directory (should be none)."""
        return sorted(f.path for f in self.proc.open_files() if not f.path.startswith(self.data_dir))

    def get(self, path: str) -> Any:
        """GET ``path`` from the admin API; the decoded JSON."""
        with urllib.request.urlopen(self.http_url + path, timeout=10) as resp:
            return json.load(resp)

    def every(self, name: str) -> list[dict[str, Any]]:
        """Every item of a paginated list (``GET /api/<name>``, pages of 1,000)."""
        items: list[dict[str, Any]] = []
        after: str | None = None
        while True:
            query = urllib.parse.urlencode({"limit": 1000, **({"after": after} if after is not None else {})})
            page = self.get(f"/api/{name}?{query}")
            items += page[name]
            after = page.get("next")
            if after is None:
                return items

    def topic_counts(self) -> dict[str, int]:
        """Messages per topic (``GET /api/topics``)."""
        return {t["topic"]: t["messages"] for t in self.every("topics")}

    def group_names(self) -> set[str]:
        """Consumer groups the broker knows (``GET /api/groups``)."""
        return {g["group"] for g in self.every("groups")}

    def new_log_errors(self) -> list[str]:
        """ERROR and CRITICAL records (with their tracebacks) logged since the last call."""
        with open(self.log_path, "rb") as f:
            f.seek(self._log_pos)
            data = f.read()
        cut = data.rfind(b"\n") + 1  # only whole lines; the rest next time
        self._log_pos += cut
        records: list[list[str]] = []
        for line in data[:cut].decode("utf-8", "replace").splitlines():
            m = _LOG_RECORD.match(line)
            if m:
                records.append([line] if m.group(1) in ("ERROR", "CRITICAL") else [])
            elif records and records[-1]:
                records[-1].append(line)
        return ["\n".join(r) for r in records if r]


class Canary:
    """A well-behaved producer and consumer, timing each of their messages (see module doc)."""

    def __init__(self, address: str, *, topic: str = "canary", group: str = "canary", interval: float = 0.02) -> None:
        self.address, self.topic, self.group, self.interval = address, topic, group, interval
        self._lock = threading.Lock()
        self._sent: dict[int, float] = {}  # seq -> monotonic time the send began
        self._latency: dict[int, float] = {}  # seq -> send-to-delivery seconds
        self._worst = 0.0  # the longest latency since the last stall()
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="canary", daemon=True)

    def start(self, timeout: float = 15.0) -> Canary:
        """Start, and return once a first message went round."""
        self._thread.start()
        if not self._ready.wait(timeout):
            raise AssertionError(f"the canary got no message through in {timeout}s: {self.errors}")
        return self

    def stop(self, timeout: float = 20.0) -> None:
        """Stop sending, let the last messages arrive, close both clients."""
        self._stop.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise AssertionError("the canary did not stop")

    def stall(self, bound: float) -> str | None:
        """Why the canary is unhealthy, or None: errors, a message undelivered for more than
        ``bound`` seconds, or one delivered since the previous call that took longer."""
        now = time.monotonic()
        with self._lock:
            waiting = [s for s in self._sent if s not in self._latency]
            oldest = min((self._sent[s] for s in waiting), default=now)
            errors = list(self.errors)
            worst, self._worst = self._worst, 0.0
        if errors:
            return f"canary errors: {errors[:3]}"
        if now - oldest > bound:
            return f"canary message waiting {now - oldest:.2f}s (> {bound}s); {len(waiting)} undelivered"
        if worst > bound:
            return f"a canary message took {worst:.2f}s (> {bound}s) to be delivered"
        return None

    def summary(self) -> dict[str, float]:
        """Messages sent and delivered, latency p50 / p99 / max in ms."""
        with self._lock:
            lat = sorted(self._latency.values())
            sent = len(self._sent)
        if not lat:
            return {"sent": sent, "delivered": 0}
        q = statistics.quantiles(lat, n=100) if len(lat) >= 2 else [lat[0]] * 99
        return {"sent": sent, "delivered": len(lat), "p50_ms": round(q[49] * 1000, 1),
                "p99_ms": round(q[98] * 1000, 1), "max_ms": round(lat[-1] * 1000, 1)}

    # -- the thread ----------------------------------------------------------------------

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        loop.set_exception_handler(lambda _l, ctx: self.errors.append(f"loop: {ctx.get('message')} {ctx.get('exception')!r}"))
        try:
            loop.run_until_complete(self._main())
        except Exception as exc:  # noqa: BLE001 - reported through stall()
            self.errors.append(f"canary failed: {exc!r}")
        finally:
            loop.close()

    async def _main(self) -> None:
        def on_message(message: Any) -> ConsumeResult:
            seq = int(message.body)
            with self._lock:
                if seq in self._sent and seq not in self._latency:
                    latency = self._latency[seq] = time.monotonic() - self._sent[seq]
                    self._worst = max(self._worst, latency)
            self._ready.set()
            return ConsumeResult.SUCCESS

        async def listener(message: Any) -> ConsumeResult:
            return on_message(message)

        async with Producer(self.address, send_timeout=10.0) as producer, \
                PushConsumer(self.address, group=self.group, topic=self.topic, listener=listener, start="latest"):
            seq = 0
            while not self._stop.is_set():
                seq += 1
                with self._lock:
                    self._sent[seq] = time.monotonic()
                try:
                    await producer.send(self.topic, str(seq).encode())
                except HalfMQError as exc:
                    self.errors.append(f"send {seq}: {exc!r}")
                await asyncio.sleep(self.interval)  # pacing, not waiting for anything
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:  # the last ones arrive
                with self._lock:
                    if len(self._latency) >= len(self._sent):
                        break
                await asyncio.sleep(0.02)
