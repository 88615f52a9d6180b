"""Events to subscribers: produced once per ledger change by the drain, delivered signed (each
delivery verified by a real receiver with the standardwebhooks package), retried with the same
id, and endpoints that are gone or failing for days disabled."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import asyncpg
import httpx
import pytest
from redis.asyncio import Redis

from engine import inventory, subscriptions
from engine.errors import ProblemError
from engine.events import ORDER_EVENTS, SALE_EVENTS, observe_sale, write_with_events
from engine.http.app import create_app
from engine.keys import sale_keys
from engine.ledger import entry_changes
from engine.sales import change_status
from engine.settings import Settings
from tests.conftest import SaleFactory
from tests.receiver import Receiver
from workers.deliveries import DISPATCHER, Dispatcher, deliver_events, dispatch_due
from workers.heartbeats import HEALTH, WorkerHealth
from workers.outbox import drain_sale

ADMIN = "admin-" + "e" * 24
AUTH = {"Authorization": f"Bearer {ADMIN}"}
SUBSCRIPTIONS = "/v1/admin/webhooks/subscriptions"


@pytest.fixture
def fast(settings: Settings) -> Settings:
    """Retries without waiting: the schedule's length is what the tests count."""
    return replace(settings, admin_token=ADMIN, delivery_retry_s=(0, 0, 0, 0))


@pytest.fixture
async def admin(fast: Settings, redis: Redis, db: asyncpg.Pool) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(fast, redis)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://t", headers=AUTH
        ) as client:
            yield client


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    started = await Receiver().start()
    yield started
    await started.stop()


async def subscribe(admin: httpx.AsyncClient, receiver: Receiver, *types: str) -> dict[str, Any]:
    answer = await admin.post(SUBSCRIPTIONS, json={"url": receiver.url, "event_types": types})
    assert answer.status_code == 201, answer.text
    created: dict[str, Any] = answer.json()
    receiver.secrets.append(created["secret"])
    return created


@pytest.fixture
async def dispatcher_for(db: asyncpg.Pool) -> AsyncIterator[Callable[[Settings], Dispatcher]]:
    made: list[Dispatcher] = []

    def make(settings: Settings) -> Dispatcher:
        made.append(Dispatcher(settings, db))
        return made[-1]

    yield make
    for dispatcher in made:
        await dispatcher.aclose()


async def deliver(dispatcher: Dispatcher) -> int:
    """Ticks of the delivery job, each waited out, until one finds nothing due; returns the
    deliveries started."""
    started = 0
    while True:
        now = await dispatch_due(dispatcher)
        await dispatcher.wait()
        if not now:
            return started
        started += now


async def attempts_of(admin: httpx.AsyncClient, sub: dict[str, Any]) -> list[dict[str, Any]]:
    answer = await admin.get(f"{SUBSCRIPTIONS}/{sub['id']}/deliveries")
    assert answer.status_code == 200, answer.text
    found: list[dict[str, Any]] = answer.json()["deliveries"]
    return found


async def test_each_ledger_change_is_one_event_delivered_signed(
    admin: httpx.AsyncClient,
    receiver: Receiver,
    redis: Redis,
    db: asyncpg.Pool,
    ledger_sale: SaleFactory,
    fast: Settings,
    dispatcher_for: Callable[[Settings], Dispatcher],
):
    sub = await subscribe(admin, receiver, *ORDER_EVENTS.values())
    sale = await ledger_sale(stock=50, price=1500, hold_seconds=1)
    holds = [await inventory.reserve(redis, sale.id, f"u{i}", 1, f"k{i}") for i in range(5)]
    await inventory.release(redis, sale.id, holds[0].order_id, "cancelled")
    await asyncio.sleep(1.05)  # a hold expires only once it is due
    await inventory.release(redis, sale.id, holds[1].order_id, "expired")
    # The shopper asks to pay: the hold, still reserved, gets an intent (version 2). The order
    # was placed once, so that change is no order.placed.
    await inventory.attach_payment(redis, sale.id, holds[2].order_id, "pi_1", "s", 1500, "usd")
    outbox = await redis.xrange(sale_keys(sale.id).outbox)
    changes = [change for _, fields in outbox for change in entry_changes(fields)]

    await drain_sale(redis, db, sale.id, "c1", batch=100, claim_idle_ms=60_000)
    # The same changes again (a worker killed before its XACK): no event, no delivery more.
    await write_with_events(db, sale.id, changes)
    versions = await db.fetch("SELECT order_id, version, state FROM order_events")
    assert len(versions) == 8
    expected = {
        f"msg_{r['order_id']}_{r['version']}": ORDER_EVENTS[r["state"]]
        for r in versions
        if r["state"] != "reserved" or r["version"] == 1
    }
    assert len(expected) == 7
    assert await db.fetchval("SELECT count(*) FROM outbound_deliveries") == 7

    dispatcher = dispatcher_for(fast)
    assert await deliver(dispatcher) == 7
    assert await deliver(dispatcher) == 0
    assert receiver.refused == []
    assert {r.msg_id: r.payload["type"] for r in receiver.received} == expected
    placed = next(r.payload for r in receiver.received if r.payload["type"] == "order.placed")
    assert placed["data"]["amount"] == 1500 and placed["data"]["currency"] == "usd"
    assert set(placed) == {"type", "timestamp", "data"}
    deliveries = await attempts_of(admin, sub)
    assert {d["state"] for d in deliveries} == {"delivered"}
    assert all([a["status"] for a in d["attempt_log"]] == [200] for d in deliveries)


