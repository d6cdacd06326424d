"""One NATS connection to the engine: publishes that retry to a deadline, API calls, gets.

How this works
--------------
``EngineClient`` wraps a nats-py connection (reconnecting forever, every engine URL in
its server list). A server that stops answering without closing the connection (a paused
or hung process, a frozen network path) is noticed by pings: one every ``PING_INTERVAL``
second, the connection is given up after ``MAX_OUTSTANDING_PINGS`` unanswered ones and
made again to another server (nats-py's default, a ping every 2 minutes, left a gateway
connected to a stopped node stuck for as long as the node was stopped). What it adds:

- ``publish()``: a JetStream publish is a request to the stream's leader, answered by a
  PubAck once a quorum stored it (fsynced, with ``sync_interval: always``). During a
  failover the request times out or gets "no responders"; ``publish()`` then sends it
  again, same payload and headers, every ``attempt_timeout`` until ``deadline`` seconds
  have passed, then raises ``EngineUnavailableError``. Callers that may be retried set
  ``msg_id`` (``Nats-Msg-Id``) so the stream's duplicate window stores the message once
  whatever the number of attempts (measured: 0 lost, 0 duplicated over 26 leader kills).
  While an attempt with the same id is still being replicated the server answers
  "duplicate message id is in process"; ``publish()`` then asks again shortly after, and
  gets the stored one's ack as a duplicate (or stores it, if that attempt failed).
  ``expected_last_subject_seq`` makes it a compare-and-set on the subject; losing it
  raises ``WrongLastSequenceError`` (also when another write to that subject is still
  being replicated: that one may yet fail, so the caller reads and, if nothing is
  there, tries again). The server checks ``Nats-Msg-Id`` before the
  expected sequence, so an attempt whose first try was stored but whose ack was lost
  comes back as a duplicate ack, not as a lost compare-and-set.
- ``api()``: a ``$JS.API.*`` request (JSON in, JSON out) with the same retry on
  timeout/no responders, raising ``EngineAPIError`` for an error answer.
- ``get()`` / ``get_last()``: read one stored message. ``direct=True`` asks any replica
  (``allow_direct`` streams; cheapest, but a follower may lag); a 404 from a replica is
  confirmed with the leader before ``None`` is returned, so a message that exists is
  never reported missing.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import nats
import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

__all__ = ["EngineAPIError", "EngineClient", "EngineUnavailableError", "PubAck", "StoredMsg",
           "WrongLastSequenceError"]

log = logging.getLogger("halfmq.engine")

JS_API = "$JS.API"
ERR_WRONG_LAST_SEQUENCE = 10071
ERR_WRONG_LAST_SEQUENCE_INFLIGHT = 10164  # another write to the subject is being replicated
ERR_DUPLICATE_IN_PROCESS = 10158  # a publish with the same Nats-Msg-Id is being replicated
ERR_STREAM_NOT_FOUND = 10059
ERR_NO_MESSAGE_FOUND = 10037
ERR_CONSUMER_NOT_FOUND = 10014


class EngineUnavailableError(RuntimeError):
    """The engine did not answer before the deadline (failover longer than it, or no quorum)."""


class EngineAPIError(RuntimeError):
    """The engine answered with an error (``code``: HTTP-like, ``err_code``: JetStream's)."""

    def __init__(self, code: int, err_code: int, description: str) -> None:
        super().__init__(f"{description} (code {code}, err_code {err_code})")
        self.code = code
        self.err_code = err_code
        self.description = description


class WrongLastSequenceError(EngineAPIError):
    """A compare-and-set publish lost: the subject's last sequence was not the expected one."""


@dataclass(frozen=True, slots=True)
class PubAck:
    """Where the engine stored a publish; ``duplicate``: an earlier attempt had stored it."""

    stream: str
    seq: int
    duplicate: bool = False


@dataclass(frozen=True, slots=True)
class StoredMsg:
    """One stored message as read back."""

    stream: str
    subject: str
    seq: int
    data: bytes
    headers: dict[str, str]
    time_ms: int  # the engine leader's clock when it was stored


def _collect(task: asyncio.Task[Any]) -> None:
    """Done callback: take a finished task's exception, so it is not reported as never
    retrieved (logged at debug level)."""
    if not task.cancelled() and task.exception() is not None:
        log.debug("nats-py's %s ended with %r", task.get_coro(), task.exception())


def _error_from(resp: dict[str, Any]) -> EngineAPIError:
    err = resp.get("error") or {}
    code, err_code, desc = int(err.get("code", 0)), int(err.get("err_code", 0)), str(err.get("description", "?"))
    if err_code in (ERR_WRONG_LAST_SEQUENCE, ERR_WRONG_LAST_SEQUENCE_INFLIGHT):
        return WrongLastSequenceError(code, err_code, desc)
    return EngineAPIError(code, err_code, desc)


#: seconds between pings to the engine server, and how many may go unanswered before the
#: connection is given up for another server (a stopped server is left within ~3 s)
PING_INTERVAL = 1
MAX_OUTSTANDING_PINGS = 3


def _time_ms(iso: str) -> int:
    """``2026-12-06T17:08:09.123456789Z`` → epoch milliseconds (no float rounding of the ns)."""
    import datetime

    head, _, frac = iso.rstrip("Z").partition(".")
    dt = datetime.datetime.fromisoformat(head).replace(tzinfo=datetime.UTC)
    return int(dt.timestamp()) * 1000 + int((frac + "000")[:3])


class EngineClient:
    """A connection to the engine. Keyword options: ``name`` (connection name shown by the
    server, default ``"halfmq"``), ``attempt_timeout`` (2.0 s: one try of a request)."""

    def __init__(self, urls: list[str], *, name: str = "halfmq", attempt_timeout: float = 2.0) -> None:
        self.urls = list(urls)
        self.name = name
        self.attempt_timeout = attempt_timeout
        self._nc: NATS | None = None
        self._reply_prefix: str | None = None
        self._replies: dict[str, asyncio.Future[Msg]] = {}
        self._tokens = itertools.count(1)

    @property
    def nc(self) -> NATS:
        """The underlying nats-py connection (``connect()`` first)."""
        if self._nc is None:
            raise RuntimeError("EngineClient.connect() has not been called")
        return self._nc

    async def connect(self, timeout: float = 10.0) -> None:
        """Connect to the first engine URL that answers; raises ``EngineUnavailableError``."""
        async def on_error(exc: Exception) -> None:
            # reconnects are expected; errors surface per call. A reconnect attempt that failed
            # before it was connected is dropped by nats-py without closing its socket: a
            # stopped node accepts the TCP connection and says nothing (the wait for its INFO
            # times out), a node going down or coming up closes it before its INFO (nats-py
            # raises its own Error). Close it here, whatever the error nats-py catches there,
            # or the gateway keeps one open socket per failed attempt until garbage collection
            nc = self._nc
            if nc is not None and nc.is_connecting and isinstance(exc, (TimeoutError, OSError, nats.errors.Error)):
                transport = getattr(nc, "_transport", None)
                if transport is not None:
                    transport.close()

        try:
            self._nc = await asyncio.wait_for(nats.connect(
                servers=self.urls, name=self.name, max_reconnect_attempts=-1,
                reconnect_time_wait=0.25, connect_timeout=min(2.0, timeout),
                ping_interval=PING_INTERVAL, max_outstanding_pings=MAX_OUTSTANDING_PINGS,
                error_cb=on_error, allow_reconnect=True,
                pending_size=64 * 1024 * 1024,
            ), timeout)
        except (TimeoutError, OSError, nats.errors.Error) as exc:
            raise EngineUnavailableError(f"cannot connect to the engine at {', '.join(self.urls)}: {exc}") from None

    async def close(self) -> None:
        """Flush and close the connection.

        Closed while reconnecting with publishes buffered (the engine unreachable), nats-py
        flushes them into the lost connection, raises ``ConnectionResetError`` and stops
        before closing its socket. Those publishes were never acknowledged, so nothing is
        lost by dropping them; the socket is closed here and the close completes. nats-py's
        reconnect task, cancelled by the close, can still end in ``InvalidStateError``
        afterwards: its outcome is collected, not left to the loop's error handler."""
        nc = self._nc
        if nc is None or nc.is_closed:
            return
        reconnecting = getattr(nc, "_reconnection_task", None)
        if reconnecting is not None:
            reconnecting.add_done_callback(_collect)
        try:
            await nc.close()
        except OSError as exc:
            log.info("engine connection lost while closing (%s); its unsent publishes dropped", exc)
            transport = getattr(nc, "_transport", None)
            if transport is not None:
                transport.close()

    async def request(self, subject: str, payload: bytes, *, headers: dict[str, str] | None = None,
                      deadline: float = 15.0) -> Msg:
        """Core request with retries on timeout/no responders until ``deadline`` seconds pass."""
        end = time.monotonic() + deadline
        last: Exception | None = None
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise EngineUnavailableError(f"no answer on {subject} within {deadline:g}s: {last!r}")
            try:
                return await self.nc.request(subject, payload, timeout=min(self.attempt_timeout, left),
                                             headers=headers)
            except (nats.errors.TimeoutError, TimeoutError) as exc:
                last = exc
            except nats.errors.Error as exc:  # no responders, closed, reconnect buffer full
                last = exc
                await asyncio.sleep(min(0.05, max(0.0, end - time.monotonic())))

    async def publish(self, subject: str, payload: bytes, *, msg_id: str | None = None,
                      expected_last_subject_seq: int | None = None,
                      headers: dict[str, str] | None = None, deadline: float = 15.0) -> PubAck:
        """Store one message; returns its ``PubAck``.

        Raises ``WrongLastSequenceError`` (compare-and-set lost), ``EngineAPIError`` (e.g. no
        stream takes the subject), ``EngineUnavailableError`` (no ack before ``deadline``).
        """
        hdrs = dict(headers) if headers else {}
        if msg_id is not None:
            hdrs["Nats-Msg-Id"] = msg_id
        if expected_last_subject_seq is not None:
            hdrs["Nats-Expected-Last-Subject-Sequence"] = str(expected_last_subject_seq)
        (result,) = await self.publish_many([(subject, payload, hdrs or None)], deadline=deadline)
        if isinstance(result, Exception):
            raise result
        return result

    async def publish_many(self, items: Sequence[tuple[str, bytes, dict[str, str] | None]], *,
                           deadline: float = 15.0) -> list[PubAck | EngineAPIError | EngineUnavailableError]:
        """Store many messages, all in flight at once; returns, in order, each one's ``PubAck``
        or the error that stopped it (never raises for one message's failure).

        ``items``: ``(subject, payload, headers)``. Unanswered ones (timeout, no responders,
        the same ``Nats-Msg-Id`` in flight) are sent again until ``deadline`` seconds pass.
        No task per message: one reply subscription resolves a future per publish.
        """
        if self._reply_prefix is None:
            await self._start_replies()
        assert self._reply_prefix is not None
        loop = asyncio.get_running_loop()
        end = time.monotonic() + deadline
        results: list[PubAck | EngineAPIError | EngineUnavailableError | None] = [None] * len(items)
        todo = list(range(len(items)))
        nc = self.nc
        while todo:
            waiting: list[tuple[int, str, asyncio.Future[Msg]]] = []
            again: list[int] = []
            pause = False
            for i in todo:
                subject, payload, hdrs = items[i]
                token = str(next(self._tokens))
                try:
                    await nc.publish(subject, payload, reply=self._reply_prefix + token, headers=hdrs)
                except nats.errors.Error:  # closed, draining, reconnect buffer full: later
                    again.append(i)
                    pause = True
                    continue
                fut: asyncio.Future[Msg] = loop.create_future()
                self._replies[token] = fut
                waiting.append((i, token, fut))
            left = end - time.monotonic()
            if waiting:
                await asyncio.wait([w[2] for w in waiting], timeout=max(0.0, min(self.attempt_timeout, left)))
            for i, token, fut in waiting:
                self._replies.pop(token, None)
                if not fut.done():
                    fut.cancel()
                    again.append(i)
                    continue
                msg = fut.result()
                if not msg.data and (msg.headers or {}).get("Status") == "503":
                    again.append(i)  # no responders: no stream leader right now
                    pause = True
                    continue
                resp = json.loads(msg.data)
                if "error" not in resp:
                    results[i] = PubAck(resp["stream"], int(resp["seq"]), bool(resp.get("duplicate", False)))
                    continue
                err = _error_from(resp)
                if err.err_code == ERR_DUPLICATE_IN_PROCESS:  # its outcome decides ours: ask again
                    again.append(i)
                    pause = True
                else:
                    results[i] = err
            if again and time.monotonic() >= end:
                for i in again:
                    results[i] = EngineUnavailableError(
                        f"no ack for a publish to {items[i][0]} within {deadline:g}s")
                break
            if again and pause:
                await asyncio.sleep(min(0.05, max(0.0, end - time.monotonic())))
            todo = again
        return [r for r in results if r is not None]

    async def _start_replies(self) -> None:
        prefix = self.nc.new_inbox() + "."
        replies = self._replies
        skip = len(prefix)

        async def on_reply(msg: Msg) -> None:
            fut = replies.pop(msg.subject[skip:], None)
            if fut is not None and not fut.done():
                fut.set_result(msg)

        await self.nc.subscribe(prefix + "*", cb=on_reply, pending_msgs_limit=1_000_000,
                                pending_bytes_limit=1024 * 1024 * 1024)
        self._reply_prefix = prefix

    async def api(self, endpoint: str, body: dict[str, Any] | None = None, *,
                  deadline: float = 15.0) -> dict[str, Any]:
        """``$JS.API.<endpoint>`` request; returns the JSON answer, raises ``EngineAPIError``."""
        payload = json.dumps(body).encode() if body is not None else b""
        msg = await self.request(f"{JS_API}.{endpoint}", payload, deadline=deadline)
        resp: dict[str, Any] = json.loads(msg.data)
        if "error" in resp:
            raise _error_from(resp)
        return resp

    async def get(self, stream: str, seq: int, *, direct: bool = True,
                  deadline: float = 15.0) -> StoredMsg | None:
        """Message ``seq`` of ``stream``, or None if the stream does not hold it."""
        if direct:
            found = await self._direct(stream, {"seq": seq}, deadline)
            if found is not None:
                return found
        return await self._leader_get(stream, {"seq": seq}, deadline)

    async def get_last(self, stream: str, subject: str, *, direct: bool = False,
                       deadline: float = 15.0) -> StoredMsg | None:
        """The last message on ``subject`` (from the leader unless ``direct``), or None."""
        if direct:
            found = await self._direct(stream, {"last_by_subj": subject}, deadline)
            if found is not None:
                return found
        return await self._leader_get(stream, {"last_by_subj": subject}, deadline)

    async def _direct(self, stream: str, body: dict[str, Any], deadline: float) -> StoredMsg | None:
        msg = await self.request(f"{JS_API}.DIRECT.GET.{stream}", json.dumps(body).encode(),
                                 deadline=deadline)
        hdrs = dict(msg.headers or {})
        status = hdrs.get("Status")
        if status:
            if status == "404":
                return None
            raise EngineAPIError(int(status) if status.isdigit() else 0, 0,
                                 hdrs.get("Description", "direct get failed"))
        return StoredMsg(hdrs.get("Nats-Stream", stream), hdrs["Nats-Subject"], int(hdrs["Nats-Sequence"]),
                         msg.data, hdrs, _time_ms(hdrs["Nats-Time-Stamp"]))

    async def _leader_get(self, stream: str, body: dict[str, Any], deadline: float) -> StoredMsg | None:
        import base64

        try:
            resp = await self.api(f"STREAM.MSG.GET.{stream}", body, deadline=deadline)
        except EngineAPIError as exc:
            if exc.err_code in (ERR_NO_MESSAGE_FOUND, ERR_STREAM_NOT_FOUND):
                return None
            raise
        m = resp["message"]
        headers: dict[str, str] = {}
        if m.get("hdrs"):
            raw = base64.b64decode(m["hdrs"]).decode("utf-8", "replace")
            for line in raw.split("\r\n")[1:]:
                if ":" in line:
                    k, v = line.split(":", 1)
                    headers[k.strip()] = v.strip()
        data = base64.b64decode(m["data"]) if m.get("data") else b""
        return StoredMsg(stream, m["subject"], int(m["seq"]), data, headers, _time_ms(m["time"]))
