"""The admin HTTP API (aiohttp, JSON, plus one HTML console page) on ``--http-port``: for
people and tools, never the data plane.

Routes
------
- ``GET /`` — the console: an HTML page of topics, groups and prepared/abandoned
  transactions (see :mod:`broker.console`)
- ``GET /healthz`` — ``{"status": "ok"}``
- ``GET /api/stats`` — store counters (batches, records, writes, fsyncs, bundles,
  ``handed_off``: synced batches written by the writer thread while the loop went on,
  ``loop_disk_wait_ns``: time the event loop spent waiting for the disk in writes and
  fdatasyncs done on it) and messages sent
- ``GET /api/topics`` — topics with their queues and message counts
- ``GET /api/groups`` — per group and topic: delivered, acked, in-flight, waiting retry,
  dead-lettered, lag
- ``GET /api/messages/{msg_id}`` — the message and its state in each group
- ``GET /api/messages?topic=T&key=K`` — messages of a topic carrying a business key
- ``POST /api/dlq/{group}/messages/{msg_id}/resend`` — back to its original topic for that group
- ``GET /api/transactions?state=prepared|abandoned|committed|rolled_back`` — half messages
- ``POST /api/transactions/{msg_id}/commit`` and ``.../rollback`` — resolve one by hand
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

from broker.console import render_console
from broker.delivery import H_KEYS, H_QUEUE, H_TOPIC, RETRY_PREFIX
from broker.lifecycle import TxState
from protocol import DLQ_PREFIX, HalfMQError, TransactionStateError

if TYPE_CHECKING:
    from broker.server import Broker

__all__ = ["start_admin_http", "build_app"]

_SYSTEM_HIDDEN = ("%HALF%", "%OP%")


def _message_json(wire: list[Any]) -> dict[str, Any]:
    body: bytes = wire[2]
    try:
        text: str | None = body.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    return {
        "msg_id": wire[0],
        "topic": wire[1],
        "body": text,
        "body_hex": body.hex() if text is None else None,
        "body_size": len(body),
        "tags": wire[3],
        "keys": list(wire[4]),
        "properties": wire[5],
        "born_timestamp": wire[6],
        "store_timestamp": wire[7],
        "queue_id": wire[8],
        "queue_offset": wire[9],
    }


def build_app(broker: Broker) -> web.Application:
    """The aiohttp application serving the admin API of ``broker``."""
    from broker.server import build_wire, record_msg_id

    store = broker.store
    assert store is not None
    routes = web.RouteTableDef()

    def err(status: int, message: str) -> web.Response:
        return web.json_response({"error": message}, status=status)

    @routes.get("/healthz")
    async def healthz(_req: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "broker_id": broker.broker_id, "data_dir": broker.data_dir})

    def topics_data() -> list[dict[str, Any]]:
        names = set(broker.topics)
        names.update(t for t, _q in store.queues() if t.startswith(DLQ_PREFIX))
        out = []
        for name in sorted(names):
            queues = []
            for q in range(broker.queue_count(name)):
                start, end = store.queue_start(name, q), store.queue_end(name, q)
                queues.append({"queue_id": q, "min_offset": start, "max_offset": end, "messages": end - start})
            out.append({"topic": name, "queues": queues, "messages": sum(q["messages"] for q in queues)})
        return out

    def groups_data() -> list[dict[str, Any]]:
        out = []
        for name, gd in sorted(broker.groups.items()):
            dlq = DLQ_PREFIX + name
            out.append({
                "group": name,
                "topics": sorted(gd.topics()),
                "members": len(gd.members),
                "delivered": gd.stats["delivered"],
                "acked": gd.stats["acked"],
                "failed": gd.stats["failed"],
                "expired": gd.stats["expired"],
                "in_flight": len(gd.leases),
                "waiting_retry": gd.waiting_retry(),
                "dead_lettered": store.queue_end(dlq, 0) - store.queue_start(dlq, 0),
                "lag": gd.lag(),
            })
        return out

    def transactions_data(state: TxState) -> list[dict[str, Any]]:
        now = time.time()
        return [
            {
                "msg_id": hm.msg_id,
                "topic": hm.topic,
                "keys": list(hm.keys),
                "group": hm.group,
                "producer_id": hm.producer_id,
                "state": hm.state.name,
                "age": round(now - hm.prepared_at, 3),
                "checks": hm.checks,
                "next_check_at": hm.next_check_at if hm.state is TxState.PREPARED else None,
            }
            for hm in broker.tx.list(state)
        ]

    @routes.get("/")
    async def console(_req: web.Request) -> web.Response:
        page = render_console(
            broker_id=broker.broker_id, data_dir=str(broker.data_dir), topics=topics_data(),
            groups=groups_data(), prepared=transactions_data(TxState.PREPARED),
            abandoned=transactions_data(TxState.ABANDONED),
        )
        return web.Response(text=page, content_type="text/html")

    @routes.get("/api/stats")
    async def stats(_req: web.Request) -> web.Response:
        return web.json_response({"store": dict(store.stats), "sent": broker.stats.get("sent", 0)})

    @routes.get("/api/topics")
    async def topics(_req: web.Request) -> web.Response:
        return web.json_response({"topics": topics_data()})

    @routes.get("/api/groups")
    async def groups(_req: web.Request) -> web.Response:
        return web.json_response({"groups": groups_data()})

    def _done_in_origin_queue(gd: Any, topic: str, pos: int) -> bool:
        """Whether the group is past the message in its original queue (acked or filtered)."""
        for q in range(broker.queue_count(topic)):
            cur = gd.cursors.get((topic, q))
            if cur is None:
                continue
            for off, entry in store.read_queue(topic, q, store.queue_start(topic, q), 1 << 20):
                if entry.pos == pos:
                    return off < cur.committed or (off < cur.next_offset and off not in cur.inflight)
        return False

    def group_states(msg_id: str, rec: Any) -> dict[str, Any]:
        """The message's state in each group, from leases, retry queues, DLQ and cursors."""
        topic = rec.header[H_TOPIC]
        states: dict[str, Any] = {}
        for name, gd in broker.groups.items():
            if topic not in gd.topics():
                continue
            st: dict[str, Any] = {"deliveries": 0, "state": "pending"}
            # delivered-from-origin: below the committed offset of its queue means done
            retries = []
            rt = RETRY_PREFIX + name
            for (t, q), cur in gd.cursors.items():
                if t != rt:
                    continue
                for off, entry in store.read_queue(t, q, max(store.queue_start(t, q), 0), 100000):
                    r = store.read(entry.pos)
                    if r.header.get("id") == msg_id:
                        due = entry.store_time / 1000.0 + (broker.config.retry_delays[q] if q < len(broker.config.retry_delays) else 0.0)
                        retries.append((r.header["rt"], due, off >= cur.next_offset))
            dlq = DLQ_PREFIX + name
            dead = any(
                record_msg_id(store.read(e.pos)) == msg_id
                for _o, e in store.read_queue(dlq, 0, store.queue_start(dlq, 0), 100000)
            )
            leases = list(gd.lease_of(msg_id))
            st["deliveries"] = max([r[0] for r in retries], default=0) + (1 if (retries or leases or dead) else 0)
            if dead:
                st["state"] = "dead_lettered"
            elif leases:
                st["state"] = "in_flight"
                st["lease_deadline"] = leases[0].deadline
            elif any(r[2] for r in retries):
                waiting = [r for r in retries if r[2]]
                st["state"] = "retrying"
                st["retry_at"] = min(r[1] for r in waiting)
            else:
                done = _done_in_origin_queue(gd, topic, rec.pos)
                st["state"] = "acked" if done else "pending"
                if done and not st["deliveries"]:
                    st["deliveries"] = 1
            states[name] = st
        return states

    @routes.get("/api/messages/{msg_id}")
    async def message(req: web.Request) -> web.Response:
        msg_id = req.match_info["msg_id"]
        try:
            rec = broker.read_message(msg_id)
        except KeyError:
            return err(404, f"no message {msg_id}")
        h = rec.header
        wire = build_wire(rec, h[H_TOPIC], h[H_QUEUE] if len(h) > H_QUEUE else -1, -1, 0)
        body = _message_json(wire)
        tx_state = broker.tx.state_of(msg_id)
        if tx_state is not None:
            body["transaction"] = {"state": tx_state.name, "checks": broker.tx.checks_of(msg_id)}
        body["groups"] = group_states(msg_id, rec)
        return web.json_response(body)

    @routes.get("/api/messages")
    async def by_key(req: web.Request) -> web.Response:
        topic = req.query.get("topic")
        key = req.query.get("key")
        if not topic or not key:
            return err(400, "query parameters topic and key are required")
        out = []
        for q in range(broker.queue_count(topic)):
            start, end = store.queue_start(topic, q), store.queue_end(topic, q)
            off = start
            while off < end:
                entries = store.read_queue(topic, q, off, 1024)
                if not entries:
                    break
                for o, entry in entries:
                    off = o + 1
                    rec = store.read(entry.pos)
                    if key in rec.header[H_KEYS]:
                        out.append(_message_json(build_wire(rec, topic, q, o, 0)))
        return web.json_response({"messages": out})

    @routes.post("/api/dlq/{group}/messages/{msg_id}/resend")
    async def resend(req: web.Request) -> web.Response:
        group, msg_id = req.match_info["group"], req.match_info["msg_id"]
        try:
            fut = broker.resend_from_dlq(group, msg_id)
        except KeyError:
            return err(404, f"message {msg_id} is not in {DLQ_PREFIX}{group}")
        except HalfMQError as exc:
            return err(400, str(exc))
        await fut
        return web.json_response({"resent": msg_id, "group": group})

    @routes.get("/api/transactions")
    async def transactions(req: web.Request) -> web.Response:
        name = req.query.get("state", "prepared").upper()
        try:
            state = TxState[name]
        except KeyError:
            return err(400, "state must be prepared, committed, rolled_back or abandoned")
        return web.json_response({"transactions": transactions_data(state)})

    async def resolve(req: web.Request, state: TxState) -> web.Response:
        msg_id = req.match_info["msg_id"]
        try:
            fut = broker.resolve_transaction(msg_id, state)
        except TransactionStateError as exc:
            return err(409, str(exc))
        if fut is not None:
            await fut
        return web.json_response({"msg_id": msg_id, "state": state.name})

    @routes.post("/api/transactions/{msg_id}/commit")
    async def commit(req: web.Request) -> web.Response:
        return await resolve(req, TxState.COMMITTED)

    @routes.post("/api/transactions/{msg_id}/rollback")
    async def rollback(req: web.Request) -> web.Response:
        return await resolve(req, TxState.ROLLED_BACK)

    app = web.Application()
    app.add_routes(routes)
    return app


async def start_admin_http(broker: Broker, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Start the admin API; returns the runner (for cleanup) and the bound port."""
    runner = web.AppRunner(build_app(broker), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    server = site._server  # noqa: SLF001 - aiohttp exposes no public accessor for the bound port
    assert server is not None
    bound = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, bound
