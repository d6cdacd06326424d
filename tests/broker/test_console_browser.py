"""The console in a real headless browser (issue 16): Playwright driving the system's Chromium
against a real broker: search a message by key and see its trace, resend it from the DLQ
and see a consumer get it, commit a prepared transaction and see the consumer get it.

Screenshots go to the test's tmp dir; with ``HALFMQ_CONSOLE_SCREENSHOTS=1`` they also
replace ``docs/console/*.png`` (the README shows them)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from consumer_sdk import ConsumeResult, PushConsumer
from producer_sdk import LocalTransactionState, Producer, TransactionListener, TransactionProducer
from tests.conftest import ROOT, wait_for

pytestmark = pytest.mark.timeout(120)

async_api = pytest.importorskip("playwright.async_api", reason="the playwright package is not installed")

#: Chromium of the system (Debian's ``chromium`` package); never a browser Playwright downloads.
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or (
    "/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
#: Flags for a closed network: no background connections, no sandbox (root in CI).
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]
DOCS = ROOT / "docs" / "console"


class Undecided(TransactionListener):
    async def execute_local_transaction(self, message, arg):
        return LocalTransactionState.UNKNOWN

    async def check_local_transaction(self, message):
        return LocalTransactionState.UNKNOWN


class Committing(TransactionListener):
    async def execute_local_transaction(self, message, arg):
        return LocalTransactionState.COMMIT

    async def check_local_transaction(self, message):
        return LocalTransactionState.COMMIT


async def _shot(page, tmp_path: Path, name: str) -> None:
    path = tmp_path / f"{name}.png"
    await page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 1000
    if os.environ.get("HALFMQ_CONSOLE_SCREENSHOTS") == "1":
        DOCS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, DOCS / f"{name}.png")


async def _traffic(b, p) -> None:
    """Send and commit a varying rate of messages until the charts hold 20 seconds of it
    (only for the documentation's screenshots)."""
    import asyncio

    import aiohttp

    n = 0
    async with (TransactionProducer(b.address, group="shop", listener=Committing()) as tp,
                aiohttp.ClientSession() as http):
        while True:
            async with http.get(f"{b.http_url}/api/series") as r:
                if len((await r.json())["t"]) >= 20:
                    return
            n += 1
            await p.send_batch("orders", [f'{{"order": {n}.{i}}}'.encode() for i in range(10 + (n * 7) % 40)])
            if n % 3 == 0:
                await tp.send_in_transaction("payments", b'{"payment": 1}', keys=[f"shop-{n}"])
            await asyncio.sleep(0.1)  # pacing the load, not waiting for anything


@pytest.fixture
async def browser(tmp_path):
    if CHROMIUM is None:
        pytest.skip("no Chromium found (install Debian's chromium package: apt-get install -y chromium)")
    async with async_api.async_playwright() as pw:
        ctx = await pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True,
            viewport={"width": 1280, "height": 800})
        try:
            yield ctx
        finally:
            await ctx.close()


