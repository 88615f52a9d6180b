"""Payment jobs: refund what is owed, cancel the intents of cancelled orders, and settle a
hold's intent before the hold expires.

A PaymentIntent is made when the shopper asks to pay (``engine.checkout``), never by a job.
The arq job is ``refunds`` (``pay_refunds`` and ``void_intents``); ``expire_or_settle`` runs
inside the expiry job (``workers.holds``).
"""

from __future__ import annotations

import logging
from typing import Any

from redis.asyncio import Redis

from engine import inventory
from engine.keys import sale_keys
from engine.payments import GatewayRefused, GatewayUnavailable, PaymentGateway
from engine.scripts import Code
from workers.context import each_sale

__all__ = [
    "GATEWAY_CONCURRENCY",
    "expire_or_settle",
    "pay_refunds",
    "refunds",
    "void_intents",
]

log = logging.getLogger("flashsale.payments")

# Stripe allows 100 write requests/s in live mode; a few in flight per worker stays well inside.
GATEWAY_CONCURRENCY = 8


async def pay_refunds(redis: Redis, gateway: PaymentGateway, sale_id: str) -> int:
    """Refund at the gateway every order in refund_pending, then mark it refunded."""
    keys = sale_keys(sale_id)
    owed: list[str] = await redis.zrange(keys.refunds, 0, 499)
    done = 0
    for order_id in owed:
        order = await inventory.read_order(redis, sale_id, order_id)
        if order is None or not order.get("pi"):
            continue
        try:
            refund_id = await gateway.refund(order["pi"], order_id)
        except (GatewayUnavailable, GatewayRefused) as exc:
            # One order the gateway refuses must not hold up the others behind it.
            log.warning("refund of %s not made yet: %s", order_id, exc)
            continue
        # Killed here? The refund's idempotency key (the order id) makes the retry return the
        # same refund instead of paying twice.
        result = await inventory.refund(redis, sale_id, order_id, "complete", refund_id=refund_id)
        done += result.code is Code.OK
    return done


async def void_intents(redis: Redis, gateway: PaymentGateway, sale_id: str) -> int:
    """Cancel at the gateway the intents of orders the shopper cancelled, so nobody pays for a
    hold that is gone (a payment that still slips through takes confirm's late path)."""
    keys = sale_keys(sale_id)
    voided = 0
    for order_id in await redis.zrange(keys.voids, 0, 99):
        intent_id = await redis.hget(keys.order(order_id), "pi")
        if intent_id:
            try:
                intent = await gateway.cancel_intent(intent_id)
            except GatewayUnavailable:
                continue  # next tick
            except GatewayRefused:
                pass  # unknown to the gateway: nothing can be paid through it
            else:
                if intent.status == "succeeded":
                    # Paid just before the cancel: confirm re-reserves or owes a refund.
                    await inventory.confirm(redis, sale_id, order_id, intent_id)
        await redis.zrem(keys.voids, order_id)
        voided += 1
    return voided


async def expire_or_settle(
    redis: Redis, gateway: PaymentGateway, sale_id: str, order_id: str, intent_id: str
) -> str:
    """Before a hold with an intent expires, cancel the intent; if the money already moved,
    the order becomes paid instead. Returns the order's resulting state."""
    try:
        intent = await gateway.cancel_intent(intent_id)
    except GatewayUnavailable:
        return "reserved"  # try again next tick; the hold stays until Stripe answers
    except GatewayRefused as exc:
        # The gateway does not know the intent (keys switched, test data gone): no money can
        # arrive through it, so the hold expires like one without an intent.
        log.warning(
            "expiring %s: its intent %s is unknown to the gateway: %s", order_id, intent_id, exc
        )
        return (await inventory.release(redis, sale_id, order_id, "expired")).state
    if intent.status == "succeeded":
        result = await inventory.confirm(redis, sale_id, order_id, intent_id)
        return result.state
    if intent.status == "processing":
        return "reserved"  # the bank has not decided; its webhook will
    released = await inventory.release(redis, sale_id, order_id, "expired")
    return released.state


async def refunds(ctx: dict[str, Any]) -> int:
    """The arq job: refund at the gateway what is owed (late payments without stock, admin
    refunds), and cancel the intents of cancelled orders."""

    async def one(sale_id: str) -> int:
        paid = await pay_refunds(ctx["store"], ctx["gateway"], sale_id)
        return paid + await void_intents(ctx["store"], ctx["gateway"], sale_id)

    return await each_sale(ctx, "refunds", one)
