"""Events under stress: a hanging endpoint slows neither the ledger drain nor other subscribers,
a worker killed mid-delivery makes duplicates that carry the same id, and bad admin input
changes nothing."""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import asyncpg
import httpx
import pytest
from redis.asyncio import Redis

from engine import inventory
from engine.errors import PROBLEM_MEDIA_TYPE
from engine.http.app import create_app
from engine.invariants import wait_for_ledger
from engine.settings import Settings
from localrun.demo import start_process
from tests.conftest import SaleFactory
from tests.receiver import Receiver
from workers.deliveries import Dispatcher, dispatch_for
from workers.outbox import drain_sale

ADMIN = "admin-" + "w" * 24
SUBSCRIPTIONS = "/v1/admin/webhooks/subscriptions"
# A subscription id of the right shape that names nothing.
MISSING = SUBSCRIPTIONS + "/sub_" + "0" * 24


@pytest.fixture
async def admin(
    settings: Settings, redis: Redis, db: asyncpg.Pool
) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(replace(settings, admin_token=ADMIN), redis)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        headers = {"Authorization": f"Bearer {ADMIN}"}
        async with httpx.AsyncClient(
            transport=transport, base_url="http://t", headers=headers
        ) as client:
            yield client


async def subscribe(admin: httpx.AsyncClient, receiver: Receiver) -> str:
    answer = await admin.post(
        SUBSCRIPTIONS, json={"url": receiver.url, "event_types": ["order.placed"]}
    )
    assert answer.status_code == 201, answer.text
    receiver.secrets.append(answer.json()["secret"])
    subscription_id: str = answer.json()["id"]
    return subscription_id


async def timed_drain(redis: Redis, db: asyncpg.Pool, sale_id: str, orders: int) -> float:
    for i in range(orders):
        await inventory.reserve(redis, sale_id, f"u{i}", 1, f"k{i}")
    started = time.perf_counter()
    written = await drain_sale(redis, db, sale_id, "c1", batch=100, claim_idle_ms=60_000)
    assert written == orders
    return time.perf_counter() - started


async def test_a_hanging_endpoint_holds_up_neither_the_drain_nor_other_subscribers(
    admin: httpx.AsyncClient,
    redis: Redis,
    db: asyncpg.Pool,
    ledger_sale: SaleFactory,
    settings: Settings,
):
    hanging, healthy = await Receiver().start(), await Receiver().start()
    dispatcher = Dispatcher(replace(settings, delivery_timeout_s=30), db)
    try:
        hanging_id = await subscribe(admin, hanging)
        await subscribe(admin, healthy)
        orders = 1000
        # The same drain, of as many orders with the same subscriptions and the delivery job
        # running beside it in the same event loop: while both endpoints answer at once, then
        # while one of them hangs on every delivery it is sent.
        ticks = asyncio.create_task(keep_dispatching(dispatcher))
        await timed_drain(redis, db, (await ledger_sale(stock=5000)).id, 50)  # warm up
        prompt_s = await timed_drain(redis, db, (await ledger_sale(stock=5000)).id, orders)
        await hanging.wait_for(50 + orders, timeout_s=30)
        hanging.answers = ["hang"] * 10_000
        hanging.arrived.clear()
        await timed_drain(redis, db, (await ledger_sale(stock=5000)).id, 50)
        await asyncio.wait_for(hanging.arrived.wait(), 10)
        hanging_s = await timed_drain(redis, db, (await ledger_sale(stock=5000)).id, orders)
        # Every delivery the healthy endpoint was owed arrives while the other hangs.
        await healthy.wait_for(2 * (50 + orders), timeout_s=30)
        assert dispatcher.in_flight.get(hanging_id) == settings.delivery_per_endpoint
        ticks.cancel()
        print(
            f"\ndrain of {orders} orders with 2 subscriptions: {prompt_s * 1000:.0f} ms while "
            f"both answer, {hanging_s * 1000:.0f} ms while one hangs "
            f"({settings.delivery_per_endpoint} deliveries held open)"
        )
        assert hanging_s < 2 * prompt_s + 0.25, (prompt_s, hanging_s)
        assert len(hanging.received) == 50 + orders + settings.delivery_per_endpoint
    finally:
        await dispatcher.aclose()
        await hanging.stop()
        await healthy.stop()


async def keep_dispatching(dispatcher: Dispatcher) -> None:
    """The delivery job's ticks, one after the other."""
    while True:
        await dispatch_for(dispatcher, 0.9)


