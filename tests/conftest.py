"""Fixtures: real Redis and Postgres, started once for the session by ``localrun.servers``,
flushed (Redis) and truncated (Postgres) before every test that uses them."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import stripe
from redis.asyncio import Redis

from engine.db import connect_postgres, connect_redis, empty_tables, migrate
from engine.http.app import create_app
from engine.inventory import SaleDefinition, load_sale
from engine.payments import (
    EventPage,
    GatewayRefused,
    GatewayUnavailable,
    Intent,
    PaymentGateway,
    StripeGateway,
)
from engine.sales import create_sale
from engine.scripts import load_scripts
from engine.settings import Settings
from localrun import servers as localservices
from localrun.servers import free_port

ROOT = Path(__file__).resolve().parents[1]
SERVICES_DIR = ROOT / ".flashsale" / "test"

SaleFactory = Callable[..., Awaitable[SaleDefinition]]


def flashsale(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the ``flashsale`` command as a real process configured by ``settings``."""
    env = {**os.environ, **settings.as_env()}
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", *args], env=env, capture_output=True, text=True
    )


class CountingGateway:
    """A ``PaymentGateway`` that counts every call by method before passing it to ``inner``.
    ``refuse``: intent ids it answers GatewayRefused for; ``down``: answer every call with
    ``down`` raised (a GatewayUnavailable, e.g. busy)."""

    def __init__(self, inner: PaymentGateway) -> None:
        self.inner = inner
        self.calls: Counter[str] = Counter()
        self.at: list[float] = []  # time.monotonic() of every call
        self.refuse: set[str] = set()
        self.down: GatewayUnavailable | None = None

    def _count(self, method: str, intent_id: str = "") -> None:
        self.calls[method] += 1
        self.at.append(time.monotonic())
        if self.down is not None:
            raise self.down
        if intent_id in self.refuse:
            raise GatewayRefused(f"no such payment intent: {intent_id}")

    async def create_intent(
        self, order_id: str, sale_id: str, amount: int, currency: str
    ) -> Intent:
        self._count("create_intent")
        return await self.inner.create_intent(order_id, sale_id, amount, currency)

    async def retrieve_intent(self, intent_id: str) -> Intent:
        self._count("retrieve_intent", intent_id)
        return await self.inner.retrieve_intent(intent_id)

    async def cancel_intent(self, intent_id: str) -> Intent:
        self._count("cancel_intent", intent_id)
        return await self.inner.cancel_intent(intent_id)

    async def refund(self, intent_id: str, order_id: str) -> str:
        self._count("refund", intent_id)
        return await self.inner.refund(intent_id, order_id)

    async def event_page(self, since: int, starting_after: str | None) -> EventPage:
        self._count("event_page")
        return await self.inner.event_page(since, starting_after)

    async def aclose(self) -> None:
        await self.inner.aclose()


@pytest.fixture(scope="session")
def services() -> Iterator[dict[str, str]]:
    localservices.ensure_installed()
    urls = localservices.up(SERVICES_DIR)
    asyncio.run(migrate(urls["postgres_dsn"]))
    yield urls
    localservices.down(SERVICES_DIR)


@pytest.fixture(scope="session")
def settings(services: dict[str, str]) -> Settings:
    return Settings(
        environment="test",
        redis_url=services["redis_url"],
        database_url=services["postgres_dsn"],
        jwt_secret="test-" + secrets.token_hex(16),
        # Tests kill workers on purpose; their entries are reclaimed after half a second.
        claim_idle_ms=500,
        # The servers and workers tests start share the suite's folder, not the machine's.
        metrics_dir=str(SERVICES_DIR / "metrics"),
    )


@pytest.fixture
async def redis(settings: Settings) -> AsyncIterator[Redis]:
    client = connect_redis(settings, pool_size=64)
    await client.flushdb()
    await load_scripts(client)
    yield client
    await client.aclose()


@pytest.fixture
async def db(settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    pool = await connect_postgres(settings, min_size=1, max_size=8)
    await empty_tables(pool)
    yield pool
    await pool.close()


@pytest.fixture
async def client(settings: Settings, redis: Redis) -> AsyncIterator[httpx.AsyncClient]:
    """The app (mock gateway) on the test Redis, through its lifespan."""
    app = create_app(settings, redis)
    transport = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            yield c


def sale_definition(**overrides: Any) -> SaleDefinition:
    now_ms = int(time.time() * 1000)
    fields: dict[str, Any] = {
        "id": "s-" + secrets.token_hex(4),
        "name": "Test drop",
        "stock": 100,
        "price": 1500,
        "currency": "usd",
        "per_user_limit": 2,
        "per_order_max": 2,
        "hold_seconds": 600,
        "start_ms": now_ms - 60_000,
        "end_ms": now_ms + 3_600_000,
    }
    fields.update(overrides)
    return SaleDefinition(**fields)


@pytest.fixture
def redis_sale(redis: Redis) -> SaleFactory:
    """A sale loaded into Redis only: for script tests that do not need the ledger."""

    async def make(**overrides: Any) -> SaleDefinition:
        sale = sale_definition(**overrides)
        await load_sale(redis, sale)
        return sale

    return make


@pytest.fixture
def ledger_sale(redis: Redis, db: asyncpg.Pool) -> SaleFactory:
    """A sale created the way operators create one: Postgres first, then Redis."""

    async def make(**overrides: Any) -> SaleDefinition:
        sale = sale_definition(**overrides)
        await create_sale(db, redis, sale)
        return sale

    return make


# --- payments: localstripe, one server for the session --------------------------------------

SECRET = "whsec_flashsale_tests"


@pytest.fixture(scope="session")
def localstripe(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = tmp_path_factory.mktemp("localstripe") / "localstripe.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.localstripe_server", "--port", str(port)],
            stdout=out,
            stderr=out,
            cwd=Path(__file__).parents[1],
        )
    base = f"http://127.0.0.1:{port}"
    # Generous: on a loaded 2-core machine its imports alone have taken several seconds.
    deadline = time.monotonic() + 60
    while True:
        try:
            httpx.get(base + "/v1/balance", auth=("sk_test_x", ""), timeout=1)
            break
        except httpx.TransportError:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "localstripe did not start:\n" + log.read_text()
            time.sleep(0.1)
    yield base
    proc.send_signal(signal.SIGTERM)
    proc.wait(10)


@pytest.fixture
def pay_settings(settings: Settings, localstripe: str) -> Settings:
    return replace(
        settings,
        stripe_api_key="sk_test_flashsale",
        stripe_api_base=localstripe,
        webhook_secret=SECRET,
        admin_token="admin-" + "x" * 24,
    )


@pytest.fixture
async def gateway(pay_settings: Settings) -> AsyncIterator[StripeGateway]:
    assert pay_settings.stripe_api_key
    gateway = StripeGateway(pay_settings.stripe_api_key, pay_settings.stripe_api_base)
    yield gateway
    await gateway.aclose()


@pytest.fixture
def sdk(pay_settings: Settings) -> stripe.StripeClient:
    """The shopper's side: what Stripe.js would do with the client secret."""
    return stripe.StripeClient(
        "sk_test_flashsale", base_addresses={"api": pay_settings.stripe_api_base or ""}
    )
