"""arq ``WorkerSettings``: run with ``flashsale worker``, which points arq at FLASHSALE_REDIS_URL.

Both jobs are crons that fire every second and are unique per tick, so with several worker
processes each tick runs once. The drain job keeps draining for most of its second, so the ledger
trails Redis by a batch, not by a tick.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

from arq import cron

from engine.db import connect_postgres, connect_redis
from engine.payments import make_gateway
from engine.reconcile import reconcile
from engine.sales import live_sale_ids
from engine.scripts import load_scripts
from engine.settings import Settings
from engine.webhooks import apply_pending
from workers.holds import expire_sale
from workers.outbox import drain_sale
from workers.payments import create_intents, pay_refunds, void_intents

__all__ = ["WorkerSettings"]

log = logging.getLogger("flashsale.worker")

# How long one drain job keeps polling before the next tick's job takes over; under 1 s so two
# ticks' jobs rarely overlap. After each pass the job waits FLASHSALE_DRAIN_POLL_MS, so under a
# storm entries gather into batches instead of the loop spinning on a few at a time: Postgres
# and the worker pay a fixed cost per pass whatever its size (`python -m loadtests.costs`, entries
# of 20 orders, 1,000 against 200 orders per pass: worker 5.2 against 20.7 µs, Postgres 26.5
# against 32.5 µs per order).
DRAIN_WINDOW_S = 0.9
# Each pass that finds every outbox empty doubles the wait, up to this: polling four idle sales
# every 20 ms cost the worker 6.4 % of a core.
IDLE_PAUSE_MAX_S = 0.16


async def startup(ctx: dict[str, Any]) -> None:
    settings = Settings.from_env()
    ctx["settings"] = settings
    # ctx["redis"] is arq's own connection; ours is ctx["store"].
    ctx["store"] = connect_redis(settings, pool_size=32)
    ctx["db"] = await connect_postgres(settings, min_size=1, max_size=4)
    ctx["consumer"] = f"{socket.gethostname()}-{os.getpid()}"
    ctx["gateway"] = make_gateway(settings, ctx["store"])
    await load_scripts(ctx["store"])


async def shutdown(ctx: dict[str, Any]) -> None:
    await ctx["gateway"].aclose()
    await ctx["store"].aclose()
    await ctx["db"].close()


async def drain_outboxes(ctx: dict[str, Any]) -> int:
    """Drain every live sale's outbox into Postgres for about a second."""
    settings: Settings = ctx["settings"]
    deadline = time.monotonic() + DRAIN_WINDOW_S
    written = 0
    first = True
    empty_passes = 0
    while True:
        this_pass = 0
        for sale_id in await live_sale_ids(ctx["store"]):
            this_pass += await drain_sale(
                ctx["store"],
                ctx["db"],
                sale_id,
                ctx["consumer"],
                settings.drain_batch,
                settings.claim_idle_ms,
                # Pending and dead workers' entries once a job (a second), not every 10 ms
                # poll: a failed write ends the job, so the next one picks its entries up.
                recover=first,
            )
        first = False
        written += this_pass
        if time.monotonic() >= deadline:
            return written
        empty_passes = 0 if this_pass else empty_passes + 1
        # drain_sale has read each outbox until a read came back short of a batch, so every
        # pass ends caught up: wait for the next orders to gather. Never past the window: the
        # next tick's job (same consumer) would otherwise start while this one still runs and
        # re-write its in-flight entries in its recovery pass.
        poll_s = settings.drain_poll_ms / 1000
        pause = max(poll_s, min(poll_s * 2**empty_passes, IDLE_PAUSE_MAX_S))
        await asyncio.sleep(max(0.0, min(pause, deadline - time.monotonic())))


async def _each_sale(ctx: dict[str, Any], job: str, work: Callable[[str], Awaitable[int]]) -> int:
    """Run ``work`` for every live sale and add up what it did; one sale's failure is logged and
    the job goes on to the next sale (the failed one is retried next tick)."""
    total = 0
    for sale_id in await live_sale_ids(ctx["store"]):
        try:
            total += await work(sale_id)
        except Exception:
            log.exception("%s failed for sale %s; retrying next tick", job, sale_id)
    return total


async def expire_holds(ctx: dict[str, Any]) -> int:
    """Expire every due hold of every live sale (cancelling its PaymentIntent first)."""
    expired = await _each_sale(
        ctx, "expiry", lambda sale_id: expire_sale(ctx["store"], sale_id, gateway=ctx["gateway"])
    )
    if expired:
        log.info("expired %d holds", expired)
    return expired


async def payment_intents(ctx: dict[str, Any]) -> int:
    """Create a PaymentIntent for every live hold without one."""
    return await _each_sale(
        ctx,
        "payment intents",
        lambda sale_id: create_intents(ctx["store"], ctx["gateway"], sale_id),
    )


async def refunds(ctx: dict[str, Any]) -> int:
    """Refund at the gateway what is owed (late payments without stock, admin refunds), and
    cancel the intents of cancelled orders."""

    async def one(sale_id: str) -> int:
        paid = await pay_refunds(ctx["store"], ctx["gateway"], sale_id)
        return paid + await void_intents(ctx["store"], ctx["gateway"], sale_id)

    return await _each_sale(ctx, "refunds", one)


async def webhook_retries(ctx: dict[str, Any]) -> int:
    """Apply stored webhook events that arrived before their order could take them."""
    return await apply_pending(ctx["db"], ctx["store"], ctx["gateway"])


async def reconcile_sales(ctx: dict[str, Any]) -> int:
    """Compare Redis, Postgres and the gateway; log every difference (repairs are manual)."""

    async def one(sale_id: str) -> int:
        report = await reconcile(ctx["store"], ctx["db"], ctx["gateway"], sale_id)
        for difference in report.differences:
            log.warning("reconcile %s: %s", sale_id, difference)
        return len(report.differences)

    return await _each_sale(ctx, "reconcile", one)


class WorkerSettings:
    functions: list[Any] = []
    cron_jobs = [
        cron(drain_outboxes, second=None, microsecond=0, run_at_startup=True, timeout=30),
        cron(expire_holds, second=None, microsecond=500_000, run_at_startup=True, timeout=30),
        cron(payment_intents, second=None, microsecond=250_000, run_at_startup=True, timeout=30),
        cron(refunds, second=None, microsecond=750_000, run_at_startup=True, timeout=30),
        cron(webhook_retries, second={0, 10, 20, 30, 40, 50}, timeout=30),
        cron(reconcile_sales, second=15, timeout=120),
    ]
    on_startup = startup
    on_shutdown = shutdown
    poll_delay = 0.1
    max_jobs = 8
    handle_signals = True
