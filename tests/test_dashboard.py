"""The dashboard: its JSON route behind the admin credential, and its page in a real headless
Chromium (Debian's, driven by playwright) watching a real ``flashsale serve`` and ``flashsale
worker`` while shoppers order, pay and sell the sale out over HTTP.

Set FLASHSALE_DASHBOARD_SCREENSHOT to a path (docs/dashboard.png) to keep a screenshot of the page.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.async_api import Browser, Page, Route, async_playwright, expect
from redis.asyncio import Redis

from engine.http.app import create_app
from engine.http.auth import mint_tokens
from engine.inventory import SaleDefinition
from engine.mockgateway import MockGateway
from engine.payments import signed_event
from engine.settings import Settings
from localrun.demo import start_process, stop_process, wait_ready
from localrun.servers import browser_path, free_port
from tests.conftest import ROOT, SaleFactory

ADMIN = "admin-" + "d" * 24
SECRET = "whsec_dashboard_tests"
# What the page waits for at most: it polls every second.
SEEN_WITHIN_MS = 10_000


@pytest.fixture
def admin_settings(settings: Settings) -> Settings:
    return replace(settings, admin_token=ADMIN, webhook_secret=SECRET, port=free_port())


async def test_the_dashboard_route_wants_the_admin_credential(
    admin_settings: Settings, redis: Redis, ledger_sale: SaleFactory
):
    sale = await ledger_sale(stock=7)
    app = create_app(admin_settings, redis)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": ADMIN}):
                refused = await client.get("/v1/admin/dashboard", headers=headers)
                assert refused.status_code == 401
                assert refused.json()["code"] == "invalid-token"
            answer = await client.get(
                "/v1/admin/dashboard", headers={"Authorization": f"Bearer {ADMIN}"}
            )
            page = await client.get("/admin")
            script = await client.get("/admin/dashboard.js")
    assert answer.status_code == 200
    body = answer.json()
    [stats] = body["sales"]
    assert (stats["sale_id"], stats["available"], stats["initial"]) == (sale.id, 7, 7)
    assert stats["now_ms"] == body["server_time_ms"]
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert '<script src="/admin/dashboard.js">' in page.text
    assert script.headers["content-type"].startswith("text/javascript")
    # Self-contained: nothing is loaded from anywhere but this server.
    for text in (page.text, script.text):
        assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//|@import|<link\b""", text)


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    executable = browser_path()
    if executable is None:
        pytest.fail("no system Chromium: run `python -m localrun.servers install` (apt-get)")
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=executable, headless=True)
        yield launched
        await launched.close()


@pytest.fixture
async def served(admin_settings: Settings, redis: Redis, tmp_path: Path) -> AsyncIterator[str]:
    """A real server and worker on the suite's Redis and Postgres; their base URL."""
    server = start_process(["serve"], admin_settings, tmp_path / "server.log")
    worker = start_process(["worker"], admin_settings, tmp_path / "worker.log")
    base_url = f"http://{admin_settings.host}:{admin_settings.port}"
    try:
        await wait_ready(base_url)
        yield base_url
    finally:
        stop_process(worker)
        stop_process(server)


class Shop:
    """Shoppers placing and paying orders over HTTP, Stripe played by the mock gateway."""

    def __init__(self, base_url: str, settings: Settings, redis: Redis, sale_id: str) -> None:
        self.http = httpx.AsyncClient(base_url=base_url, timeout=10)
        self.sale_id = sale_id
        self.gateway = MockGateway(redis)
        users = [f"shopper-{i}" for i in range(10)]
        self.tokens = mint_tokens(settings, users)
        self.orders: list[tuple[str, str]] = []  # (order id, owner's token)

    async def order(self, shopper: int, quantity: int) -> None:
        token = self.tokens[shopper]
        headers = {"Authorization": f"Bearer {token}", "Idempotency-Key": f"k-{shopper}"}
        answer = await self.http.post(
            f"/v1/sales/{self.sale_id}/orders", json={"quantity": quantity}, headers=headers
        )
        assert answer.status_code == 201, answer.text
        self.orders.append((answer.json()["id"], token))

    async def pay(self, order_id: str, token: str, succeeds: bool = True) -> None:
        auth = {"Authorization": f"Bearer {token}"}
        payment = await self.http.post(f"/v1/orders/{order_id}/pay", headers=auth)
        assert payment.status_code == 200, payment.text
        event = await self.gateway.settle(payment.json()["payment_intent_id"], succeeds)
        body, signature = signed_event(event, SECRET)
        hook = await self.http.post(
            "/v1/webhooks/stripe", content=body, headers={"Stripe-Signature": signature}
        )
        assert hook.status_code == 200, hook.text


async def figure(page: Page, sale: SaleDefinition, field: str) -> Any:
    return page.locator(f'section.sale[data-sale-id="{sale.id}"] [data-field="{field}"]')


async def sign_in(page: Page, token: str) -> None:
    await page.fill("#token", token)
    await page.click("#use-token")


