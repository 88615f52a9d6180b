"""What every worker job shares: the clients arq keeps in ``ctx`` and the walk over live sales.

``startup`` and ``shutdown`` are the arq hooks ``WorkerSettings`` names; every job reads its
clients from ``ctx`` (``store`` the Redis of the sales, ``db`` the ledger's pool, ``gateway`` the
payment gateway, ``consumer`` this process's name in the outbox consumer groups, ``health``
the ``WorkerHealth`` every job records into).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from engine.db import connect_postgres, connect_redis
from engine.payments import make_gateway
from engine.sales import live_sale_ids
from engine.scripts import load_scripts
from engine.settings import Settings
from workers.heartbeats import HEALTH, STORES_LOST, WorkerHealth

__all__ = ["each_sale", "log", "shutdown", "startup"]

log = logging.getLogger("flashsale.worker")

STORE_DEADLINE_S = 10.0


async def startup(ctx: dict[str, Any]) -> None:
    """Make the clients every job uses and load the Lua scripts."""
    # Here, in the worker's own ctx, before any job: each job gets a copy (an arq worker run
    # without workers.runner, which passes in its own).
    ctx.setdefault(HEALTH, WorkerHealth())
    settings = Settings.from_env()
    ctx["settings"] = settings
    # ctx["redis"] is arq's own connection; ours is ctx["store"]. A stalled Redis fails a call
    # within STORE_DEADLINE_S instead of holding the job until arq's timeout.
    ctx["store"] = connect_redis(settings, pool_size=32, deadline_s=STORE_DEADLINE_S)
    # The drain has clients of its own: payment work waiting on the gateway, or a burst of
    # expiries, never holds the connections the ledger needs.
    ctx["drain_store"] = connect_redis(settings, pool_size=4, deadline_s=STORE_DEADLINE_S)
    ctx["consumer"] = f"{socket.gethostname()}-{os.getpid()}"
    ctx["gateway"] = make_gateway(settings, ctx["store"])
    # No floor of idle connections: while Postgres is away asyncpg would keep restoring one per
    # pool in the background, logging a traceback at each try (1 s doubling to 60 s), beside
    # the outage the failing jobs already report once. The jobs run every second, so their
    # connections stay open anyway.
    ctx["db"] = await connect_postgres(settings, min_size=0, max_size=4)
    ctx["drain_db"] = await connect_postgres(settings, min_size=0, max_size=2)
    await load_scripts(ctx["store"])


async def shutdown(ctx: dict[str, Any]) -> None:
    """Close what ``startup`` opened (as far as it got: a start-up can fail half way)."""
    for name in ("gateway", "store", "drain_store"):
        if name in ctx:
            await ctx[name].aclose()
    for name in ("db", "drain_db"):
        if name in ctx:
            await ctx[name].close()


async def each_sale(ctx: dict[str, Any], job: str, work: Callable[[str], Awaitable[int]]) -> int:
    """Run ``work`` for every live sale and add up what it did; one sale's failure is logged and
    the job goes on to the next sale (the failed one is retried next tick)."""
    total = 0
    for sale_id in await live_sale_ids(ctx["store"]):
        try:
            total += await work(sale_id)
        except STORES_LOST:
            # Not this sale's failure: the job fails as a whole, which reports the outage once
            # (workers.heartbeats), where each sale would log a traceback every tick.
            raise
        except Exception:
            log.exception("%s failed for sale %s; retrying next tick", job, sale_id)
    return total
