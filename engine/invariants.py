"""The promises of a sale, checked against what Redis and Postgres actually hold.

Used by the demo, the benchmark, the tests and operators. Call it once the outbox is drained
(``wait_for_ledger``): while a drain is in flight the ledger legitimately trails Redis.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field

import asyncpg
from redis.asyncio import Redis

from engine.inventory import read_sale
from engine.keys import sale_keys
from engine.ledger import ledger_orders

__all__ = ["SaleAudit", "audit_sale", "outbox_backlog", "redis_orders", "wait_for_ledger"]

LIVE_STATES = ("reserved", "paid")


@dataclass
class SaleAudit:
    sale_id: str
    initial: int = 0
    available: int = 0
    held: int = 0
    sold: int = 0
    withdrawn: int = 0
    orders_in_redis: int = 0
    orders_in_ledger: int = 0
    states: dict[str, int] = field(default_factory=dict)
    max_units_per_user: int = 0
    violations: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations


async def redis_orders(redis: Redis, sale_id: str) -> dict[str, dict[str, str]]:
    """Every order hash of a sale (SCAN, so it is for audits, never for the order path)."""
    keys = sale_keys(sale_id)
    names = [name async for name in redis.scan_iter(match=keys.order("*"), count=1000)]
    orders: dict[str, dict[str, str]] = {}
    for start in range(0, len(names), 1000):
        async with redis.pipeline(transaction=False) as pipe:
            for name in names[start : start + 1000]:
                pipe.hgetall(name)
            for order in await pipe.execute():
                if order:
                    orders[order["id"]] = order
    return orders


async def outbox_backlog(redis: Redis, sale_id: str) -> int:
    """Outbox entries not yet in the ledger (an entry of reserve carries a batch's orders). The
    drain deletes an entry in the same script call that acknowledges it (lua/ack-1.lua), so
    whatever is still in the stream is undelivered or in flight."""
    backlog: int = await redis.xlen(sale_keys(sale_id).outbox)
    return backlog


async def wait_for_ledger(redis: Redis, sale_id: str, timeout_s: float = 60.0) -> float:
    """Wait until the outbox is fully drained; returns the seconds waited."""
    started = time.monotonic()
    while await outbox_backlog(redis, sale_id) > 0:
        if time.monotonic() - started > timeout_s:
            raise TimeoutError(f"outbox of {sale_id} not drained after {timeout_s:.0f} s")
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def audit_sale(
    redis: Redis, db: asyncpg.Pool, sale_id: str, accepted: set[str] | None = None
) -> SaleAudit:
    """Check every invariant; ``accepted`` are the order ids clients were answered 201 for."""
    audit = SaleAudit(sale_id=sale_id)
    bad = audit.violations.append
    sale = await read_sale(redis, sale_id)
    if sale is None:
        bad(f"sale {sale_id} is not in Redis")
        return audit
    audit.initial = int(sale["initial_stock"])
    audit.available = int(sale["stock"])
    audit.held = int(sale["held"])
    audit.sold = int(sale["sold"])
    audit.withdrawn = int(sale.get("withdrawn", 0))
    limit = int(sale["per_user_limit"])

    if audit.available < 0:
        bad(f"stock is negative: {audit.available}")
    if audit.available + audit.held + audit.sold + audit.withdrawn != audit.initial:
        bad(
            f"available {audit.available} + held {audit.held} + sold {audit.sold}"
            f" + withdrawn {audit.withdrawn} != initial {audit.initial}"
        )

    orders = await redis_orders(redis, sale_id)
    audit.orders_in_redis = len(orders)
    audit.states = dict(Counter(o["state"] for o in orders.values()))
    units = {
        state: sum(int(o["qty"]) for o in orders.values() if o["state"] == state)
        for state in LIVE_STATES
    }
    if units["reserved"] != audit.held:
        bad(f"orders in 'reserved' hold {units['reserved']} units, the counter says {audit.held}")
    if units["paid"] != audit.sold:
        bad(f"orders in 'paid' hold {units['paid']} units, the counter says {audit.sold}")

    per_user: Counter[str] = Counter()
    for o in orders.values():
        if o["state"] in LIVE_STATES:
            per_user[o["user"]] += int(o["qty"])
    audit.max_units_per_user = max(per_user.values(), default=0)
    over = [user for user, n in per_user.items() if n > limit]
    if over:
        bad(f"{len(over)} shoppers above the limit of {limit}, e.g. {over[:3]}")
    users: dict[str, str] = await redis.hgetall(sale_keys(sale_id).users)
    # Shoppers whose units all went back stay in the hash at 0 (engine.http.soldout needs them).
    counted = {user: int(n) for user, n in users.items() if n != "0"}
    if any(int(n) < 0 for n in users.values()):
        bad("a per-user counter is negative")
    if counted != dict(per_user):
        bad("per-user counters disagree with the orders they count")

    keys = sale_keys(sale_id)
    # A live hold is in exactly one index: ``intent_holds`` when it has an intent.
    for index, with_intent in ((keys.holds, False), (keys.intent_holds, True)):
        held = set(await redis.zrange(index, 0, -1))
        reserved = {
            oid
            for oid, o in orders.items()
            if o["state"] == "reserved" and bool(o.get("pi")) is with_intent
        }
        if held != reserved:
            bad(f"{index} has {len(held - reserved)} stale and misses {len(reserved - held)}")

    if accepted is not None:
        missing = accepted - orders.keys()
        if missing:
            bad(
                f"{len(missing)} accepted orders are missing from Redis, e.g. {sorted(missing)[:3]}"
            )
        unasked = orders.keys() - accepted
        if unasked:
            bad(f"{len(unasked)} orders in Redis were never answered 201")

    ledger = await ledger_orders(db, sale_id)
    audit.orders_in_ledger = len(ledger)
    missing_in_ledger = orders.keys() - ledger.keys()
    if missing_in_ledger:
        bad(f"{len(missing_in_ledger)} orders missing from the ledger")
    if ledger.keys() - orders.keys():
        bad(f"{len(ledger.keys() - orders.keys())} ledger orders unknown to Redis")
    stale = [
        oid
        for oid, o in orders.items()
        if oid in ledger and (ledger[oid][0], ledger[oid][1]) != (o["state"], int(o["version"]))
    ]
    if stale:
        bad(f"{len(stale)} ledger orders disagree with Redis on state/version, e.g. {stale[:3]}")
    return audit
