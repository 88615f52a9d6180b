"""``POST /v1/orders/{id}/pay`` makes the order's one PaymentIntent, under the key
``pi-<order id>``, and answers 503 at once when the gateway rate has no slot for it soon."""

from __future__ import annotations

import asyncio
import time

import httpx
from redis.asyncio import Redis

from engine.gatewaylimit import GatewayLimiter
from engine.keys import mock_idempotency, mock_intent
from engine.settings import Settings
from tests.conftest import SaleFactory
from tests.test_app import assert_problem, auth, place


async def test_pay_makes_the_intent_under_the_order_key_once(
    client: httpx.AsyncClient, settings: Settings, redis: Redis, redis_sale: SaleFactory
):
    sale = await redis_sale(price=2500)
    order_id = (await place(client, settings, sale, quantity=2)).json()["id"]
    # Nobody asked to pay yet: no intent exists.
    assert [key async for key in redis.scan_iter(match=mock_intent("*"))] == []

    answers = await asyncio.gather(
        *(client.post(f"/v1/orders/{order_id}/pay", headers=auth(settings)) for _ in range(5))
    )
    bodies = [answer.json() for answer in answers]
    assert all(answer.status_code == 200 for answer in answers)
    assert all(body == bodies[0] for body in bodies)
    intent_id = bodies[0]["payment_intent_id"]
    assert intent_id.startswith("mock_pi_") and bodies[0]["amount"] == 5000
    assert await redis.get(mock_idempotency(f"pi-{order_id}")) == intent_id
    assert [key async for key in redis.scan_iter(match=mock_intent("*"))] == [
        mock_intent(intent_id)
    ]
    replay = await client.post(f"/v1/orders/{order_id}/pay", headers=auth(settings))
    assert replay.json() == bodies[0]


async def test_pay_over_the_gateway_rate_answers_503_at_once(
    client: httpx.AsyncClient, settings: Settings, redis: Redis, redis_sale: SaleFactory
):
    sale = await redis_sale()
    order_id = (await place(client, settings, sale)).json()["id"]
    # Other processes have taken the next five seconds of gateway calls.
    await GatewayLimiter(redis, settings.gateway_rate_per_s).take(None, cost=5 * 80)

    started = time.monotonic()
    response = await client.post(f"/v1/orders/{order_id}/pay", headers=auth(settings))
    assert time.monotonic() - started < 0.5  # no waiting for a slot it would not get
    assert_problem(response, 503, "payment-unavailable")
    assert 4 <= int(response.headers["Retry-After"]) <= 6
    assert [key async for key in redis.scan_iter(match=mock_intent("*"))] == []