@pytest.mark.slow
async def test_the_page_follows_a_sale_as_it_sells_out(
    browser: Browser,
    served: str,
    admin_settings: Settings,
    redis: Redis,
    ledger_sale: SaleFactory,
):
    sale = await ledger_sale(stock=10, per_user_limit=2, per_order_max=2, name="Sneaker drop")
    shop = Shop(served, admin_settings, redis, sale.id)
    page = await browser.new_page(viewport={"width": 1200, "height": 760})
    try:
        await page.goto(served + "/admin")

        # A wrong credential is refused, and the page says so instead of showing figures.
        await sign_in(page, "not-the-token")
        await expect(page.locator("#error")).to_be_visible(timeout=SEEN_WITHIN_MS)
        await expect(page.locator("#error")).to_contain_text("refused this token (401")
        assert await page.locator("section.sale").count() == 0

        await sign_in(page, ADMIN)
        await expect(page.locator("#error")).to_be_hidden(timeout=SEEN_WITHIN_MS)
        available = await figure(page, sale, "available")
        held = await figure(page, sale, "held")
        sold = await figure(page, sale, "sold")
        await expect(available).to_have_text("10", timeout=SEEN_WITHIN_MS)
        await expect(held).to_have_text("0")
        await expect(await figure(page, sale, "failed")).to_have_text("0")
        # The token is kept for the tab, not in the page's address or local storage.
        stored = await page.evaluate("sessionStorage.getItem('flashsale.admin-token')")
        assert stored == ADMIN
        # The server's own /metrics: read once, then figures between two readings.
        await expect(page.locator("#metrics-note")).to_contain_text(
            "from /metrics", timeout=SEEN_WITHIN_MS
        )

        for shopper in range(3):
            await shop.order(shopper, 2)
        # The orders reach /metrics within its flush (a second), the page at its next poll.
        await expect(page.locator("#route-p99")).to_have_text(
            re.compile(r"^\d+ ms$"), timeout=SEEN_WITHIN_MS
        )
        await expect(held).to_have_text("6", timeout=SEEN_WITHIN_MS)
        await expect(available).to_have_text("4")
        rate = await figure(page, sale, "rate")
        await expect(rate).to_have_text(re.compile(r"^[1-9][0-9]*\.[0-9]/s$"))

        await shop.pay(*shop.orders[0])
        await expect(sold).to_have_text("2", timeout=SEEN_WITHIN_MS)
        await expect(held).to_have_text("4")

        for shopper in (3, 4):
            await shop.order(shopper, 2)
        await expect(available).to_have_text("0", timeout=SEEN_WITHIN_MS)
        await expect(held).to_have_text("8")
        await expect(await figure(page, sale, "sellout-label")).to_have_text("Sold out in")
        await expect(await figure(page, sale, "sellout")).to_have_text(re.compile(r"\d+(\.\d)? s"))
        # The worker drains the outbox: the ledger catches up and its lag goes back to none.
        await expect(await figure(page, sale, "outbox")).to_have_text(
            "0 (0)", timeout=SEEN_WITHIN_MS
        )
        if shot := os.environ.get("FLASHSALE_DASHBOARD_SCREENSHOT"):
            await page.screenshot(path=str(ROOT / shot), full_page=True)

        # A card is declined: the hold ends, its units come back, the failure is counted.
        await shop.pay(*shop.orders[1], succeeds=False)
        await expect(await figure(page, sale, "failed")).to_have_text("1", timeout=SEEN_WITHIN_MS)
        await expect(held).to_have_text("6")
        await expect(available).to_have_text("2")

        # Forgetting the token stops the polling and clears the figures.
        await page.click("#forget")
        await expect(page.locator("section.sale")).to_have_count(0)
        assert await page.evaluate("sessionStorage.getItem('flashsale.admin-token')") is None
    finally:
        await page.close()
        await shop.http.aclose()


def _metrics_text(polls: int) -> str:
    """A /metrics answer after ``polls`` seconds of 100 orders each: 98 answered within 25 ms,
    2 within 50 ms, split over two status labels as a real histogram may be."""
    route = 'route="/v1/sales/{sale_id}/orders",method="POST"'
    lines = ["# TYPE flashsale_http_request_duration_seconds histogram"]
    for status, share in (("201", 0.5), ("409", 0.5)):
        counts = {"0.01": 0, "0.025": 98, "0.05": 100, "+Inf": 100}
        for le, count in counts.items():
            value = int(count * polls * share)
            lines.append(
                f'flashsale_http_request_duration_seconds_bucket{{{route},status="{status}",'
                f'le="{le}"}} {value}'
            )
    lines.append('flashsale_orders_total{outcome="accepted",sale="s \\"x\\""} ' + str(100 * polls))
    lines.append('flashsale_orders_total{outcome="sold-out"} 7')
    return "\n".join(lines) + "\n"


@pytest.mark.slow
async def test_with_metrics_the_page_shows_the_order_routes_p99_and_rate(
    browser: Browser, served: str, ledger_sale: SaleFactory
):
    await ledger_sale()
    polls = 0

    async def metrics(route: Route) -> None:
        nonlocal polls
        polls += 1
        await route.fulfill(status=200, body=_metrics_text(polls), content_type="text/plain")

    page = await browser.new_page()
    try:
        # Stands in for the server's /metrics, with figures known in advance.
        await page.route("**/metrics", metrics)
        await page.goto(served + "/admin")
        helpers = "window.flashsaleDashboard"
        parsed = await page.evaluate(f"{helpers}.parseMetrics({_metrics_text(1)!r})")
        assert {s["labels"].get("sale") for s in parsed} >= {'s "x"'}
        assert sum(s["value"] for s in parsed if s["name"] == "flashsale_orders_total") == 107
        await sign_in(page, ADMIN)
        # 99th of 100 per second: 1 of the 2 orders between 25 and 50 ms, so 37.5 ms.
        await expect(page.locator("#route-p99")).to_have_text("38 ms", timeout=SEEN_WITHIN_MS)
        rate = page.locator("#order-rate")
        await expect(rate).to_have_text(re.compile(r"^\d+\.\d/s$"))
        per_second = float((await rate.text_content() or "0").removesuffix("/s"))
        # 100 accepted per reading, readings about a second apart (a slow poll stretches it).
        assert 30 <= per_second <= 150, per_second
    finally:
        await page.close()
    await asyncio.sleep(0)
