"""Retiring finished sales (``lua/retire_sale-7.lua``, ``workers.retire``): a sale leaves the
live set the workers walk only once it is over and has nothing left to do, and whatever gives it
work again puts it back, also when the two race."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from typing import Any

import asyncpg
from redis.asyncio import Redis

from engine import inventory
from engine.inventory import SaleDefinition
from engine.keys import LIVE_SALES, sale_keys
from engine.restock import restock
from engine.sales import live_sale_ids, retire_sale
from engine.scripts import SCRIPTS, Code
from engine.settings import Settings
from tests.conftest import SaleFactory
from workers.heartbeats import HEALTH, WorkerHealth
from workers.outbox import drain_sale
from workers.retire import retire_sales


async def _drain(redis: Redis, db: asyncpg.Pool, sale_id: str) -> None:
    await drain_sale(redis, db, sale_id, "c1", batch=1000, claim_idle_ms=60_000)


async def _end(redis: Redis, sale: SaleDefinition, ago_s: float = 1) -> None:
    """Move the sale's end into the past (the scripts read it from the sale hash)."""
    past_ms = int((time.time() - ago_s) * 1000)
    await redis.hset(sale_keys(sale.id).sale, "end_ms", past_ms)


async def _live(redis: Redis, sale_id: str) -> bool:
    return bool(await redis.sismember(LIVE_SALES, sale_id))


async def test_a_sale_is_retired_only_when_over_and_quiet(
    redis: Redis, db: asyncpg.Pool, ledger_sale: SaleFactory
):
    sale = await ledger_sale(stock=10)
    hold = await inventory.reserve(redis, sale.id, "alice", 1, "k1")
    # Open: not due, whatever the grace.
    assert not await retire_sale(redis, sale.id, 0)
    await _end(redis, sale, ago_s=10)
    # Over, but inside its grace.
    assert not await retire_sale(redis, sale.id, 3600)
    keys = sale_keys(sale.id)
    retire = SCRIPTS["retire_sale"]
    work = [keys.holds, keys.intent_holds, keys.refunds, keys.voids, keys.outbox]
    assert await retire(redis, [keys.sale, *work, LIVE_SALES], [sale.id, 3600_000]) == [
        Code.NOT_DUE
    ]
    # Past the grace, but a hold is live and its change is not in the ledger yet.
    assert not await retire_sale(redis, sale.id, 0)
    await inventory.release(redis, sale.id, hold.order_id, "cancelled")
    assert not await retire_sale(redis, sale.id, 0)  # the release is still in the outbox
    await _drain(redis, db, sale.id)
    assert await retire_sale(redis, sale.id, 0)
    assert sale.id not in await live_sale_ids(redis)
    # A sale Redis does not have is never "retired".
    assert await retire(redis, [sale_keys("s-gone").sale, *work, LIVE_SALES], ["s-gone", 0]) == [
        Code.SALE_NOT_FOUND
    ]


async def test_a_late_payment_or_a_restock_puts_a_retired_sale_back(
    redis: Redis, db: asyncpg.Pool, ledger_sale: SaleFactory, settings: Settings
):
    sale = await ledger_sale(stock=1, per_user_limit=1, per_order_max=1, hold_seconds=1)
    hold = await inventory.reserve(redis, sale.id, "alice", 1, "k1")
    await inventory.attach_payment(redis, sale.id, hold.order_id, "pi_late", "s", 1500, "usd")
    await asyncio.sleep(1.05)  # a hold expires only once it is due
    await inventory.release(redis, sale.id, hold.order_id, "expired")
    await inventory.reserve(redis, sale.id, "bob", 1, "k2")  # takes the unit back
    bob = (await redis.zrange(sale_keys(sale.id).holds, 0, -1))[0]
    await inventory.release(redis, sale.id, bob, "cancelled")
    await redis.set(sale_keys(sale.id).stock, 0)  # no unit left for a late payment
    await _end(redis, sale)
    await _drain(redis, db, sale.id)
    now = replace(settings, retire_after_s=0)
    ctx: dict[str, Any] = {"store": redis, "settings": now, HEALTH: WorkerHealth()}
    assert await retire_sales(ctx) == 1
    assert not await _live(redis, sale.id)

    # Alice's payment arrives after all: no unit left, so a refund is owed, and the sale is
    # live again for the refunds job (and its change for the drain).
    late = await inventory.confirm(redis, sale.id, hold.order_id, "pi_late")
    assert late.state == "refund_pending"
    assert await _live(redis, sale.id)
    assert await redis.zcard(sale_keys(sale.id).refunds) == 1
    assert await retire_sales(ctx) == 0  # work is owed: it stays

    await inventory.refund(redis, sale.id, hold.order_id, "complete", refund_id="re_1")
    await _drain(redis, db, sale.id)
    assert await retire_sales(ctx) == 1
    await restock(redis, sale.id, 5, "admin-token")
    assert await _live(redis, sale.id)  # its restock entry must reach the ledger


async def test_retiring_racing_late_payments_never_strands_work(
    redis: Redis, db: asyncpg.Pool, ledger_sale: SaleFactory
):
    """Late payments (each a confirm, then the sale put back) and retire calls at once: after
    any interleaving, a sale with work owed or changes unwritten is live."""
    orders = 60
    sale = await ledger_sale(stock=orders, per_user_limit=1, per_order_max=1, hold_seconds=1)
    ids = []
    for i in range(orders):
        hold = await inventory.reserve(redis, sale.id, f"u{i}", 1, f"k{i}")
        await inventory.attach_payment(redis, sale.id, hold.order_id, f"pi_{i}", "s", 1, "usd")
        ids.append(hold.order_id)
    await asyncio.sleep(1.05)  # a hold expires only once it is due
    for order_id in ids:
        await inventory.release(redis, sale.id, order_id, "expired")
    await redis.set(sale_keys(sale.id).stock, orders // 2)  # half can be re-reserved
    await _end(redis, sale)
    await _drain(redis, db, sale.id)

    retired = 0

    async def pay(i: int) -> None:
        await asyncio.sleep(0.002 + 0.001 * (i % 7))
        await inventory.confirm(redis, sale.id, ids[i], f"pi_{i}")

    async def retire(i: int) -> None:
        nonlocal retired
        await asyncio.sleep(0.001 * (i % 9))
        retired += await retire_sale(redis, sale.id, 0)

    await asyncio.gather(*(retire(i) for i in range(orders)), *(pay(i) for i in range(orders)))
    assert retired >= 1  # it was retired before payments came: they had to put it back
    keys = sale_keys(sale.id)
    owed = await redis.zcard(keys.refunds)
    assert owed == orders // 2  # the other half were re-reserved and paid
    assert await redis.xlen(keys.outbox) > 0
    assert await _live(redis, sale.id)
