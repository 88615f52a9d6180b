"""Applying gateway events when the gateway no longer knows the intent they are about."""

from __future__ import annotations

import asyncpg
from redis.asyncio import Redis

from engine import inventory
from engine.keys import sale_keys
from engine.mockgateway import MockGateway
from engine.payments import Intent, intent_event
from engine.webhooks import apply_pending, receive
from tests.conftest import SaleFactory


async def test_a_failure_for_an_intent_the_gateway_forgot_still_ends_the_hold(
    redis: Redis, db: asyncpg.Pool, ledger_sale: SaleFactory
):
    sale = await ledger_sale(stock=3)
    hold = await inventory.reserve(redis, sale.id, "alice", 1, "k1")
    await inventory.attach_payment(redis, sale.id, hold.order_id, "mock_pi_gone", "s", 1, "usd")
    gone = Intent("mock_pi_gone", "", "requires_payment_method", 1, "usd", hold.order_id)
    event = intent_event("payment_intent.payment_failed", gone)
    # The cancel the receiver asks for first is refused: the failure stands, nothing raises.
    assert await receive(db, redis, MockGateway(redis), event) == "failed"
    assert await redis.get(sale_keys(sale.id).stock) == "3"
    assert await apply_pending(db, redis, MockGateway(redis), older_than_s=0) == 0
