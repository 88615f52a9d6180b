"""Expire holds whose time has passed, through the same ``release`` script a cancel uses."""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis

from engine import inventory
from engine.keys import sale_keys
from engine.scripts import Code

__all__ = ["expire_sale"]


async def expire_sale(redis: Redis, sale_id: str, batch: int = 500) -> int:
    """Expire every due hold of a sale; returns how many this call expired.

    Due is judged by Redis's clock twice: here to pick candidates, and again inside ``release``
    so a hold whose expiry moved, or that a cancel or payment ended first, is left alone.
    """
    seconds, micros = await redis.time()
    now_ms = seconds * 1000 + micros // 1000
    holds = sale_keys(sale_id).holds
    expired = 0
    while True:
        due: list[str] = await redis.zrangebyscore(holds, "-inf", now_ms, start=0, num=batch)
        if not due:
            return expired
        results = await asyncio.gather(
            *(inventory.release(redis, sale_id, order_id, "expired") for order_id in due)
        )
        done = sum(1 for r in results if r.code is Code.OK)
        expired += done
        # Nothing expired in a full batch means the rest are not ours to end (already final):
        # stop rather than spin on them.
        if len(due) < batch or done == 0:
            return expired
