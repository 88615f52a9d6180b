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
from typing import Any

from arq import cron

from engine.db import connect_postgres, connect_redis
from engine.sales import live_sale_ids
from engine.scripts import load_scripts
from engine.settings import Settings
from workers.holds import expire_sale
from workers.outbox import drain_sale

__all__ = ["WorkerSettings"]

log = logging.getLogger("flashsale.worker")

# How long one drain job keeps polling before the next tick's job takes over; under 1 s so two
# ticks' jobs rarely overlap, and idle polls are 10 ms apart so the ledger lags by ~10 ms.
DRAIN_WINDOW_S = 0.9
IDLE_POLL_S = 0.01


async def startup(ctx: dict[str, Any]) -> None:
    settings = Settings.from_env()
    ctx["settings"] = settings
    ctx["redis"] = connect_redis(settings, pool_size=32)
    ctx["db"] = await connect_postgres(settings, min_size=1, max_size=4)
    ctx["consumer"] = f"{socket.gethostname()}-{os.getpid()}"
    await load_scripts(ctx["redis"])


async def shutdown(ctx: dict[str, Any]) -> None:
    await ctx["redis"].aclose()
    await ctx["db"].close()


async def drain_outboxes(ctx: dict[str, Any]) -> int:
    """Drain every live sale's outbox into Postgres for about a second."""
    settings: Settings = ctx["settings"]
    deadline = time.monotonic() + DRAIN_WINDOW_S
    written = 0
    while True:
        this_pass = 0
        for sale_id in await live_sale_ids(ctx["redis"]):
            this_pass += await drain_sale(
                ctx["redis"],
                ctx["db"],
                sale_id,
                ctx["consumer"],
                settings.drain_batch,
                settings.claim_idle_ms,
            )
        written += this_pass
        if time.monotonic() >= deadline:
            return written
        if this_pass == 0:
            await asyncio.sleep(IDLE_POLL_S)


async def expire_holds(ctx: dict[str, Any]) -> int:
    """Expire every due hold of every live sale."""
    expired = 0
    for sale_id in await live_sale_ids(ctx["redis"]):
        expired += await expire_sale(ctx["redis"], sale_id)
    if expired:
        log.info("expired %d holds", expired)
    return expired


class WorkerSettings:
    functions: list[Any] = []
    cron_jobs = [
        cron(drain_outboxes, second=None, microsecond=0, run_at_startup=True, timeout=30),
        cron(expire_holds, second=None, microsecond=500_000, run_at_startup=True, timeout=30),
    ]
    on_startup = startup
    on_shutdown = shutdown
    poll_delay = 0.1
    max_jobs = 8
    handle_signals = True