async def test_deliveries_cut_by_a_sigkill_come_again_with_the_same_id(
    admin: httpx.AsyncClient,
    redis: Redis,
    db: asyncpg.Pool,
    ledger_sale: SaleFactory,
    settings: Settings,
    tmp_path: Path,
):
    receiver = await Receiver().start()
    # The first deliveries hang: the worker is killed while it waits for their answers.
    receiver.answers = ["hang"] * 3
    worker_settings = replace(settings, delivery_timeout_s=2, delivery_per_endpoint=3)
    log = tmp_path / "worker.log"
    jobs = ["worker", "--jobs", "drain_outboxes,deliver_events"]
    proc = start_process(jobs, worker_settings, log)
    try:
        await subscribe(admin, receiver)
        sale = await ledger_sale(stock=500)
        for i in range(200):
            await inventory.reserve(redis, sale.id, f"u{i}", 1, f"k{i}")
        await asyncio.wait_for(receiver.arrived.wait(), 30)
        await wait_for_ledger(redis, sale.id, timeout_s=30)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        cut = set(receiver.ids())
        assert 1 <= len(cut) <= 3, cut
        proc = start_process(jobs, worker_settings, log)
        # Delivered once each at least: the cut ones after their lease (timeout + margin).
        deadline = time.monotonic() + 60
        while set(receiver.ids()) != await produced_ids(db) or not cut_redelivered(receiver, cut):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, (len(receiver.ids()), log.read_text()[-2000:])
            await asyncio.sleep(0.1)
    finally:
        proc.kill()
        proc.wait()
        await receiver.stop()
    assert receiver.refused == []
    counts = Counter(receiver.ids())
    duplicated = {msg_id for msg_id, n in counts.items() if n > 1}
    # Every cut delivery came again. Others may too (at least once: an answer the restarted
    # worker took longer to record than its lease), and each duplicate is the same event.
    assert cut <= duplicated
    # A duplicate is the same event: same id, same payload (only the signature's time moves).
    for msg_id in duplicated:
        bodies = {r.body for r in receiver.received if r.msg_id == msg_id}
        assert len(bodies) == 1
    # One event per ledger change, whatever the kill: 200 orders placed, 200 events.
    placed = "SELECT count(*) FROM outbound_events WHERE type = 'order.placed'"
    assert await db.fetchval(placed) == 200
    print(f"\n{len(cut)} deliveries cut by SIGKILL, each delivered again with the same id")


def cut_redelivered(receiver: Receiver, cut: set[str]) -> bool:
    counts = Counter(receiver.ids())
    return all(counts[msg_id] >= 2 for msg_id in cut)


async def produced_ids(db: asyncpg.Pool) -> set[str]:
    rows = await db.fetch("SELECT id FROM outbound_events WHERE type = 'order.placed'")
    return {r["id"] for r in rows}


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "code"),
    [
        (
            "POST",
            SUBSCRIPTIONS,
            {"url": "ftp://x", "event_types": ["order.paid"]},
            422,
            "invalid-subscription",
        ),
        (
            "POST",
            SUBSCRIPTIONS,
            {"url": "http://x", "event_types": ["order.eaten"]},
            422,
            "invalid-subscription",
        ),
        (
            "POST",
            SUBSCRIPTIONS,
            {"url": "http://x", "event_types": []},
            422,
            "invalid-subscription",
        ),
        ("POST", SUBSCRIPTIONS, {"url": "http://x"}, 422, "invalid-subscription"),
        (
            "POST",
            SUBSCRIPTIONS,
            {"url": "http://x", "event_types": ["order.paid"], "x": 1},
            422,
            "invalid-subscription",
        ),
        ("POST", SUBSCRIPTIONS, b"{not json", 422, "invalid-body"),
        ("POST", SUBSCRIPTIONS, b"[]", 422, "invalid-body"),
        ("POST", SUBSCRIPTIONS, b" " * 9000, 413, "body-too-large"),
        ("GET", SUBSCRIPTIONS + "/sub_nope", None, 404, "subscription-not-found"),
        ("GET", MISSING, None, 404, "subscription-not-found"),
        (
            "PATCH",
            MISSING,
            {"enabled": True},
            404,
            "subscription-not-found",
        ),
        ("DELETE", MISSING, None, 404, "subscription-not-found"),
        (
            "POST",
            MISSING + "/rotate-secret",
            None,
            404,
            "subscription-not-found",
        ),
        (
            "GET",
            MISSING + "/deliveries",
            None,
            404,
            "subscription-not-found",
        ),
        (
            "GET",
            MISSING + "/deliveries?limit=0",
            None,
            422,
            "invalid-parameter",
        ),
        (
            "GET",
            MISSING + "/deliveries?state=lost",
            None,
            422,
            "invalid-parameter",
        ),
    ],
)
async def test_bad_admin_input_is_a_problem_and_changes_nothing(
    admin: httpx.AsyncClient, method: str, path: str, body: object, status: int, code: str
):
    # One subscription exists, so a handler that touched the wrong row would show.
    kept = {"url": "http://127.0.0.1:9/kept", "event_types": ["order.paid"]}
    assert (await admin.post(SUBSCRIPTIONS, json=kept)).status_code == 201
    before = (await admin.get(SUBSCRIPTIONS)).json()
    assert len(before["subscriptions"]) == 1
    content = body if isinstance(body, bytes) else None
    json = None if isinstance(body, bytes) else body
    answer = await admin.request(method, path, content=content, json=json)
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"] == PROBLEM_MEDIA_TYPE
    assert answer.json()["code"] == code
    assert (await admin.get(SUBSCRIPTIONS)).json() == before


async def test_the_admin_routes_refuse_without_the_token(admin: httpx.AsyncClient):
    answer = await admin.get(SUBSCRIPTIONS, headers={"Authorization": "Bearer wrong"})
    assert answer.status_code == 401 and answer.json()["code"] == "invalid-token"
    created = await admin.post(
        SUBSCRIPTIONS,
        json={"url": "http://127.0.0.1:9/x", "event_types": ["sale.opened"]},
        headers={"Authorization": ""},
    )
    assert created.status_code == 401
    assert (await admin.get(SUBSCRIPTIONS)).json() == {"subscriptions": []}
