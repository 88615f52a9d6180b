"""Expire holds whose time has passed, through the same ``release`` script a cancel uses.

``expire_holds`` is the arq job: it expires the due holds of every live sale.
"""

from __future__ import annotations

import asyncio
from typing import Any

from redis.asyncio import Redis

from engine import inventory
from engine.keys import sale_keys
from engine.payments import PaymentGateway
from engine.scripts import Code
from workers.context import each_sale, log
from workers.payments import GATEWAY_CONCURRENCY, expire_or_settle

__all__ = ["expire_holds", "expire_sale"]


async def expire_sale(
    redis: Redis, sale_id: str, batch: int = 500, gateway: PaymentGateway | None = None
) -> int:
    """Expire every due hold of a sale; returns how many this call expired.

    A hold with a PaymentIntent is expired only after the intent is cancelled at the gateway
    (``expire_or_settle``): if the money already moved, the order becomes paid instead.

    Due is judged by Redis's clock twice: here to pick candidates, and again inside ``release``
    so a hold whose expiry moved, or that a cancel or payment ended first, is left alone.
    """
    seconds, micros = await redis.time()
    now_ms = seconds * 1000 + micros // 1000
    keys = sale_keys(sale_id)
    holds = keys.holds
    expired = 0
    # Holds of a flash sale fall due together: a few Stripe calls at a time, not 500.
    gate = asyncio.Semaphore(GATEWAY_CONCURRENCY)

    async def settle(order_id: str, intent_id: str) -> str:
        assert gateway is not None
        async with gate:
            return await expire_or_settle(redis, gateway, sale_id, order_id, intent_id)

    while True:
        due: list[str] = await redis.zrangebyscore(holds, "-inf", now_ms, start=0, num=batch)
        if not due:
            return expired
        async with redis.pipeline(transaction=False) as pipe:
            for order_id in due:
                pipe.hget(keys.order(order_id), "pi")
            intents = await pipe.execute()
        # Without a gateway (tests, tools) every hold expires plainly; a payment arriving later
        # still takes the late-payment path in ``confirm``.
        plain = [oid for oid, pi in zip(due, intents, strict=True) if not pi or gateway is None]
        results = await asyncio.gather(
            *(inventory.release(redis, sale_id, order_id, "expired") for order_id in plain)
        )
        done = sum(1 for r in results if r.code is Code.OK)
        paid_for = [(oid, pi) for oid, pi in zip(due, intents, strict=True) if pi]
        if paid_for and gateway is not None:
            states = await asyncio.gather(*(settle(oid, pi) for oid, pi in paid_for))
            done += sum(1 for state in states if state != "reserved")
        expired += done
        # Nothing expired in a full batch means the rest are not ours to end (already final):
        # stop rather than spin on them.
        if len(due) < batch or done == 0:
            return expired


async def expire_holds(ctx: dict[str, Any]) -> int:
    """The arq job: expire every due hold of every live sale (cancelling its PaymentIntent
    first)."""
    expired = await each_sale(
        ctx, "expiry", lambda sale_id: expire_sale(ctx["store"], sale_id, gateway=ctx["gateway"])
    )
    if expired:
        log.info("expired %d holds", expired)
    return expired
