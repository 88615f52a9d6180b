"""What every worker job shares: the clients arq keeps in ``ctx``, the walk over live sales, and
the walk over a work index in bounded passes.

``startup`` and ``shutdown`` are the arq hooks ``WorkerSettings`` names; every job reads its
clients from ``ctx`` (``store`` the Redis of the sales, ``db`` the ledger's pool, ``gateway`` the
payment gateway, ``consumer`` this process's name in the outbox consumer groups, ``health``
the ``WorkerHealth`` every job records into).

A work index is a sorted set per sale that holds only the orders needing one kind of work,
scored by when the work is due (ms, Redis's clock); the script that makes the work adds the
order in the same call. A pass reads at most a batch of due orders, so a job's memory and each
Redis call stay small however many orders a sale has.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from engine.db import connect_postgres, connect_redis, redis_ms
from engine.gatewaylimit import BACKGROUND_MAX_WAIT_S
from engine.keys import sale_keys
from engine.payments import make_gateway
from engine.sales import live_sale_ids
from engine.scripts import load_scripts
from engine.settings import Settings
from workers.heartbeats import HEALTH, STORES_LOST, WorkerHealth

__all__ = [
    "BATCH",
    "JOB_WINDOW_S",
    "Pass",
    "defer",
    "due",
    "each_sale",
    "in_passes",
    "log",
    "order_fields",
    "shutdown",
    "startup",
]

log = logging.getLogger("flashsale.worker")

STORE_DEADLINE_S = 10.0

# Orders read from a work index at once. At the default gateway rate (80 calls/s) a batch is
# 2.5 s of gateway calls, so a pass never holds more than a few seconds of work in memory.
BATCH = 200
# How long a per-second job keeps starting work before the next tick's job takes over: the
# next tick's job would otherwise start while this one still runs and repeat its calls.
JOB_WINDOW_S = 0.9


@dataclass(frozen=True, slots=True)
class Pass:
    """What one pass over a work index did: ``done`` orders finished (left the index), and
    whether another pass now may find more (a full batch was read and nothing backed off)."""

    done: int
    more: bool


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
    # Jobs take only the gateway slots close at hand: the further ones are the shoppers'.
    ctx["gateway"] = make_gateway(settings, ctx["store"], max_wait_s=BACKGROUND_MAX_WAIT_S)
    # No floor of idle connections: while Postgres is away asyncpg would keep restoring one per
    # pool in the background, logging a traceback at each try (1 s doubling to 60 s), beside
    # the outage the failing jobs already report once. The jobs run every second, so their
    # connections stay open anyway.
    # A stalled Postgres fails a statement within STORE_DEADLINE_S too, so jobs waiting on it
    # do not pile up in arq's slots until its job timeout.
    ctx["db"] = await connect_postgres(settings, 0, 4, deadline_s=STORE_DEADLINE_S)
    ctx["drain_db"] = await connect_postgres(settings, 0, 2, deadline_s=STORE_DEADLINE_S)
    await load_scripts(ctx["store"])


async def shutdown(ctx: dict[str, Any]) -> None:
    """Close what ``startup`` opened (as far as it got: a start-up can fail half way)."""
    for name in ("gateway", "store", "drain_store"):
        if name in ctx:
            await ctx[name].aclose()
    for name in ("db", "drain_db"):
        if name in ctx:
            await ctx[name].close()


async def due(redis: Redis, index: str, batch: int) -> list[str]:
    """At most ``batch`` order ids of ``index`` whose work is due now, earliest first."""
    now_ms = await redis_ms(redis)
    found: list[str] = await redis.zrangebyscore(index, "-inf", now_ms, start=0, num=batch)
    return found


async def defer(redis: Redis, index: str, order_id: str, delay_ms: int) -> None:
    """Look at ``order_id`` in ``index`` again in ``delay_ms``, so it does not block the due
    ones behind it. XX: an order a script took out of the index meanwhile stays out."""
    await redis.zadd(index, {order_id: await redis_ms(redis) + delay_ms}, xx=True)


async def order_fields(
    redis: Redis, sale_id: str, order_ids: list[str], *fields: str
) -> list[list[str | None]]:
    """``fields`` of each order hash, in one round trip."""
    keys = sale_keys(sale_id)
    async with redis.pipeline(transaction=False) as pipe:
        for order_id in order_ids:
            pipe.hmget(keys.order(order_id), *fields)
        rows: list[list[str | None]] = await pipe.execute()
    return rows


async def in_passes(one_pass: Callable[[], Awaitable[Pass]], deadline: float | None) -> int:
    """Run ``one_pass`` again while it says there may be more and ``deadline`` (monotonic
    seconds; None: none) has not passed. Returns the orders done in all passes."""
    done = 0
    while True:
        result = await one_pass()
        done += result.done
        if not result.more or (deadline is not None and time.monotonic() >= deadline):
            return done


async def each_sale(ctx: dict[str, Any], job: str, work: Callable[[str], Awaitable[int]]) -> int:
    """Run ``work`` for every live sale and add up what it did; one sale's failure is logged as
    that sale's outage of the job (its traceback once, then counted until it works again) and
    the job goes on to the next sale (the failed one is retried next tick)."""
    health: WorkerHealth = ctx[HEALTH]
    total = 0
    for sale_id in await live_sale_ids(ctx["store"]):
        name = f"{job} for sale {sale_id}"
        try:
            total += await work(sale_id)
        except STORES_LOST:
            # Not this sale's failure: the job fails as a whole, which reports the outage once
            # (workers.heartbeats), where each sale would log a traceback every tick.
            raise
        except Exception as exc:
            health.failed(name, exc, sale_id=sale_id)
        else:
            health.job(name).recovered()
    return total