async def test_sale_milestones_are_produced_once_each(
    admin: httpx.AsyncClient,
    receiver: Receiver,
    redis: Redis,
    db: asyncpg.Pool,
    ledger_sale: SaleFactory,
    fast: Settings,
    dispatcher_for: Callable[[Settings], Dispatcher],
):
    await subscribe(admin, receiver, *SALE_EVENTS)
    sale = await ledger_sale(stock=12, per_user_limit=10, per_order_max=10)

    async def produced() -> list[str]:
        await observe_sale(db, redis, sale.id, stock_low_units=10)
        rows = await db.fetch("SELECT type FROM outbound_events ORDER BY occurred_at, type")
        return [r["type"] for r in rows]

    assert await produced() == ["sale.opened"]
    await inventory.reserve(redis, sale.id, "a", 1, "k1")
    assert await produced() == ["sale.opened"]  # 11 left: above the threshold
    await inventory.reserve(redis, sale.id, "b", 1, "k2")
    assert await produced() == ["sale.opened", "stock.low"]  # 10 left
    await inventory.reserve(redis, sale.id, "c", 10, "k3")
    assert await produced() == ["sale.opened", "stock.low", "sale.sold_out"]
    assert await produced() == ["sale.opened", "stock.low", "sale.sold_out"]
    await change_status(db, redis, sale.id, "closed")
    assert await produced() == ["sale.opened", "stock.low", "sale.sold_out", "sale.closed"]
    dispatcher = dispatcher_for(fast)
    await deliver(dispatcher)
    low = next(r.payload for r in receiver.received if r.payload["type"] == "stock.low")
    assert low["data"]["available"] == 10 and low["data"]["threshold"] == 10
    assert len(receiver.received) == 4 and receiver.refused == []


async def test_a_sale_with_its_own_threshold_is_low_at_it(
    admin: httpx.AsyncClient, redis: Redis, db: asyncpg.Pool, ledger_sale: SaleFactory
):
    """A sale created through the admin API with ``stock_low_units`` is low at its own
    threshold, not the deployment's."""
    now = time.time()
    body = {
        "id": "s-own-low",
        "stock": 100,
        "price": 100,
        "per_user_limit": 100,
        "per_order_max": 100,
        "starts_at": datetime.fromtimestamp(now - 60, tz=UTC).isoformat(),
        "ends_at": datetime.fromtimestamp(now + 3600, tz=UTC).isoformat(),
        "stock_low_units": 50,
    }
    created = await admin.post("/v1/admin/sales", json=body)
    assert created.status_code == 201, created.text
    assert created.json()["definition"]["stock_low_units"] == 50
    await admin.post(
        SUBSCRIPTIONS, json={"url": "http://127.0.0.1:9/", "event_types": ["stock.low"]}
    )

    async def low() -> bool:
        await observe_sale(db, redis, "s-own-low", stock_low_units=10)
        return bool(
            await db.fetchval("SELECT count(*) FROM outbound_events WHERE type = 'stock.low'")
        )

    await inventory.reserve(redis, "s-own-low", "a", 49, "k1")
    assert not await low()  # 51 left
    await inventory.reserve(redis, "s-own-low", "a", 1, "k2")
    assert await low()  # 50 left: its own threshold, far above the deployment's 10


async def one_order_event(redis: Redis, db: asyncpg.Pool, sale_id: str, n: int = 1) -> None:
    for i in range(n):
        await inventory.reserve(redis, sale_id, f"u{i}", 1, f"k{i}")
    await drain_sale(redis, db, sale_id, "c1", batch=100, claim_idle_ms=60_000)


