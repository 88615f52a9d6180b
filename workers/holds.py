"""Expire holds whose time has passed, through the same ``release`` script a cancel uses.

``expire_holds`` is the arq job: it expires the due holds of every live sale. Holds without an
intent (``keys.holds``) are released at once; holds with one (``keys.intent_holds``) only after
the intent is cancelled at the gateway (``engine.checkout.end_hold_with_intent``), in bounded
passes.
"""

from __future__ import annotations

import asyncio
from typing import Any

from redis.asyncio import Redis

from engine import inventory
from engine.checkout import end_hold_with_intent
from engine.keys import sale_keys
from engine.payments import PaymentGateway
from engine.scripts import Code
from workers.context import BATCH, Pass, defer, due, each_sale, log
from workers.payments import GatewayWork, all_due, job_work

__all__ = ["PROCESSING_RETRY_MS", "expire_holds", "expire_sale", "settle_pass"]

# A hold whose intent the bank is still deciding (``processing``) is looked at again this much
# later (ms); its own webhook usually decides it first.
PROCESSING_RETRY_MS = 5_000


async def _release_due(redis: Redis, sale_id: str, index: str, batch: int) -> int:
    """Release every due hold of ``index`` as expired, ``batch`` at a time, with no gateway."""
    expired = 0
    while True:
        found = await due(redis, index, batch)
        if not found:
            return expired
        results = await asyncio.gather(
            *(inventory.release(redis, sale_id, order_id, "expired") for order_id in found)
        )
        done = sum(1 for r in results if r.code is Code.OK)
        expired += done
        # Nothing expired in a full batch means the rest are not ours to end (already final):
        # stop rather than spin on them.
        if len(found) < batch or done == 0:
            return expired


async def settle_pass(work: GatewayWork, sale_id: str) -> Pass:
    """Expire a batch of due holds that have an intent, cancelling each intent first: if the
    money already moved, the order becomes paid instead."""
    redis, keys = work.redis, sale_keys(sale_id)

    async def one(order_id: str, row: list[str | None]) -> bool:
        [intent_id] = row
        if not intent_id:  # attach_payment writes both at once: only a hand-made index entry
            result = await inventory.release(redis, sale_id, order_id, "expired")
            return result.code is Code.OK
        state = await end_hold_with_intent(
            redis, work.gateway, sale_id, order_id, intent_id, "expired"
        )
        if state == "reserved":
            await defer(redis, keys.intent_holds, order_id, PROCESSING_RETRY_MS)
            return False
        return True

    return await work.walk(sale_id, keys.intent_holds, ("pi",), one)


async def expire_sale(
    redis: Redis,
    sale_id: str,
    batch: int = BATCH,
    gateway: PaymentGateway | None = None,
    work: GatewayWork | None = None,
) -> int:
    """Expire the due holds of a sale; returns how many this call expired (or settled as paid).

    Due is judged by Redis's clock twice: here to pick candidates, and again inside ``release``
    so a hold whose expiry moved, or that a cancel or payment ended first, is left alone.
    ``work``: the job run's gateway work, shared by every sale of the run (a gateway found down
    or busy stops the whole run's calls, not one sale's); made from ``gateway`` when absent.
    """
    keys = sale_keys(sale_id)
    expired = await _release_due(redis, sale_id, keys.holds, batch)
    if work is None and gateway is not None:
        work = GatewayWork(redis, gateway, batch)
    if work is None:
        # Without a gateway (tests, tools) holds with an intent expire plainly too; a payment
        # arriving later still takes the late-payment path in ``confirm``.
        return expired + await _release_due(redis, sale_id, keys.intent_holds, batch)
    return expired + await all_due(settle_pass, work, sale_id)


async def expire_holds(ctx: dict[str, Any]) -> int:
    """The arq job: expire every due hold of every live sale (cancelling its PaymentIntent
    first)."""
    work = job_work(ctx)
    expired = await each_sale(
        ctx, "expiry", lambda sale_id: expire_sale(ctx["store"], sale_id, work=work)
    )
    if expired:
        log.info("expired %d holds", expired)
    return expired
