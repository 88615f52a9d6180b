"""Sold-out answers without Redis (engine.http.soldout): the view script's contract, and through the
real app that newcomers are answered locally while past buyers still get their replays."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from engine import inventory
from engine.http import coalescer as reservations
from engine.http import soldout
from engine.http.app import create_app
from engine.http.orderroute import OrderRoute
from engine.http.soldout import SoldOutMemory
from engine.keys import sale_keys
from engine.scripts import SCRIPTS
from engine.settings import Settings
from tests.conftest import SaleFactory
from tests.test_app import assert_problem, auth, place
from tests.test_scripts import snapshot

REFRESH_MS = 50

# --- the sold_out_view script ----------------------------------------------------------------


async def test_view_contract(redis: Redis, redis_sale: SaleFactory):
    sale = await redis_sale(stock=3, per_user_limit=2, per_order_max=2)
    assert await inventory.sold_out_view(redis, "nope", "", 100) is None
    assert await inventory.sold_out_view(redis, sale.id, "", 100) is None  # stock left

    await inventory.reserve(redis, sale.id, "alice", 2, "k1")
    held = await inventory.reserve(redis, sale.id, "bob", 1, "k1")
    before = await snapshot(redis)
    view = await inventory.sold_out_view(redis, sale.id, "", 100)
    assert view is not None and sorted(view.names or []) == ["alice", "bob"]
    assert (view.shoppers, view.per_order_max, view.per_user_limit) == (2, 2, 2)
    assert view.end_ms == sale.end_ms and abs(view.now_ms - time.time() * 1000) < 5_000
    again = await inventory.sold_out_view(redis, sale.id, view.fingerprint, 100)
    assert again is not None and again.names is None  # nothing appended: the list holds
    assert await inventory.sold_out_view(redis, sale.id, "", 1) is None  # too many to list
    assert await snapshot(redis) == before  # read-only

    # Bob gives his unit back: stock is back, no view; he stays listed at 0.
    await inventory.release(redis, sale.id, held.order_id, "cancelled")
    assert await inventory.sold_out_view(redis, sale.id, view.fingerprint, 100) is None
    assert await redis.hget(sale_keys(sale.id).users, "bob") == "0"
    # An older version's release removed the shopper: the count stays 2 when Carol buys, but
    # the outbox moved on, so the caller gets the new list.
    await redis.hdel(sale_keys(sale.id).users, "bob")
    await inventory.reserve(redis, sale.id, "carol", 1, "k1")
    again = await inventory.sold_out_view(redis, sale.id, view.fingerprint, 100)
    assert again is not None and again.shoppers == 2
    assert sorted(again.names or []) == ["alice", "carol"]

    await inventory.set_status(redis, sale.id, "paused")
    assert await inventory.sold_out_view(redis, sale.id, "", 100) is None


async def test_view_refuses_a_sale_loaded_before_buyers_were_kept(
    redis: Redis, redis_sale: SaleFactory
):
    sale = await redis_sale(stock=0)
    assert await inventory.sold_out_view(redis, sale.id, "", 100) is not None
    await redis.hdel(sale_keys(sale.id).sale, "buyers_kept")  # as an older version loaded it
    assert await inventory.sold_out_view(redis, sale.id, "", 100) is None
    await inventory.load_sale(redis, sale)  # loading again does not vouch for its past
    assert await inventory.sold_out_view(redis, sale.id, "", 100) is None


async def test_view_reloads_after_script_flush(redis: Redis, redis_sale: SaleFactory):
    sale = await redis_sale(stock=0)
    await redis.script_flush()
    view = await inventory.sold_out_view(redis, sale.id, "", 100)
    assert view is not None and view.shoppers == 0
    assert await redis.script_exists(SCRIPTS["sold_out_view"].sha) == [True]


async def test_view_refuses_outside_the_window(redis: Redis, redis_sale: SaleFactory):
    now_ms = int(time.time() * 1000)
    sale = await redis_sale(stock=0, start_ms=now_ms - 60_000, end_ms=now_ms - 1)
    assert await inventory.sold_out_view(redis, sale.id, "", 100) is None
    sale = await redis_sale(stock=0, start_ms=now_ms + 60_000, end_ms=now_ms + 120_000)
    assert await inventory.sold_out_view(redis, sale.id, "", 100) is None
    sale = await redis_sale(stock=0)
    view = await inventory.sold_out_view(redis, sale.id, "", 100)
    assert view is not None and view.names == [] and view.shoppers == 0


# --- through the app -------------------------------------------------------------------------


@pytest.fixture
async def app_and_client(
    settings: Settings, redis: Redis
) -> AsyncIterator[tuple[OrderRoute, httpx.AsyncClient]]:
    # The floods below put thousands of orders in flight in one process at once, with no
    # server in front to spread them: lift the back-pressure cap and the deadline out of reach.
    flood = replace(
        settings,
        sold_out_refresh_ms=REFRESH_MS,
        max_orders_in_flight=100_000,
        redis_deadline_ms=60_000,
    )
    app = create_app(flood, redis)
    transport = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            yield app.state.order_route, c


async def reserve_calls(redis: Redis) -> int:
    stats: dict[str, Any] = await redis.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


async def until(predicate: Any, timeout_s: float = 2.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


async def sell_out(
    client: httpx.AsyncClient, settings: Settings, route: OrderRoute, sale: Any
) -> dict[str, Any]:
    """Alice buys everything, Bob is told sold-out by Redis; returns that answer's body."""
    assert (await place(client, settings, sale, quantity=2, key="a1")).status_code == 201
    first = await place(client, settings, sale, key="b1", user="bob")
    body = assert_problem(first, 409, "sold-out")
    await until(lambda: route.sold_out.answers(sale.id, "newcomer", 1))
    return body


