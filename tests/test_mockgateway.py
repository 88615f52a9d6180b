"""The mock gateway's idempotency: one intent per order, whatever a crashed writer left behind."""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis

from engine.keys import mock_idempotency, mock_intent
from engine.mockgateway import MockGateway


async def test_a_key_naming_no_intent_is_replaced(redis: Redis):
    """A writer that died between the idempotency key and the intent left a key naming
    nothing: the next create makes the intent and every later one returns it."""
    gateway = MockGateway(redis)
    key = mock_idempotency("pi-s-1.00000000000000aa")
    await redis.set(key, "mock_pi_gone", ex=86_400)
    assert not await redis.exists(mock_intent("mock_pi_gone"))

    made = await gateway.create_intent("s-1.00000000000000aa", "s-1", 1500, "usd")
    assert made.id != "mock_pi_gone" and made.status == "requires_payment_method"
    assert await redis.get(key) == made.id
    again = await gateway.create_intent("s-1.00000000000000aa", "s-1", 1500, "usd")
    assert again == made
    assert await gateway.retrieve_intent(made.id) == made


async def test_racing_creates_make_one_intent(redis: Redis):
    gateway = MockGateway(redis)
    made = await asyncio.gather(
        *(gateway.create_intent("s-1.00000000000000bb", "s-1", 1500, "usd") for _ in range(20))
    )
    assert len({intent.id for intent in made}) == 1
    # The losers' intents are gone again: nothing names them.
    assert len([key async for key in redis.scan_iter(match=mock_intent("*"))]) == 1


async def test_a_stale_key_racing_creates_still_makes_one_intent(redis: Redis):
    gateway = MockGateway(redis)
    await redis.set(mock_idempotency("pi-s-1.00000000000000cc"), "mock_pi_gone", ex=86_400)
    made = await asyncio.gather(
        *(gateway.create_intent("s-1.00000000000000cc", "s-1", 1500, "usd") for _ in range(20))
    )
    assert len({intent.id for intent in made}) == 1
