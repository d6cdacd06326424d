"""The console web application on the admin HTTP port, over HTTP: its shell and files (all
served by the broker, nothing from elsewhere), its chart series, and its logins with a
session cookie and a CSRF token (admin vs read-only). The browser test drives it for real
(test_console_browser.py)."""

from __future__ import annotations

import json
import re

import aiohttp
import pytest

from broker.frontends.http.console import STATIC_DIR
from consumer_sdk import ConsumeResult, PushConsumer
from producer_sdk import LocalTransactionState, Producer, TransactionListener, TransactionProducer
from tests.conftest import wait_for
from tests.security.helpers import add_users

pytestmark = pytest.mark.timeout(60)


class Undecided(TransactionListener):
    async def execute_local_transaction(self, message, arg):
        return LocalTransactionState.UNKNOWN

    async def check_local_transaction(self, message):
        return LocalTransactionState.UNKNOWN


def boot_of(page: str) -> dict:
    found = re.search(r'<script id="boot" type="application/json">(.*?)</script>', page)
    assert found, page
    return json.loads(found.group(1).replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">"))


def test_every_asset_ships_in_the_package_and_loads_nothing_from_elsewhere():
    files = sorted(p.name for p in STATIC_DIR.iterdir())
    assert files == ["app.css", "app.js", "chart.js", "login.js"]
    for p in STATIC_DIR.iterdir():
        text = p.read_text()
        assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/", text), f"{p.name} refers to another host"


async def test_open_broker_serves_the_application_and_its_series(broker):
    async with (Producer(broker.address) as p, PushConsumer(broker.address, group="ledger", topic="orders",
                                                            listener=_ok),
                aiohttp.ClientSession() as http):
        async with http.get(f"{broker.http_url}/") as r:
            assert r.status == 200 and r.content_type == "text/html"
            assert "frame-ancestors 'none'" in r.headers["Content-Security-Policy"]
            page = await r.text()
        assert boot_of(page) == {"user": None, "admin": True, "csrf": "", "open": True}
        for name, kind in (("app.js", "text/javascript"), ("chart.js", "text/javascript"), ("app.css", "text/css")):
            assert f"/console/static/{name}" in page or name == "login.js"
            async with http.get(f"{broker.http_url}/console/static/{name}") as r:
                assert r.status == 200 and r.content_type == kind and len(await r.read()) > 100
        for bad in ("../admin.py", "nothing.js", ".hidden.js", "console.py"):
            async with http.get(f"{broker.http_url}/console/static/{bad}") as r:
                assert r.status == 404
        for i in range(3):
            await p.send("orders", f"m{i}".encode())

        async def charted():
            async with http.get(f"{broker.http_url}/api/series") as r:
                data = await r.json()
            return data if sum(v or 0 for v in data["series"].get("in/orders", [])) == 3 else None

        data = await wait_for(charted, what="3 messages in the per-second series")
    assert len(data["t"]) == len(data["series"]["in/orders"]) and data["t"] == sorted(data["t"])
    assert "lag/ledger" in data["series"] and "fsync/avg_ms" in data["series"]


async def _ok(_m):
    return ConsumeResult.SUCCESS


async def test_login_cookie_csrf_token_and_read_only_users(tmp_path, broker_factory):
    data = tmp_path / "secured"
    add_users(data, {"ops": ("pw-ops", [("admin", "*", None), ("publish", "orders", "pay")]), "viewer": ("pw-view", [("read", "*", None)])})
    b = broker_factory("--tx-timeout", "10m", data_dir=data)
    url = b.http_url
    async with TransactionProducer(b.address, group="pay", listener=Undecided(), user="ops", password="pw-ops") as tp:
        half = await tp.send_in_transaction("orders", b"held")
        async with aiohttp.ClientSession() as anon:
            async with anon.get(f"{url}/", headers={"Accept": "text/html"}, allow_redirects=False) as r:
                assert r.status == 302 and r.headers["Location"] == "/console/login"
            async with anon.get(f"{url}/console/login") as r:
                assert r.status == 200 and "/console/static/login.js" in await r.text()
            async with anon.get(f"{url}/console/static/app.css") as r:
                assert r.status == 200  # the login page's own files need no login
            async with anon.get(f"{url}/api/topics") as r:
                assert r.status == 401
            async with anon.post(f"{url}/console/login", json={"user": "ops", "password": "wrong"}) as r:
                assert r.status == 401
            await wait_for(lambda: "console: login failed for 'ops' from 127.0.0.1 (1 failures)" in b.log_path.read_text(),
                           what="the failed console login logged")
            async with anon.post(f"{url}/console/login", data="user=ops&password=pw-ops",
                                 headers={"Content-Type": "application/x-www-form-urlencoded"}) as r:
                assert r.status == 403  # a form post (as a cross-site page could send): refused

        async def login(user: str, password: str) -> tuple[aiohttp.ClientSession, dict]:
            http = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
            async with http.post(f"{url}/console/login", json={"user": user, "password": password}) as r:
                assert r.status == 200, await r.text()
                cookie = r.cookies["halfmq_console"]
                assert cookie["httponly"] and cookie["samesite"] == "Strict"
            async with http.get(f"{url}/") as r:
                assert r.status == 200
                return http, boot_of(await r.text())

        viewer, vboot = await login("viewer", "pw-view")
        ops, oboot = await login("ops", "pw-ops")
        try:
            assert vboot["user"] == "viewer" and vboot["admin"] is False and vboot["open"] is False
            assert oboot["user"] == "ops" and oboot["admin"] is True and len(oboot["csrf"]) >= 32
            async with viewer.get(f"{url}/api/transactions") as r:
                assert r.status == 200 and [t["msg_id"] for t in (await r.json())["transactions"]] == [half.msg_id]
            commit = f"{url}/api/transactions/{half.msg_id}/commit"
            async with viewer.post(commit, json={}, headers={"X-CSRF-Token": vboot["csrf"]}) as r:
                assert r.status == 403 and "admin" in (await r.json())["error"]  # read-only
            async with ops.post(commit, json={}) as r:
                assert r.status == 403 and "X-CSRF-Token" in (await r.json())["error"]
            async with ops.post(commit, json={}, headers={"X-CSRF-Token": vboot["csrf"]}) as r:
                assert r.status == 403  # another session's token
            async with ops.post(commit, json={}, headers={"X-CSRF-Token": oboot["csrf"]}) as r:
                assert r.status == 200 and (await r.json())["state"] == "COMMITTED"
            async with ops.post(f"{url}/console/logout", json={}) as r:
                assert r.status == 200
            async with ops.get(f"{url}/api/topics") as r:
                assert r.status == 401  # the session is gone
        finally:
            await viewer.close()
            await ops.close()