async def test_newcomers_are_answered_without_redis(
    app_and_client: tuple[OrderRoute, httpx.AsyncClient],
    settings: Settings,
    redis: Redis,
    redis_sale: SaleFactory,
):
    route, client = app_and_client
    sale = await redis_sale(stock=2, per_user_limit=2, per_order_max=2)
    from_redis = await sell_out(client, settings, route, sale)

    calls = await reserve_calls(redis)
    started = time.monotonic()
    answers = [
        await place(client, settings, sale, key=f"n{i}", user=f"newcomer-{i}") for i in range(300)
    ]
    elapsed = time.monotonic() - started
    # The same bytes as Redis's answer, and no reserve call: only the view's re-reads, one per
    # refresh interval, reached Redis meanwhile.
    assert all(a.status_code == 409 and a.json() == from_redis for a in answers)
    refreshes = elapsed / (REFRESH_MS / 1000) + 2
    assert await reserve_calls(redis) - calls <= refreshes < 300

    # A quantity beyond the per-order maximum is not the memory's to answer: Redis says why.
    too_many = await place(client, settings, sale, quantity=3, key="q3", user="newcomer-x")
    assert_problem(too_many, 422, "quantity-exceeds-maximum")


async def test_past_buyers_still_get_their_first_answer(
    app_and_client: tuple[OrderRoute, httpx.AsyncClient],
    settings: Settings,
    redis: Redis,
    redis_sale: SaleFactory,
):
    route, client = app_and_client
    sale = await redis_sale(stock=2, per_user_limit=2, per_order_max=2)
    first = await place(client, settings, sale, quantity=1, key="a1")
    cancelled = await place(client, settings, sale, quantity=1, key="a2")
    assert first.status_code == cancelled.status_code == 201
    # Alice gives one unit back, Carol takes it: sold out, and Alice's count went 2 -> 1.
    gone = await client.post(
        f"/v1/orders/{cancelled.json()['id']}/cancel",
        headers=auth(settings, "alice"),
    )
    assert gone.status_code == 200, gone.text
    assert (await place(client, settings, sale, key="c1", user="carol")).status_code == 201
    assert_problem(await place(client, settings, sale, key="b1", user="bob"), 409, "sold-out")
    await until(lambda: route.sold_out.answers(sale.id, "newcomer", 1))

    for key, original in (("a1", first), ("a2", cancelled)):
        replay = await place(client, settings, sale, quantity=1, key=key)
        assert replay.status_code == 201 and replay.headers["idempotent-replayed"] == "true"
        assert replay.json()["id"] == original.json()["id"]
    # A past buyer's new key goes to Redis too, and Redis says sold out.
    assert_problem(await place(client, settings, sale, key="a3"), 409, "sold-out")


