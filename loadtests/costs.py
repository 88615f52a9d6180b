"""``python -m loadtests.costs``: what one order costs Redis, Postgres and the drain worker, by
batch size. The figures behind ``engine.http.coalescer`` (orders per reserve call) and the drain's
wait between passes (``FLASHSALE_DRAIN_POLL_MS``): a program that prints them, not a test.

It starts its own Redis (AOF everysec, as the bench) and Postgres in ``--dir``, then, in
alternating rounds on fresh sales:

1. places orders through the reserve script in calls of 1, 20 and 64 orders and reads Redis's
   CPU per order from ``INFO commandstats`` (EVALSHA's time, the commands it ran included);
2. drains outboxes into Postgres pass by pass, as the worker does under a storm: 200 or 1,000
   new orders per pass (what a 20 ms or a 100 ms wait gathers at 10,000 orders/s), written one
   order per entry or 20 per entry (as a server's batches write them), and reads the CPU per
   order of the worker (this process), Postgres (postmaster and backends) and Redis
   (``/proc``), during the drain passes only;
3. the same drain (20 orders an entry, 1,000 a pass) with one subscriber to ``order.placed``:
   every order then also writes an event and a delivery row in the drain's transaction
   (``engine.events``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import asyncpg
from redis.asyncio import Redis

from engine.db import empty_tables, migrate
from engine.inventory import reserve_many
from engine.sales import create_sale
from engine.scripts import load_scripts
from engine.subscriptions import create_subscription
from loadtests.bench import bench_sale
from loadtests.cpumeter import postmaster_and_backends, processes_s
from localrun import servers as localservices
from workers.outbox import drain_sale

__all__ = ["main"]

RESERVE_BATCHES = (1, 20, 64)
DRAIN_PASSES = (200, 1000)  # new orders per drain pass
ENTRY_SIZES = (1, 20)  # orders per outbox entry


async def _place(redis: Redis, sale_id: str, orders: int, per_call: int) -> None:
    for start in range(0, orders, per_call):
        users = range(start, min(orders, start + per_call))
        await reserve_many(redis, sale_id, [(f"u{i}", 1, f"k{i}") for i in users])


async def _new_sale(db: asyncpg.Pool, redis: Redis, orders: int) -> str:
    sale_id = "cost-" + secrets.token_hex(4)
    await create_sale(db, redis, bench_sale(sale_id, orders, 1))
    return sale_id


async def _reserve_us(db: asyncpg.Pool, redis: Redis, orders: int, per_call: int) -> float:
    sale_id = await _new_sale(db, redis, orders)
    await redis.config_resetstat()
    await _place(redis, sale_id, orders, per_call)
    stats = await redis.info("commandstats")
    return float(stats["cmdstat_evalsha"]["usec"]) / orders


async def _drain_us(
    db: asyncpg.Pool,
    redis: Redis,
    meters: dict[str, Callable[[], float]],
    orders: int,
    per_entry: int,
    per_pass: int,
) -> dict[str, float]:
    sale_id = await _new_sale(db, redis, orders)
    spent = dict.fromkeys(meters, 0.0)
    for start in range(0, orders, per_pass):
        count = min(per_pass, orders - start)
        for first in range(start, start + count, per_entry):
            users = range(first, min(start + count, first + per_entry))
            await reserve_many(redis, sale_id, [(f"u{i}", 1, f"k{i}") for i in users])
        before = {name: meter() for name, meter in meters.items()}
        written = await drain_sale(redis, db, sale_id, "costs", 1000, 60_000, recover=False)
        assert written == count, f"drained {written} of {count}"
        for name, meter in meters.items():
            spent[name] += meter() - before[name]
    return {name: seconds * 1e6 / orders for name, seconds in spent.items()}


async def _run(base: Path, orders: int, rounds: int) -> None:
    urls = localservices.up(base)
    await migrate(urls["postgres_dsn"])
    recorded = json.loads((base / "services.json").read_text())
    redis = Redis.from_url(urls["redis_url"], decode_responses=True)
    db = await asyncpg.create_pool(urls["postgres_dsn"], min_size=1, max_size=2)
    meters: dict[str, Callable[[], float]] = {
        "worker": time.process_time,
        "postgres": lambda: postmaster_and_backends(recorded["postgres"]["pid"]),
        "redis": lambda: processes_s([recorded["redis"]["pid"]]),
    }
    reserve: dict[int, list[float]] = defaultdict(list)
    drain: dict[tuple[int, int], list[dict[str, float]]] = defaultdict(list)
    with_events: list[dict[str, float]] = []
    try:
        await redis.flushdb()
        await empty_tables(db)
        await load_scripts(redis)
        for _ in range(rounds):
            for per_call in RESERVE_BATCHES:
                reserve[per_call].append(await _reserve_us(db, redis, orders, per_call))
            for per_entry in ENTRY_SIZES:
                for per_pass in DRAIN_PASSES:
                    figures = await _drain_us(db, redis, meters, orders, per_entry, per_pass)
                    drain[per_entry, per_pass].append(figures)
            body = {"url": "https://hooks.example.com/costs", "event_types": ["order.placed"]}
            subscription = await create_subscription(db, body)
            with_events.append(await _drain_us(db, redis, meters, orders, 20, 1000))
            await db.execute("DELETE FROM webhook_subscriptions WHERE id = $1", subscription["id"])
    finally:
        await redis.aclose()
        await db.close()
        localservices.down(base)

    print(f"{orders:,} orders per measurement, median of {rounds} alternating rounds")
    print("\nreserve script, Redis CPU per order (INFO commandstats, EVALSHA)")
    for per_call, values in reserve.items():
        print(f"  {per_call:>3} orders per call   {statistics.median(values):6.1f} µs")
    print("\ndrain, CPU per order during the passes (/proc)")
    print("  orders/entry   orders/pass    worker  postgres     redis")
    for (per_entry, per_pass), runs in drain.items():
        med = {name: statistics.median(run[name] for run in runs) for name in meters}
        print(
            f"  {per_entry:>12}  {per_pass:>12}  {med['worker']:6.1f} µs"
            f"  {med['postgres']:5.1f} µs  {med['redis']:5.1f} µs"
        )
    med = {name: statistics.median(run[name] for run in with_events) for name in meters}
    print("\ndrain of 20 orders an entry, 1,000 a pass, one subscriber to order.placed")
    print(
        f"  with events                 {med['worker']:6.1f} µs"
        f"  {med['postgres']:5.1f} µs  {med['redis']:5.1f} µs"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.costs",
        description="Print what one order costs Redis, Postgres and the drain worker, by batch "
        "size (reserve calls of 1/20/64 orders; drain passes of 200/1,000 orders written 1 or "
        "20 to an outbox entry). Starts its own Redis and Postgres in --dir, which it empties.",
    )
    parser.add_argument("--dir", type=Path, default=Path(".flashsale/costs"), help="data dir")
    parser.add_argument("--orders", type=int, default=20_000, help="orders per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    options = parser.parse_args(argv)
    if options.orders < 1 or options.rounds < 1:
        parser.error("--orders and --rounds must be at least 1")
    localservices.ensure_installed()
    asyncio.run(_run(options.dir, options.orders, options.rounds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
