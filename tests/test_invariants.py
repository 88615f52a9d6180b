"""The snapshot script (contract, NOSCRIPT, a flood of changes it must never see half-done) and
the comparison of a snapshot with the ledger, which must catch each kind of disagreement."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import asyncpg
import pytest
from redis.asyncio import Redis

from engine import inventory
from engine.invariants import (
    OrderSnapshot,
    counter_violations,
    ledger_agrees,
    redis_snapshot,
    snapshot_violations,
)
from engine.keys import sale_keys
from engine.scripts import SCRIPTS
from tests.conftest import SaleFactory
from tests.test_scripts import snapshot as every_key
from tests.test_workers import flood
from workers.outbox import drain_sale


async def test_snapshot_contract(redis: Redis, redis_sale: SaleFactory):
    assert await redis_snapshot(redis, "nope", []) is None
    sale = await redis_sale(stock=10, per_user_limit=4, per_order_max=2)
    empty = await redis_snapshot(redis, sale.id, [])
    assert empty is not None
    assert (empty.available, empty.held, empty.sold, empty.withdrawn, empty.initial) == (
        10,
        0,
        0,
        0,
        10,
    )
    assert (empty.outbox_length, empty.orders, empty.absent) == (0, {}, frozenset())

    kept = await inventory.reserve(redis, sale.id, "alice", 2, "k1")
    paid = await inventory.reserve(redis, sale.id, "bob", 1, "k1")
    gone = await inventory.reserve(redis, sale.id, "carol", 2, "k1")
    await inventory.attach_payment(redis, sale.id, paid.order_id, "pi_1", "secret", 1500, "usd")
    await inventory.confirm(redis, sale.id, paid.order_id, "pi_1")
    await inventory.refund(redis, sale.id, paid.order_id, "request")  # withdrawn, not restocked
    await inventory.release(redis, sale.id, gone.order_id, "cancelled")
    unknown = f"{sale.id}.00000000000000ff"

    before = await every_key(redis)
    ids = [kept.order_id, paid.order_id, gone.order_id, unknown, kept.order_id]
    snap = await redis_snapshot(redis, sale.id, ids)
    assert await every_key(redis) == before  # read-only
    assert snap is not None
    assert (snap.available, snap.held, snap.sold, snap.withdrawn, snap.initial) == (7, 2, 0, 1, 10)
    assert snap.outbox_length == await redis.xlen(sale_keys(sale.id).outbox) == 7
    assert snap.orders == {
        kept.order_id: OrderSnapshot("reserved", 1, 2, "alice"),
        paid.order_id: OrderSnapshot("refund_pending", 4, 1, "bob"),
        gone.order_id: OrderSnapshot("cancelled", 2, 2, "carol"),
    }
    assert snap.absent == {unknown}
    assert counter_violations(snap) == []

    keys = sale_keys(sale.id)
    with pytest.raises(ValueError, match="3 keys \\+ 1 per item"):
        await SCRIPTS["snapshot"](redis, [keys.sale, keys.stock], [])


async def test_snapshot_reloads_after_script_flush(redis: Redis, redis_sale: SaleFactory):
    sale = await redis_sale(stock=3)
    await redis.script_flush()
    snap = await redis_snapshot(redis, sale.id, [])
    assert snap is not None and snap.available == 3
    assert await redis.script_exists(SCRIPTS["snapshot"].sha) == [True]


async def test_snapshots_taken_during_a_flood_of_changes_always_add_up(
    redis: Redis, redis_sale: SaleFactory
):
    """Cancels, payments and refunds race the snapshots: each one sees every order and every
    counter as of the same instant (separate reads would catch a change half-way)."""
    sale = await redis_sale(stock=1000, per_user_limit=2, per_order_max=2)
    orders = sorted(await flood(redis, sale.id, 600, 600))
    assert len(orders) == 600

    async def change(i: int, order_id: str) -> None:
        if i % 3 == 0:
            await inventory.release(redis, sale.id, order_id, "cancelled")
            return
        await inventory.attach_payment(redis, sale.id, order_id, f"pi_{i}", "s", 1500, "usd")
        await inventory.confirm(redis, sale.id, order_id, f"pi_{i}")
        if i % 3 == 1:
            await inventory.refund(redis, sale.id, order_id, "request", restock=i % 2 == 0)

    changes = asyncio.gather(*(change(i, oid) for i, oid in enumerate(orders)))
    seen = []
    while not changes.done():
        snap = await redis_snapshot(redis, sale.id, orders)
        assert snap is not None
        assert counter_violations(snap) == [], snap
        seen.append((snap.held, snap.sold, snap.withdrawn))
    await changes
    assert len(set(seen)) > 3, "no snapshot was taken while the changes ran"
    last = await redis_snapshot(redis, sale.id, orders)
    assert last is not None and counter_violations(last) == []
    assert last.held == 0 and last.sold > 0 and last.withdrawn > 0


async def test_the_ledger_comparison_catches_each_disagreement(
    redis: Redis, db: asyncpg.Pool, ledger_sale: SaleFactory
):
    sale = await ledger_sale(stock=100, per_user_limit=2, per_order_max=2)
    accepted = await flood(redis, sale.id, 80, 40)
    await inventory.release(redis, sale.id, min(accepted), "cancelled")
    with pytest.raises(TimeoutError):  # nothing drains the outbox
        await ledger_agrees(redis, db, sale.id, accepted, timeout_s=0.2)
    await drain_sale(redis, db, sale.id, "c", batch=100, claim_idle_ms=60_000)
    snap, violations = await ledger_agrees(redis, db, sale.id, accepted, timeout_s=5)
    assert violations == []
    assert snap.orders.keys() == accepted

    # The ledger is only compared on the orders it lists: an order nobody asked about is found
    # through the ledger itself.
    _, violations = await ledger_agrees(redis, db, sale.id, [], timeout_s=5)
    assert violations == []

    first, second = sorted(accepted)[:2]
    await db.execute("UPDATE orders SET state = 'paid' WHERE id = $1", second)
    _, violations = await ledger_agrees(redis, db, sale.id, accepted, timeout_s=5)
    assert violations == [
        f"1 ledger orders disagree with Redis, e.g. {second}: ledger"
        f" ('paid', 1, '{snap.orders[second].user}', {snap.orders[second].quantity}),"
        f" Redis {snap.orders[second]}"
    ]
    await db.execute("DELETE FROM order_events WHERE order_id = $1", first)
    await db.execute("DELETE FROM orders WHERE id = $1", first)
    lost = f"{sale.id}.00000000000000ee"
    await redis.hincrby(sale_keys(sale.id).sale, "held", 1)
    _, violations = await ledger_agrees(redis, db, sale.id, [*accepted, lost], timeout_s=5)
    assert violations[:3] == [
        f"1 listed orders are missing from Redis, e.g. {lost}",
        f"1 orders in Redis are not in the ledger, e.g. {first}",
        f"1 ledger orders disagree with Redis, e.g. {second}: ledger"
        f" ('paid', 1, '{snap.orders[second].user}', {snap.orders[second].quantity}),"
        f" Redis {snap.orders[second]}",
    ]
    assert violations[3].endswith(f"!= initial {snap.initial}")
    assert violations[4].startswith("orders in 'reserved' hold")
    assert len(violations) == 5

    # A snapshot of part of the sale, or before the ledger caught up, says so.
    part = replace(snap, outbox_length=2, orders={})
    ledger = {first: ("reserved", 1, "u", 1)}
    assert snapshot_violations(part, ledger)[:2] == [
        "2 outbox entries are not in the ledger yet",
        f"1 ledger orders were not in the snapshot, e.g. {first}",
    ]