@dataclass
class Hooked:
    """The receiver subscribed to order.placed, and a sale whose orders make those events."""

    admin: httpx.AsyncClient
    receiver: Receiver
    sub: dict[str, Any]
    settings: Settings  # retries without waiting
    place: Callable[[int], Awaitable[None]]  # n orders (u0.., keys k0..), drained


@pytest.fixture
async def hooked(
    admin: httpx.AsyncClient,
    receiver: Receiver,
    redis: Redis,
    db: asyncpg.Pool,
    ledger_sale: SaleFactory,
    fast: Settings,
) -> Hooked:
    sub = await subscribe(admin, receiver, "order.placed")
    sale = await ledger_sale()

    async def place(n: int) -> None:
        await one_order_event(redis, db, sale.id, n)

    return Hooked(admin, receiver, sub, fast, place)


async def test_a_failed_delivery_comes_again_with_the_same_id_honouring_retry_after(
    hooked: Hooked, dispatcher_for: Callable[[Settings], Dispatcher]
):
    admin, receiver, sub = hooked.admin, hooked.receiver, hooked.sub
    await hooked.place(1)
    receiver.answers = [500, (429, {"Retry-After": "2"})]
    dispatcher = dispatcher_for(hooked.settings)
    # 500, and the schedule's next wait is 0: again at once; 429, come back in 2 s.
    assert await deliver(dispatcher) == 2
    asked_at = time.monotonic()
    for _ in range(100):
        if await deliver(dispatcher):
            break
        await asyncio.sleep(0.1)
    waited = time.monotonic() - asked_at
    assert 1.5 < waited < 4, waited
    assert len(receiver.received) == 3 and len(set(receiver.ids())) == 1
    [delivery] = await attempts_of(admin, sub)
    assert delivery["state"] == "delivered"
    assert [a["status"] for a in delivery["attempt_log"]] == [500, 429, 200]


async def test_the_last_attempt_failing_fails_the_delivery(
    hooked: Hooked, dispatcher_for: Callable[[Settings], Dispatcher]
):
    await hooked.place(1)
    hooked.receiver.answers = [503, 503, 503, 503, 200]
    dispatcher = dispatcher_for(hooked.settings)
    for _ in range(6):
        await deliver(dispatcher)
    [delivery] = await attempts_of(hooked.admin, hooked.sub)
    attempts = len(hooked.settings.delivery_retry_s)
    assert delivery["state"] == "failed" and delivery["attempts"] == attempts
    assert len(hooked.receiver.received) == 4


async def test_410_gone_disables_the_subscription(
    hooked: Hooked,
    dispatcher_for: Callable[[Settings], Dispatcher],
    caplog: pytest.LogCaptureFixture,
):
    admin, receiver, sub = hooked.admin, hooked.receiver, hooked.sub
    await hooked.place(3)
    receiver.answers = [410]
    dispatcher = dispatcher_for(replace(hooked.settings, delivery_per_endpoint=1))
    with caplog.at_level(logging.WARNING, "flashsale.deliveries"):
        assert await deliver(dispatcher) == 1
    assert await deliver(dispatcher) == 0
    shown = (await admin.get(f"{SUBSCRIPTIONS}/{sub['id']}")).json()
    assert shown["enabled"] is False and "410" in shown["disabled_reason"]
    assert "disabled" in caplog.text
    states = sorted(d["state"] for d in await attempts_of(admin, sub))
    assert states == ["failed", "failed", "failed"]
    assert len(receiver.received) == 1


async def test_an_endpoint_failing_for_days_is_disabled_and_a_success_resets_the_count(
    hooked: Hooked, dispatcher_for: Callable[[Settings], Dispatcher]
):
    # "Days" is a setting: 2 s here; retries 1 s apart.
    admin, receiver, sub = hooked.admin, hooked.receiver, hooked.sub
    await hooked.place(1)
    retries = (0, 1, 1, 1, 1, 1)
    settings = replace(hooked.settings, endpoint_disable_after_s=2, delivery_retry_s=retries)
    dispatcher = dispatcher_for(settings)

    async def shown() -> dict[str, Any]:
        found: dict[str, Any] = (await admin.get(f"{SUBSCRIPTIONS}/{sub['id']}")).json()
        return found

    receiver.answers = [500]
    await deliver(dispatcher)
    assert (await shown())["failing_since"] is not None
    await asyncio.sleep(2.1)
    await deliver(dispatcher)  # succeeds: the endpoint is not failing any more
    assert (await shown())["failing_since"] is None and (await shown())["enabled"]

    await hooked.place(2)
    receiver.answers = [500] * 5
    await deliver(dispatcher)
    assert (await shown())["enabled"] is True
    await asyncio.sleep(2.1)
    await deliver(dispatcher)
    found = await shown()
    assert found["enabled"] is False and "every attempt failed" in found["disabled_reason"]


