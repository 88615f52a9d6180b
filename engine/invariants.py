"""The promises of a sale, checked against what Redis and Postgres actually hold.

Used by the demo, the benchmark, the tests and operators. Call ``audit_sale`` once the outbox is
drained (``wait_for_ledger``): while a drain is in flight the ledger legitimately trails Redis.

``redis_snapshot`` reads a sale's counters and the orders it is given in one script call, so
they come from one instant even while orders and workers keep writing; ``ledger_agrees`` waits
until such a snapshot stands still with the outbox empty and compares it with the ledger.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import asyncpg
from redis.asyncio import Redis

from engine.inventory import read_sale
from engine.keys import sale_keys
from engine.ledger import ledger_orders
from engine.scripts import SCRIPTS, Code

__all__ = [
    "LedgerOrders",
    "OrderSnapshot",
    "SaleAudit",
    "SaleSnapshot",
    "audit_sale",
    "counter_violations",
    "ledger_agrees",
    "outbox_backlog",
    "redis_orders",
    "redis_snapshot",
    "snapshot_violations",
    "wait_for_ledger",
]

_snapshot = SCRIPTS["snapshot"]

# What ``ledger_orders`` returns: order id -> (state, version, user, quantity).
LedgerOrders = dict[str, tuple[str, int, str, int]]

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

    orders = await redis_orders(redis, sale_id)
    audit.orders_in_redis = len(orders)
    audit.states = dict(Counter(o["state"] for o in orders.values()))
    units = Counter[str]()
    for o in orders.values():
        units[o["state"]] += int(o["qty"])
    audit.violations += _counter_rules(
        audit.available, audit.held, audit.sold, audit.withdrawn, audit.initial, units
    )

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


@dataclass(frozen=True, slots=True)
class OrderSnapshot:
    state: str
    version: int
    quantity: int
    user: str


@dataclass(frozen=True, slots=True)
class SaleSnapshot:
    """A sale's counters and the orders asked for, as the ``snapshot`` script read them at one
    instant."""

    sale_id: str
    available: int
    held: int
    sold: int
    withdrawn: int
    initial: int
    outbox_length: int  # entries the ledger has not committed (acknowledged ones are deleted)
    orders: dict[str, OrderSnapshot]  # the listed orders Redis has
    absent: frozenset[str]  # listed ids Redis has no order for


async def redis_snapshot(
    redis: Redis, sale_id: str, order_ids: Iterable[str]
) -> SaleSnapshot | None:
    """The sale's counters and every order of ``order_ids``, in one script call; None when the
    sale is not in Redis. Redis does nothing else while it reads every listed order: for
    audits, never for the order path."""
    keys = sale_keys(sale_id)
    ids = sorted(set(order_ids))
    reply = await _snapshot(
        redis, [keys.sale, keys.stock, keys.outbox, *(keys.order(oid) for oid in ids)], []
    )
    if Code(reply[0]) is Code.SALE_NOT_FOUND:
        return None
    available, held, sold, withdrawn, initial, outbox_length = reply[1:7]
    orders = {
        oid: OrderSnapshot(state=o[1], version=o[2], quantity=o[3], user=o[4])
        for oid, o in zip(ids, reply[7:], strict=True)
        if o is not None
    }
    return SaleSnapshot(
        sale_id=sale_id,
        available=available,
        held=held,
        sold=sold,
        withdrawn=withdrawn,
        initial=initial,
        outbox_length=outbox_length,
        orders=orders,
        absent=frozenset(ids) - orders.keys(),
    )


def snapshot_violations(snapshot: SaleSnapshot, ledger: LedgerOrders) -> list[str]:
    """How ``snapshot`` and the ledger disagree, and which counter rules it breaks.

    The counter rules hold only for a snapshot of every order of the sale. It is one when its
    outbox was empty (every order Redis has reached the ledger) and it listed every ledger
    order: the first two checks say when it was not.
    """
    bad: list[str] = []
    if snapshot.outbox_length:
        bad.append(f"{snapshot.outbox_length} outbox entries are not in the ledger yet")
    if unlisted := ledger.keys() - snapshot.orders.keys() - snapshot.absent:
        bad.append(f"{len(unlisted)} ledger orders were not in the snapshot, e.g. {min(unlisted)}")
    if snapshot.absent:
        bad.append(
            f"{len(snapshot.absent)} listed orders are missing from Redis,"
            f" e.g. {min(snapshot.absent)}"
        )
    if missing := snapshot.orders.keys() - ledger.keys():
        bad.append(f"{len(missing)} orders in Redis are not in the ledger, e.g. {min(missing)}")
    differ = sorted(
        oid
        for oid, o in snapshot.orders.items()
        if oid in ledger and ledger[oid] != (o.state, o.version, o.user, o.quantity)
    )
    if differ:
        oid = differ[0]
        bad.append(
            f"{len(differ)} ledger orders disagree with Redis, e.g. {oid}:"
            f" ledger {ledger[oid]}, Redis {snapshot.orders[oid]}"
        )
    return bad + counter_violations(snapshot)


def counter_violations(s: SaleSnapshot) -> list[str]:
    """The counter rules a snapshot of every order of its sale breaks: no negative stock,
    available + held + sold + withdrawn = initial, held and sold = the units of the orders in
    reserved and in paid."""
    units = Counter[str]()
    for o in s.orders.values():
        units[o.state] += o.quantity
    return _counter_rules(s.available, s.held, s.sold, s.withdrawn, s.initial, units)


def _counter_rules(
    available: int, held: int, sold: int, withdrawn: int, initial: int, units: Counter[str]
) -> list[str]:
    """What a sale's counters break, given the units of its orders by state: no negative
    stock, available + held + sold + withdrawn = initial, held and sold = the units of the
    orders in reserved and in paid."""
    bad: list[str] = []
    if available < 0:
        bad.append(f"stock is negative: {available}")
    if available + held + sold + withdrawn != initial:
        bad.append(
            f"available {available} + held {held} + sold {sold}"
            f" + withdrawn {withdrawn} != initial {initial}"
        )
    if units["reserved"] != held:
        bad.append(f"orders in 'reserved' hold {units['reserved']} units, held says {held}")
    if units["paid"] != sold:
        bad.append(f"orders in 'paid' hold {units['paid']} units, sold says {sold}")
    return bad


async def ledger_agrees(
    redis: Redis, db: asyncpg.Pool, sale_id: str, accepted: Iterable[str], timeout_s: float = 60
) -> tuple[SaleSnapshot, list[str]]:
    """A snapshot of every order in ``accepted`` (answered 201) or in the ledger, taken once the
    ledger has caught up, and its ``snapshot_violations``.

    Workers keep changing orders (an intent attached raises a version), so a snapshot and a
    later read of the ledger can differ only because an order moved in between. The comparison
    is made only when two snapshots around the ledger read are equal with an empty outbox:
    versions only grow, so nothing changed in between, and the ledger read has every change up
    to the first. Raises TimeoutError when the sale never stands still for that long, and
    LookupError when Redis has no such sale.
    """
    wanted = set(accepted)
    deadline = time.monotonic() + timeout_s
    while True:
        before = await redis_snapshot(redis, sale_id, wanted)
        if before is None:
            raise LookupError(f"sale {sale_id} is not in Redis")
        if not before.outbox_length:
            ledger = await ledger_orders(db, sale_id)
            if ledger.keys() <= wanted:
                after = await redis_snapshot(redis, sale_id, wanted)
                if after == before:
                    return before, snapshot_violations(before, ledger)
            wanted |= ledger.keys()
        if time.monotonic() > deadline:
            raise TimeoutError(f"sale {sale_id} did not stand still for {timeout_s:.0f} s")
        await asyncio.sleep(0.05)
