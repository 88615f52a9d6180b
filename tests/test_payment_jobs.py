"""The payment jobs walk their own work indexes in bounded passes: voids, refunds, and the
expiry of holds with an intent; one refused order steps aside, an unavailable gateway stops the
pass with every order still in place."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis

from engine import inventory
from engine.checkout import ensure_intent
from engine.keys import sale_keys
from engine.mockgateway import MockGateway
from engine.payments import GatewayUnavailable
from tests.conftest import CountingGateway, SaleFactory
from workers.context import Pass
from workers.holds import settle_pass
from workers.payments import GatewayWork, PassFn, all_due, refund_pass, void_pass


async def holds_with_intents(
    redis: Redis, gateway: MockGateway, sale_id: str, count: int
) -> list[tuple[str, str]]:
    """``count`` holds of one unit, each with its intent, as ``POST /pay`` leaves them."""
    holds = await inventory.reserve_many(
        redis, sale_id, [(f"u{i}", 1, f"k{i}") for i in range(count)]
    )
    order_ids = [h.order_id for h in holds if isinstance(h, inventory.Hold)]
    assert len(order_ids) == count
    intents = await asyncio.gather(
        *(ensure_intent(redis, gateway, sale_id, order_id, 1) for order_id in order_ids)
    )
    return [(order_id, pi) for order_id, (pi, _) in zip(order_ids, intents, strict=True)]


async def owed_refund(redis: Redis, sale_id: str, order_id: str, intent_id: str) -> None:
    await inventory.confirm(redis, sale_id, order_id, intent_id)
    await inventory.refund(redis, sale_id, order_id, "request", restock=True)


async def with_work(
    redis: Redis, sale_id: str, kind: str, count: int
) -> tuple[list[tuple[str, str]], CountingGateway]:
    """``count`` orders with intents, each needing the work of index ``kind`` (voids: the
    shopper cancelled; refunds: paid, then refunded; intent_holds: nothing more, the caller
    lets them expire), and a counting gateway over the mock that made their intents."""
    mock = MockGateway(redis)
    orders = await holds_with_intents(redis, mock, sale_id, count)
    if kind == "voids":
        await asyncio.gather(
            *(inventory.release(redis, sale_id, o, "cancelled") for o, _ in orders)
        )
    elif kind == "refunds":
        await asyncio.gather(*(owed_refund(redis, sale_id, o, pi) for o, pi in orders))
    return orders, CountingGateway(mock)


@pytest.mark.parametrize("kind", ["voids", "refunds", "intent_holds"])
async def test_500_due_take_three_passes_of_200(redis: Redis, redis_sale: SaleFactory, kind: str):
    sale = await redis_sale(stock=600, hold_seconds=1 if kind == "intent_holds" else 600)
    _, gateway = await with_work(redis, sale.id, kind, 500)
    index = getattr(sale_keys(sale.id), kind)
    run: PassFn = {"voids": void_pass, "refunds": refund_pass}.get(kind, settle_pass)
    method = "refund" if kind == "refunds" else "cancel_intent"
    if kind == "intent_holds":
        await asyncio.sleep(1.05)
    assert await redis.zcard(index) == 500

    work = GatewayWork(redis, gateway, batch=200)
    passes = [await run(work, sale.id) for _ in range(3)]
    assert passes == [Pass(200, True), Pass(200, True), Pass(100, False)]
    assert gateway.calls == {method: 500}
    assert await redis.zcard(index) == 0
    assert await run(work, sale.id) == Pass(0, False)
    assert gateway.calls == {method: 500}


async def test_a_refused_refund_steps_aside_and_the_rest_are_paid(
    redis: Redis, redis_sale: SaleFactory
):
    sale = await redis_sale(stock=10)
    orders, gateway = await with_work(redis, sale.id, "refunds", 3)
    gateway.refuse = {orders[0][1]}
    refunds = sale_keys(sale.id).refunds

    assert await all_due(refund_pass, GatewayWork(redis, gateway, batch=2), sale.id) == 2
    states = [(await inventory.read_order(redis, sale.id, o))["state"] for o, _ in orders]
    assert states == ["refund_pending", "refunded", "refunded"]
    # Still owed, and still in its index for reconcile to see, but not due for an hour: the
    # next runs neither fail on it nor ask the gateway again.
    assert await redis.zrange(refunds, 0, -1) == [orders[0][0]]
    assert await all_due(refund_pass, GatewayWork(redis, gateway, batch=2), sale.id) == 0
    assert gateway.calls == {"refund": 3}


async def test_an_unavailable_gateway_stops_the_pass_and_keeps_every_order(
    redis: Redis, redis_sale: SaleFactory
):
    sale = await redis_sale(stock=50)
    _, gateway = await with_work(redis, sale.id, "voids", 30)
    gateway.down = GatewayUnavailable("connection refused")
    voids = sale_keys(sale.id).voids

    assert await void_pass(GatewayWork(redis, gateway, batch=20), sale.id) == Pass(0, False)
    assert gateway.calls["cancel_intent"] <= 8  # the calls already in flight, then none
    assert await redis.zcard(voids) == 30
    gateway.down = None
    assert await void_pass(GatewayWork(redis, gateway, batch=20), sale.id) == Pass(20, True)
    assert await void_pass(GatewayWork(redis, gateway, batch=20), sale.id) == Pass(10, False)
    assert await redis.zcard(voids) == 0
