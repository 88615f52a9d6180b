"""Paying for an order: one PaymentIntent per order, made when the shopper first asks to pay."""

from __future__ import annotations

import logging
import math
from typing import Any

from redis.asyncio import Redis

from engine import inventory
from engine.errors import Conflict, NotFound, Unavailable
from engine.keys import sale_keys
from engine.payments import GatewayBusy, GatewayRefused, GatewayUnavailable, PaymentGateway

__all__ = ["end_hold_with_intent", "ensure_intent", "payment_for"]

log = logging.getLogger("flashsale.payments")


async def ensure_intent(
    redis: Redis, gateway: PaymentGateway, sale_id: str, order_id: str, quantity: int
) -> tuple[str, str]:
    """The order's intent (id, client secret), created at the gateway if it has none yet.

    The gateway's idempotency key is the order id, so two pay calls racing here (a double
    click, a retry) create one intent; ``attach_payment`` keeps the first if two still arrive.
    """
    price, currency = await redis.hmget(sale_keys(sale_id).sale, "price", "currency")
    amount = int(price) * quantity
    try:
        intent = await gateway.create_intent(order_id, sale_id, amount, currency)
    except GatewayBusy as exc:
        # Over the deployment's gateway rate (or the gateway's own): answer now, never hang.
        raise Unavailable(
            "payment-unavailable",
            f"the payment gateway is busy: {exc}",
            retry_after_s=max(1, math.ceil(exc.retry_after_s)),
        ) from None
    except GatewayUnavailable as exc:
        raise Unavailable(
            "payment-unavailable",
            f"the payment gateway did not answer: {exc}",
            retry_after_s=2,
        ) from None
    return await inventory.attach_payment(
        redis, sale_id, order_id, intent.id, intent.client_secret, amount, currency
    )


async def payment_for(
    redis: Redis, gateway: PaymentGateway, sale_id: str, order_id: str, user: str
) -> dict[str, Any]:
    """What the shopper needs to pay (``POST /v1/orders/{id}/pay``)."""
    order = await inventory.read_order(redis, sale_id, order_id)
    if order is None or order["user"] != user:
        raise NotFound("order-not-found", f"there is no order {order_id!r}")
    if order["state"] not in ("reserved", "paid"):
        raise Conflict("order-not-payable", f"the order is {order['state']}", state=order["state"])
    intent_id, secret = order.get("pi", ""), order.get("client_secret", "")
    if not intent_id:
        intent_id, secret = await ensure_intent(
            redis, gateway, sale_id, order_id, int(order["qty"])
        )
        order = await inventory.read_order(redis, sale_id, order_id) or order
    return {
        "order_id": order_id,
        "state": order["state"],
        "payment_intent_id": intent_id,
        "client_secret": secret,
        "amount": int(order.get("amount") or 0),
        "currency": order.get("currency", ""),
    }


async def end_hold_with_intent(
    redis: Redis,
    gateway: PaymentGateway,
    sale_id: str,
    order_id: str,
    intent_id: str,
    state: str,
    payment_failed: bool = False,
) -> str:
    """End a hold that has a PaymentIntent as ``state`` (``expired``, or ``failed`` on a
    failure event; ``payment_failed`` when the event says the payment failed, for the count),
    but ask the gateway to cancel the intent first and let its answer decide:
    money that already moved makes the order paid (``confirm``), a payment still processing
    keeps the hold ('reserved': the bank's own event decides), and an intent the gateway does
    not know (keys switched, test data gone) cannot bring money, so the hold ends. Returns the
    order's resulting state. ``GatewayUnavailable`` passes through: the hold stays until the
    gateway answers."""
    try:
        intent = await gateway.cancel_intent(intent_id)
    except GatewayRefused as exc:
        log.warning(
            "ending %s as %s: its intent %s is unknown to the gateway: %s",
            order_id,
            state,
            intent_id,
            exc,
        )
    else:
        if intent.status == "succeeded":
            return (await inventory.confirm(redis, sale_id, order_id, intent_id)).state
        if intent.status == "processing":
            return "reserved"
    ended = await inventory.release(redis, sale_id, order_id, state, None, payment_failed)
    return ended.state
