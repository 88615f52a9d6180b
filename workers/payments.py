"""Payment jobs: refund what is owed, cancel the intents of cancelled orders, and settle a
hold's intent before the hold expires.

A PaymentIntent is made when the shopper asks to pay (``engine.checkout``), never by a job.
The arq job is ``refunds`` (``refund_pass`` and ``void_pass``); the expiry of holds with an
intent runs inside the expiry job (``workers.holds``, ``settle_pass``). Each pass walks its own
work index (``keys.refunds``, ``keys.voids``, ``keys.intent_holds``) a bounded batch at a time
(``workers.context``).

The gateway answering "unavailable" or "busy" for one order stops the job's gateway work: the
gateway is down or over its rate, and every order keeps its place for the next tick. The
gateway refusing one order (an intent it does not know) is logged and that order steps aside,
so the orders behind it are never held up.
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
from engine.logs import Outage
from engine.payments import GatewayRefused, GatewayUnavailable, OverRate, PaymentGateway
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
from workers.heartbeats import HEALTH, WorkerHealth

__all__ = [
    "GatewayWork",
    "PassFn",
    "all_due",
    "job_work",
    "refund_pass",
    "refunds",
    "void_pass",
]

log = logging.getLogger("flashsale.payments")

# Calls in flight at once: enough to keep up with the shared gateway rate (engine.gatewaylimit)
# while each waits for the gateway's answer, few enough that work stops quickly on "busy".
GATEWAY_CONCURRENCY = 8
# A refund the gateway refused is tried again this much later (ms); reconcile reports it
# meanwhile as refund-owed.
REFUSED_RETRY_MS = 3_600_000

OrderWork = Callable[[str, list[str | None]], Awaitable[bool]]


class GatewayWork:
    """One job run's gateway work over work indexes, a few orders at a time: the clients, the
    batch a pass reads, and the deadline. The first ``GatewayUnavailable`` (down, or busy:
    over the rate) or the deadline stops all of it; what was not started stays due.

    A gateway down for minutes is one outage of the worker (``WorkerHealth.gateway``, passed in
    as ``outage``): logged when the first call fails and when one succeeds again, not once per
    tick of every job that meets it."""

    def __init__(
        self,
        redis: Redis,
        gateway: PaymentGateway,
        batch: int = BATCH,
        deadline: float | None = None,
        outage: Outage | None = None,
    ) -> None:
        self.redis = redis
        self.gateway = gateway
        self.batch = batch
        self.deadline = deadline
        self.outage = outage if outage is not None else Outage("payment gateway", log)
        self.stopped = False
        self._gate = asyncio.Semaphore(GATEWAY_CONCURRENCY)

    async def _run(self, work: Callable[[], Awaitable[bool]]) -> bool:
        async with self._gate:
            if self.deadline is not None and time.monotonic() >= self.deadline:
                self.stopped = True
            if self.stopped:
                return False
            try:
                done = await work()
            except OverRate:
                # The deployment's own rate, not a failure: the rest waits for the next tick.
                self.stopped = True
                return False
            except GatewayUnavailable as exc:
                # Backs off until the next tick: what was not started stays due.
                self.outage.failed(exc)
                self.stopped = True
                return False
            self.outage.recovered()
            return done

    async def walk(
        self, sale_id: str, index: str, fields: tuple[str, ...], work: OrderWork
    ) -> Pass:
        """One pass over a work index: ``work(order_id, its fields)`` for each of at most
        ``batch`` due orders (True: done)."""
        if self.stopped:
            return Pass(0, False)
        found = await due(self.redis, index, self.batch)
        rows = await order_fields(self.redis, sale_id, found, *fields)
        done = await asyncio.gather(
            *(self._run(partial(work, oid, row)) for oid, row in zip(found, rows, strict=True))
        )
        return Pass(done=sum(done), more=len(found) == self.batch and not self.stopped)


def job_work(ctx: dict[str, Any]) -> GatewayWork:
    """The gateway work of one run of a job, inside its window, reporting into the worker's
    one gateway outage."""
    health: WorkerHealth = ctx[HEALTH]
    return GatewayWork(
        ctx["store"],
        ctx["gateway"],
        deadline=time.monotonic() + JOB_WINDOW_S,
        outage=health.gateway,
    )


PassFn = Callable[[GatewayWork, str], Awaitable[Pass]]


async def all_due(one_pass: PassFn, work: GatewayWork, sale_id: str) -> int:
    """``one_pass`` (``refund_pass``, ``void_pass``, ``settle_pass``) over the sale again and
    again until nothing is due or the work stops; returns the orders done."""
    return await in_passes(lambda: one_pass(work, sale_id), work.deadline)


async def refund_pass(work: GatewayWork, sale_id: str) -> Pass:
    """Refund at the gateway a batch of due refund_pending orders, then mark them refunded."""
    redis, keys = work.redis, sale_keys(sale_id)

    async def one(order_id: str, row: list[str | None]) -> bool:
        intent_id, state = row
        if state != "refund_pending":
            await redis.zrem(keys.refunds, order_id)  # nothing owed on it any more
            return False
        if not intent_id:
            log.error("refund of %s owed but it has no intent; reconcile reports it", order_id)
            await defer(redis, keys.refunds, order_id, REFUSED_RETRY_MS)
            return False
        try:
            refund_id = await work.gateway.refund(intent_id, order_id)
        except GatewayRefused as exc:
            log.warning("refund of %s refused, tried again in an hour: %s", order_id, exc)
            await defer(redis, keys.refunds, order_id, REFUSED_RETRY_MS)
            return False
        # Killed here? The refund's idempotency key (the order id) makes the retry return the
        # same refund instead of paying twice.
        result = await inventory.refund(redis, sale_id, order_id, "complete", refund_id=refund_id)
        return result.code is Code.OK

    return await work.walk(sale_id, keys.refunds, ("pi", "state"), one)


async def void_pass(work: GatewayWork, sale_id: str) -> Pass:
    """Cancel at the gateway the intents of a batch of orders the shopper cancelled, so nobody
    pays for a hold that is gone (a payment that still slips through takes confirm's late
    path)."""
    redis, keys = work.redis, sale_keys(sale_id)

    async def one(order_id: str, row: list[str | None]) -> bool:
        [intent_id] = row
        if intent_id:
            try:
                intent = await work.gateway.cancel_intent(intent_id)
            except GatewayRefused as exc:
                # Unknown to the gateway: nothing can be paid through it.
                log.warning("void of %s: intent %s unknown: %s", order_id, intent_id, exc)
            else:
                if intent.status == "succeeded":
                    # Paid just before the cancel: confirm re-reserves or owes a refund.
                    await inventory.confirm(redis, sale_id, order_id, intent_id)
        await redis.zrem(keys.voids, order_id)
        return True

    return await work.walk(sale_id, keys.voids, ("pi",), one)


async def refunds(ctx: dict[str, Any]) -> int:
    """The arq job: refund at the gateway what is owed (late payments without stock, admin
    refunds), and cancel the intents of cancelled orders."""
    work = job_work(ctx)

    async def one(sale_id: str) -> int:
        return await all_due(refund_pass, work, sale_id) + await all_due(void_pass, work, sale_id)

    return await each_sale(ctx, "refunds", one)