async def test_console_search_trace_resend_and_commit(broker_factory, browser, tmp_path):
    b = broker_factory("--trace", "--retry-delays", "100ms", "--tx-timeout", "10m")
    received: list[str] = []
    fail = {"order-42"}

    async def on(m):
        if set(m.keys) & fail:
            return ConsumeResult.RECONSUME_LATER
        received.append(m.msg_id)
        return ConsumeResult.SUCCESS

    async with (Producer(b.address) as p, TransactionProducer(b.address, group="payments", listener=Undecided()) as tp,
                PushConsumer(b.address, group="billing", topic="orders", listener=on, max_reconsume_times=1)):
        for i in range(5):
            await p.send("orders", f'{{"order": {i}}}'.encode(), keys=[f"order-{i}"])
        doomed = await p.send("orders", b'{"order": 42}', keys=["order-42"])
        half = await tp.send_in_transaction("orders", b'{"payment": 7}', keys=["pay-7"])
        await wait_for(lambda: len(received) == 5, what="the 5 good orders delivered")
        if os.environ.get("HALFMQ_CONSOLE_SCREENSHOTS") == "1":  # docs: some traffic for the charts
            await _traffic(b, p)
        page = await browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))

        await page.goto(f"{b.http_url}/")
        await page.wait_for_selector("canvas.chart")
        await page.locator(".legend span").nth(1).wait_for(timeout=15000)  # charted: messages in, lag
        await _shot(page, tmp_path, "overview")

        # search by key: the trace shows the attempts and the dead letter
        await page.click("nav a[data-page=messages]")
        await page.fill("input[name=topic]", "orders")
        await page.fill("input[name=key]", "order-42")
        await page.click("button[type=submit]")
        for _ in range(50):  # the dead letter is written after the second failure: search until seen
            await page.wait_for_selector("#trace")
            if await page.locator("#trace li[data-event=dead_lettered]").count():
                break
            await page.wait_for_timeout(100)
            await page.reload()
        trace = page.locator("#trace")
        assert doomed.msg_id in await trace.inner_text()
        events = await trace.locator("li").evaluate_all("items => items.map(i => i.dataset.event)")
        assert events[:4] == ["stored", "delivered", "failed", "retry"], events
        assert "dead_lettered" in events
        await _shot(page, tmp_path, "trace")

        # the DLQ: resend, with its confirmation step; the consumer gets it
        fail.clear()
        await page.click("nav a[data-page=dlq]")
        await page.click(f"button[data-msg='{doomed.msg_id}']")
        await page.wait_for_selector(".dialog")
        await _shot(page, tmp_path, "dlq-resend")
        await page.click(".dialog button.primary")
        await wait_for(lambda: doomed.msg_id in received, what="the resent message delivered")
        await page.wait_for_selector(".toast")

        # a prepared transaction: commit, with its confirmation step; the consumer gets it
        await page.click("nav a[data-page=transactions]")
        await page.wait_for_selector(f"button[data-commit='{half.msg_id}']")
        assert "pay-7" in await page.inner_text("main")
        await page.click(f"button[data-commit='{half.msg_id}']")
        await page.wait_for_selector(".dialog")
        await _shot(page, tmp_path, "transactions")
        await page.click(".dialog button.primary")
        await wait_for(lambda: half.msg_id in received, what="the committed message delivered")
        await page.wait_for_selector("text=No prepared transactions.")

        # groups and clients show who is connected
        await page.click("nav a[data-page=groups]")
        await page.wait_for_selector("section[data-group=billing]")
        assert "halfmq-python/0.1.0" in await page.inner_text("main")
        await _shot(page, tmp_path, "groups")
        await page.click("nav a[data-page=clients]")
        await page.wait_for_selector("text=Connected clients (3)")
        assert not errors, errors


async def test_console_login_and_a_read_only_user(tmp_path, broker_factory, browser):
    from tests.security.helpers import add_users

    data = tmp_path / "secured"
    add_users(data, {"viewer": ("pw-view", [("read", "*", None)]),
                     "pay": ("pw-pay", [("publish", "orders", "payments")])})
    b = broker_factory("--tx-timeout", "10m", data_dir=data)
    async with TransactionProducer(b.address, group="payments", listener=Undecided(), user="pay",
                                   password="pw-pay") as tp:
        half = await tp.send_in_transaction("orders", b"held", keys=["pay-9"])
        page = await browser.new_page()
        await page.goto(f"{b.http_url}/")
        assert page.url.endswith("/console/login")
        await page.fill("input[name=user]", "viewer")
        await page.fill("input[name=password]", "wrong")
        await page.click("button[type=submit]")
        await page.wait_for_selector("#login-error:has-text('wrong password')")
        await page.fill("input[name=password]", "pw-view")
        await page.click("button[type=submit]")
        await page.wait_for_selector("header .who:has-text('viewer (read only)')")
        await page.click("nav a[data-page=transactions]")
        await page.wait_for_selector(f"a:has-text('{half.msg_id}')")
        assert await page.locator("button[data-commit]").count() == 0  # a read-only user cannot act
        await _shot(page, tmp_path, "read-only")
        await page.click("header .who button")  # log out
        await page.wait_for_url("**/console/login")