async def test_stock_coming_back_or_a_pause_is_seen_within_refreshes(
    app_and_client: tuple[OrderRoute, httpx.AsyncClient],
    settings: Settings,
    redis: Redis,
    redis_sale: SaleFactory,
):
    route, client = app_and_client
    sale = await redis_sale(stock=2, per_user_limit=2, per_order_max=2)
    await sell_out(client, settings, route, sale)
    alice = await redis.hget(sale_keys(sale.id).users, "alice")
    assert alice == "2"
    orders = [o async for o in redis.scan_iter(match=f"{sale_keys(sale.id).tag}:order:*")]
    order_id = (await redis.hget(orders[0], "id")) or ""
    await inventory.release(redis, sale.id, order_id, "cancelled")
    await until(lambda: not route.sold_out.answers(sale.id, "newcomer", 1), timeout_s=0.5)
    taken = await place(client, settings, sale, quantity=2, key="d1", user="dave")
    assert taken.status_code == 201

    # Sold out again. A watch that ended rests REST_S; the next sold-out from Redis after that
    # starts one again.
    assert_problem(await place(client, settings, sale, key="e1", user="erin"), 409, "sold-out")
    assert not route.sold_out.answers(sale.id, "newcomer", 1)
    await asyncio.sleep(soldout.REST_S)
    assert_problem(await place(client, settings, sale, key="e2", user="eve"), 409, "sold-out")
    await until(lambda: route.sold_out.answers(sale.id, "newcomer", 1))
    # Now a pause: within a few refreshes the shopper hears "paused".
    await inventory.set_status(redis, sale.id, "paused")
    await until(lambda: not route.sold_out.answers(sale.id, "newcomer", 1), timeout_s=0.5)
    assert_problem(await place(client, settings, sale, key="f1", user="fay"), 403, "sale-paused")


async def test_shoppers_given_a_hold_during_a_watch_are_never_answered_from_memory(
    redis: Redis, redis_sale: SaleFactory
):
    """A view read can leave before a reserve that runs after it in Redis: the memory must not
    trust that view for the shopper the reserve served."""
    sale = await redis_sale(stock=0)
    memory = SoldOutMemory(redis, REFRESH_MS / 1000)
    memory.bought(sale.id, "early")  # not watching yet: any later view lists them anyway
    memory.sold_out(sale.id)
    memory.bought(sale.id, "racer")
    await until(lambda: memory.answers(sale.id, "newcomer", 1))
    assert not memory.answers(sale.id, "racer", 1)
    assert memory.answers(sale.id, "early", 1)  # never held a unit: Redis's view says so
    await memory.aclose()
    memory.sold_out(sale.id)  # closed: starts nothing
    assert not memory.answers(sale.id, "newcomer", 1)


async def test_a_sale_with_too_many_buyers_to_list_costs_one_view_read_per_rest(
    app_and_client: tuple[OrderRoute, httpx.AsyncClient],
    settings: Settings,
    redis: Redis,
    redis_sale: SaleFactory,
    monkeypatch: pytest.MonkeyPatch,
):
    route, client = app_and_client
    monkeypatch.setattr(soldout, "MAX_SHOPPERS", 1)
    sale = await redis_sale(stock=2, per_user_limit=1, per_order_max=1)
    for user in ("alice", "bob"):
        assert (await place(client, settings, sale, key="k", user=user)).status_code == 201
    calls = await reserve_calls(redis)
    for i in range(30):
        answer = await place(client, settings, sale, key=f"n{i}", user=f"newcomer-{i}")
        assert_problem(answer, 409, "sold-out")
    # 30 reserves and one view read that found too many buyers; not one read per answer.
    assert await reserve_calls(redis) - calls <= 32
    assert not route.sold_out.answers(sale.id, "newcomer", 1)


