"""What every worker job shares: the clients arq keeps in ``ctx`` and the walk over live sales.

``startup`` and ``shutdown`` are the arq hooks ``WorkerSettings`` names; every job reads its
clients from ``ctx`` (``store`` the Redis of the sales, ``db`` the ledger's pool, ``gateway`` the
payment gateway, ``consumer`` this process's name in the outbox consumer groups).
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

__all__ = ["each_sale", "log", "shutdown", "startup"]

log = logging.getLogger("flashsale.worker")

STORE_DEADLINE_S = 10.0


async def startup(ctx: dict[str, Any]) -> None:
    """Make the clients every job uses and load the Lua scripts."""
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
    ctx["db"] = await connect_postgres(settings, min_size=1, max_size=4)
    ctx["drain_db"] = await connect_postgres(settings, min_size=1, max_size=2)
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
        except Exception:
            log.exception("%s failed for sale %s; retrying next tick", job, sale_id)
    return total