async def test_a_rotated_secret_signs_beside_the_new_one_for_its_grace(
    admin: httpx.AsyncClient,
    redis: Redis,
    db: asyncpg.Pool,
    ledger_sale: SaleFactory,
    fast: Settings,
    dispatcher_for: Callable[[Settings], Dispatcher],
):
    old, new = await Receiver().start(), await Receiver().start()
    try:
        sub = await subscribe(admin, old, "order.placed")
        rotated = await admin.post(f"{SUBSCRIPTIONS}/{sub['id']}/rotate-secret")
        assert rotated.status_code == 200
        new.secrets.append(rotated.json()["secret"])
        assert rotated.json()["secret"] != sub["secret"]
        sale = await ledger_sale()
        dispatcher = dispatcher_for(fast)
        for receiver in (old, new):
            # Both receivers at the subscription's URL in turn: each verifies with one secret.
            await admin.patch(f"{SUBSCRIPTIONS}/{sub['id']}", json={"url": receiver.url})
            await one_order_event(redis, db, sale.id, n=1 if receiver is old else 2)
            await deliver(dispatcher)
            assert len(receiver.received) == 1 and receiver.refused == []
            assert len(receiver.received[0].signature.split(" ")) == 2
        # Once the grace is over, only the new secret signs.
        await db.execute("UPDATE webhook_subscriptions SET previous_expires_at = now()")
        await one_order_event(redis, db, sale.id, n=3)
        await deliver(dispatcher)
        assert len(new.received) == 2 and new.refused == []
        assert len(new.received[-1].signature.split(" ")) == 1
        await admin.patch(f"{SUBSCRIPTIONS}/{sub['id']}", json={"url": old.url})
        await db.execute("UPDATE outbound_deliveries SET state = 'pending', attempts = 0")
        receiver_before = len(old.refused)
        await deliver(dispatcher)
        assert len(old.refused) > receiver_before  # the old secret no longer verifies
    finally:
        await old.stop()
        await new.stop()


async def test_in_production_a_url_on_this_machine_or_a_private_network_is_refused(
    db: asyncpg.Pool,
):
    body = {"event_types": ["order.paid"]}
    for url in (
        "http://127.0.0.1:8080/hook",
        "http://localhost/hook",
        "http://10.1.2.3/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://[::1]/hook",
        "http://2130706433:6379/",
        "http://127.1/",
        "http://0x7f000001/",
        "http://localhost./hook",
    ):
        with pytest.raises(ProblemError) as refused:
            await subscriptions.create_subscription(db, {**body, "url": url})
        assert refused.value.code == "invalid-subscription", url
    created = await subscriptions.create_subscription(
        db, {**body, "url": "https://hooks.example.com/flashsale"}
    )
    assert created["url"] == "https://hooks.example.com/flashsale"
    # Outside production (development, these tests) a local receiver is allowed.
    local = await subscriptions.create_subscription(
        db, {**body, "url": "http://127.0.0.1:9/hook"}, internal_ok=True
    )
    assert local["url"] == "http://127.0.0.1:9/hook"


async def test_no_sale_is_watched_while_nobody_subscribes_to_sale_events(
    redis: Redis,
    db: asyncpg.Pool,
    ledger_sale: SaleFactory,
    fast: Settings,
    dispatcher_for: Callable[[Settings], Dispatcher],
):
    await ledger_sale()
    ctx = {
        "store": redis,
        "db": db,
        "settings": fast,
        DISPATCHER: dispatcher_for(fast),
        HEALTH: WorkerHealth(),
    }
    produced = "SELECT type FROM outbound_events"
    await deliver_events(ctx)
    assert await db.fetch(produced) == []  # nobody would receive them
    body = {"url": "http://127.0.0.1:9/", "event_types": ["sale.opened"]}
    await subscriptions.create_subscription(db, body, internal_ok=True)
    await deliver_events(ctx)
    assert [r["type"] for r in await db.fetch(produced)] == ["sale.opened"]