async def test_off_by_default(settings: Settings, redis: Redis, redis_sale: SaleFactory):
    off = settings
    assert Settings().sold_out_refresh_ms == 0 and off.sold_out_refresh_ms == 0
    app = create_app(off, redis)
    transport = httpx.ASGITransport(app=app)
    sale = await redis_sale(stock=1, per_user_limit=1, per_order_max=1)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            assert (await place(client, off, sale, key="a1")).status_code == 201
            for i in range(3):
                answer = await place(client, off, sale, key=f"n{i}", user=f"n{i}")
                assert_problem(answer, 409, "sold-out")
            await asyncio.sleep(0.05)
            assert not app.state.order_route.sold_out.answers(sale.id, "newcomer", 1)


async def test_flood_after_sell_out_keeps_every_replay_and_never_oversells(
    app_and_client: tuple[OrderRoute, httpx.AsyncClient],
    settings: Settings,
    redis: Redis,
    redis_sale: SaleFactory,
    monkeypatch: pytest.MonkeyPatch,
):
    """3,000 concurrent orders after a sell-out: 2,000 newcomers, replays of all 200 buyers
    (several times each), while buyers cancel and free units that newcomers then take."""
    route, client = app_and_client
    sale = await redis_sale(stock=200, per_user_limit=1, per_order_max=1)
    firsts = await asyncio.gather(
        *(place(client, settings, sale, key=f"k{i}", user=f"buyer-{i}") for i in range(200))
    )
    assert all(f.status_code == 201 for f in firsts)
    assert_problem(await place(client, settings, sale, key="x", user="late"), 409, "sold-out")
    await until(lambda: route.sold_out.answers(sale.id, "newcomer", 1))

    async def cancel(i: int) -> None:
        await asyncio.sleep(0.01 * (i % 20))
        response = await client.post(
            f"/v1/orders/{firsts[i].json()['id']}/cancel", headers=auth(settings, f"buyer-{i}")
        )
        assert response.status_code == 200, response.text

    newcomers = [
        place(client, settings, sale, key=f"n{i}", user=f"newcomer-{i % 1000}") for i in range(2000)
    ]
    replays = [
        place(client, settings, sale, key=f"k{i}", user=f"buyer-{i}")
        for i in range(200)
        for _ in range(5)
    ]
    # Orders, not script calls: the server packs a turn's orders into one call.
    sent: list[int] = []
    for module in (reservations, inventory):
        packed = module.reserve_call

        def counted(sale_id: str, orders: Any, packed: Any = packed) -> Any:
            sent.append(len(orders))
            return packed(sale_id, orders)

        monkeypatch.setattr(module, "reserve_call", counted)
    results = await asyncio.gather(*newcomers, *replays, *(cancel(i) for i in range(0, 200, 10)))
    # Every replay must go to Redis (1,000); had every newcomer gone too there would be 3,000.
    assert 1000 <= sum(sent) < 3000

    for n, replay in enumerate(results[2000:3000]):
        i = n // 5
        assert replay is not None and replay.status_code == 201, replay
        assert replay.json()["id"] == firsts[i].json()["id"]
    taken = [r for r in results[:2000] if r is not None and r.status_code == 201]
    refused = [r for r in results[:2000] if r is not None and r.status_code == 409]
    assert len(taken) + len(refused) == 2000
    assert all(r.json()["code"] in ("sold-out", "limit-exceeded") for r in refused)
    # 20 units came back; newcomers can take at most those, and the stock never went below 0.
    keys = sale_keys(sale.id)
    stock = int(await redis.get(keys.stock) or 0)
    assert len(taken) + stock == 20 and stock >= 0
    assert int(await redis.hget(keys.sale, "held") or 0) == 200 - 20 + len(taken)
