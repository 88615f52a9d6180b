"""Payment jobs: refund what is owed, cancel the intents of cancelled orders, and settle a
hold's intent before the hold expires.

A PaymentIntent is made when the shopper asks to pay (``engine.checkout``), never by a job.
The arq job is ``refunds`` (``pay_refunds`` and ``void_intents``); ``expire_or_settle`` runs
inside the expiry job (``workers.holds``). Each walks its own work index (``keys.refunds``,
``keys.voids``, ``keys.intent_holds``) in bounded passes (``workers.context``).

The gateway answering "unavailable" or "busy" for one order stops the pass: the gateway is down
or over its rate, and every order keeps its place for the next tick. The gateway refusing one
order (an intent it does not know) is logged and that order steps aside, so the orders behind
it are never held up.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

from redis.asyncio import Redis

from engine import inventory
from engine.keys import sale_keys
from engine.payments import GatewayRefused, GatewayUnavailable, PaymentGateway
from engine.scripts import Code
from workers.context import (
    BATCH,
    JOB_WINDOW_S,
    Pass,
    defer,
    due,
    each_sale,
    in_passes,
    order_fields,
)

__all__ = [
    "GATEWAY_CONCURRENCY",
    "REFUSED_RETRY_MS",
    "GatewayCalls",
    "expire_or_settle",
    "pay_refunds",
    "refund_pass",
    "refunds",
    "void_intents",
    "void_pass",
]

log = logging.getLogger("flashsale.payments")

# Calls in flight per pass: enough to keep up with the shared gateway rate (engine.gatewaylimit)
# while each waits for the gateway's answer, few enough that a pass stops quickly on "busy".
GATEWAY_CONCURRENCY = 8
# A refund the gateway refused is tried again this much later (ms); reconcile reports it
# meanwhile as refund-owed.
REFUSED_RETRY_MS = 3_600_000


class GatewayCalls:
    """One pass's gateway work, a few orders at a time. The first ``GatewayUnavailable`` (down,
    or busy: over the rate) or the deadline stops new work; what was not started stays due."""

    def __init__(self, deadline: float | None) -> None:
        self._gate = asyncio.Semaphore(GATEWAY_CONCURRENCY)
        self._deadline = deadline
        self.stopped = False

    async def run(self, work: Callable[[], Awaitable[bool]]) -> bool:
        async with self._gate:
            if self._deadline is not None and time.monotonic() >= self._deadline:
                self.stopped = True
            if self.stopped:
                return False
            try:
                return await work()
            except GatewayUnavailable as exc:
                if not self.stopped:
                    log.warning("gateway unavailable, backing off until the next tick: %s", exc)
                self.stopped = True
                return False

    async def each(
        self, order_ids: list[str], work: Callable[[str, int], Awaitable[bool]], batch: int
    ) -> Pass:
        """``work(order_id, i)`` for each order (True: done); the pass's result."""
        done = await asyncio.gather(
            *(self.run(partial(work, oid, i)) for i, oid in enumerate(order_ids))
        )
        return Pass(done=sum(done), more=len(order_ids) == batch and not self.stopped)


async def refund_pass(
    redis: Redis,
    gateway: PaymentGateway,
    sale_id: str,
    batch: int = BATCH,
    deadline: float | None = None,
) -> Pass:
    """Refund at the gateway at most ``batch`` due refund_pending orders, then mark them
    refunded."""
    keys = sale_keys(sale_id)
    owed = await due(redis, keys.refunds, batch)
    rows = await order_fields(redis, sale_id, owed, "pi", "state")

    async def one(order_id: str, i: int) -> bool:
        intent_id, state = rows[i]
        if state != "refund_pending":
            await redis.zrem(keys.refunds, order_id)  # nothing owed on it any more
            return False
        if not intent_id:
            log.error("refund of %s owed but it has no intent; reconcile reports it", order_id)
            await defer(redis, keys.refunds, order_id, REFUSED_RETRY_MS)
            return False
        try:
            refund_id = await gateway.refund(intent_id, order_id)
        except GatewayRefused as exc:
            log.warning("refund of %s refused, tried again in an hour: %s", order_id, exc)
            await defer(redis, keys.refunds, order_id, REFUSED_RETRY_MS)
            return False
        # Killed here? The refund's idempotency key (the order id) makes the retry return the
        # same refund instead of paying twice.
        result = await inventory.refund(redis, sale_id, order_id, "complete", refund_id=refund_id)
        return result.code is Code.OK

    return await GatewayCalls(deadline).each(owed, one, batch)


async def pay_refunds(
    redis: Redis,
    gateway: PaymentGateway,
    sale_id: str,
    batch: int = BATCH,
    deadline: float | None = None,
) -> int:
    """Refund what is owed, pass after pass until nothing is due or ``deadline``."""
    return await in_passes(lambda: refund_pass(redis, gateway, sale_id, batch, deadline), deadline)


async def void_pass(
    redis: Redis,
    gateway: PaymentGateway,
    sale_id: str,
    batch: int = BATCH,
    deadline: float | None = None,
) -> Pass:
    """Cancel at the gateway the intents of at most ``batch`` orders the shopper cancelled, so
    nobody pays for a hold that is gone (a payment that still slips through takes confirm's
    late path)."""
    keys = sale_keys(sale_id)
    cancelled = await due(redis, keys.voids, batch)
    rows = await order_fields(redis, sale_id, cancelled, "pi")

    async def one(order_id: str, i: int) -> bool:
        [intent_id] = rows[i]
        if intent_id:
            try:
                intent = await gateway.cancel_intent(intent_id)
            except GatewayRefused as exc:
                # Unknown to the gateway: nothing can be paid through it.
                log.warning("void of %s: intent %s unknown: %s", order_id, intent_id, exc)
            else:
                if intent.status == "succeeded":
                    # Paid just before the cancel: confirm re-reserves or owes a refund.
                    await inventory.confirm(redis, sale_id, order_id, intent_id)
        await redis.zrem(keys.voids, order_id)
        return True

    return await GatewayCalls(deadline).each(cancelled, one, batch)


async def void_intents(
    redis: Redis,
    gateway: PaymentGateway,
    sale_id: str,
    batch: int = BATCH,
    deadline: float | None = None,
) -> int:
    """Void the cancelled orders' intents, pass after pass until none is due or ``deadline``."""
    return await in_passes(lambda: void_pass(redis, gateway, sale_id, batch, deadline), deadline)


async def expire_or_settle(
    redis: Redis, gateway: PaymentGateway, sale_id: str, order_id: str, intent_id: str
) -> str:
    """Before a hold with an intent expires, cancel the intent; if the money already moved,
    the order becomes paid instead. Returns the order's resulting state ('reserved': the bank
    has not decided yet). ``GatewayUnavailable`` passes through: the hold stays until the
    gateway answers."""
    try:
        intent = await gateway.cancel_intent(intent_id)
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
    deadline = time.monotonic() + JOB_WINDOW_S

    async def one(sale_id: str) -> int:
        paid = await pay_refunds(ctx["store"], ctx["gateway"], sale_id, deadline=deadline)
        return paid + await void_intents(ctx["store"], ctx["gateway"], sale_id, deadline=deadline)

    return await each_sale(ctx, "refunds", one)
