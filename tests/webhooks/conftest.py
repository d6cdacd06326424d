"""Fixtures of the webhook tests: an in-process broker with short delays, receivers, and
small calls on the admin API."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.webhooks.receiver import Receiver

SECRET = "s3cret-s3cret-s3cret"


@pytest.fixture
def hook_config(tmp_path: Path):
    """The ``BrokerConfig`` of the in-process broker (short retry delays and lease)."""
    from broker import BrokerConfig

    return BrokerConfig(data_dir=str(tmp_path / "emb"), port=0, http_port=0,
                        retry_delays=(0.2, 0.3), ack_timeout=10.0, default_queues=1)


@pytest.fixture
async def hook_broker(hook_config) -> AsyncIterator[Any]:
    """An in-process broker."""
    from broker import Broker

    async with Broker(hook_config) as b:
        yield b


@pytest.fixture
async def receivers() -> AsyncIterator[Any]:
    """Factory: ``await receivers(**kwargs)`` starts a :class:`Receiver`; all stop at teardown."""
    started: list[Receiver] = []

    async def make(**kwargs: Any) -> Receiver:
        r = Receiver(**kwargs)
        started.append(r)
        return await r.start()

    yield make
    for r in started:
        await r.stop()


async def api(method: str, url: str, body: Any = None, *, expect: int | None = 200) -> Any:
    """Call the admin API; check the status (unless ``expect`` is None) and return the JSON."""
    # X-HalfMQ-Request: the admin API takes a body-less POST only with it (cross-site safety)
    async with aiohttp.ClientSession() as s, s.request(method, url, json=body,
                                                      headers={"X-HalfMQ-Request": "test"}) as r:
        data = await r.json()
        if expect is not None:
            assert r.status == expect, (r.status, data)
        return data if expect is not None else (r.status, data)


async def add_webhook(http_url: str, name: str, url: str, *, topic: str = "orders", **fields: Any) -> Any:
    """Define a webhook through the admin API (secret ``SECRET`` unless given)."""
    body = {"name": name, "topic": topic, "url": url, "secret": SECRET, **fields}
    return await api("POST", f"{http_url}/api/webhooks", body, expect=201)


async def delivery(http_url: str, name: str, msg_id: str) -> Any:
    """``GET /api/webhooks/NAME/messages/ID``."""
    return await api("GET", f"{http_url}/api/webhooks/{name}/messages/{msg_id}")
