"""A live sale's figures as ``engine.salestats`` reads them from a real Redis, through every state
change that moves one: holds, payment, refund, cancel with an intent owed, expiry due, the
ledger's drain."""

from __future__ import annotations

import asyncio

import asyncpg
from redis.asyncio import Redis

from engine import inventory
from engine.db import redis_ms
from engine.keys import LIVE_SALES
from engine.salestats import all_sale_stats, sale_stats
from tests.conftest import SaleFactory
from workers.outbox import drain_sale


async def test_a_fresh_sale_shows_its_stock_and_nothing_owed(
    redis: Redis, ledger_sale: SaleFactory
):
    sale = await ledger_sale(stock=10, price=2500)
    stats = await sale_stats(redis, sale.id)
    assert stats is not None
    counts = (stats.initial, stats.available, stats.held, stats.sold, stats.taken)
    assert counts == (10, 10, 0, 0, 0)
    assert (stats.holds, stats.holds_due, stats.outbox_length, stats.ledger_lag_ms) == (0, 0, 0, 0)
    assert (stats.refunds_owed, stats.cancels_owed) == (0, 0)
    assert (stats.status, stats.phase, stats.price, stats.currency) == ("open", "open", 2500, "usd")
    assert abs(stats.now_ms - await redis_ms(redis)) < 1000


async def test_every_state_change_moves_the_figures(
    redis: Redis, db: asyncpg.Pool, ledger_sale: SaleFactory
):
    sale = await ledger_sale(stock=10, per_user_limit=2, per_order_max=2)
    a = await inventory.reserve(redis, sale.id, "ann", 2, "k1")
    b = await inventory.reserve(redis, sale.id, "bob", 1, "k1")
    c = await inventory.reserve(redis, sale.id, "cid", 1, "k1")
    await asyncio.sleep(0.25)
    held = await sale_stats(redis, sale.id)
    assert held is not None
    assert (held.available, held.held, held.sold, held.taken, held.holds) == (6, 4, 0, 4, 3)
    assert held.outbox_length >= 1
    # The oldest change waiting for the ledger is at least as old as the pause above.
    assert 250 <= held.ledger_lag_ms < 10_000

    # ann pays; bob gets an intent, then cancels: its intent is owed a cancel at the gateway.
    await inventory.attach_payment(redis, sale.id, a.order_id, "pi_a", "secret_a", 3000, "usd")
    await inventory.confirm(redis, sale.id, a.order_id, "pi_a")
    await inventory.attach_payment(redis, sale.id, b.order_id, "pi_b", "secret_b", 1500, "usd")
    await inventory.release(redis, sale.id, b.order_id, "cancelled")
    moved = await sale_stats(redis, sale.id)
    assert moved is not None
    assert (moved.available, moved.held, moved.sold, moved.taken, moved.holds) == (7, 1, 2, 3, 1)
    assert (moved.refunds_owed, moved.cancels_owed) == (0, 1)

    # ann's order is refunded without restock: the units are withdrawn, the refund owed.
    await inventory.refund(redis, sale.id, a.order_id, "request")
    refunded = await sale_stats(redis, sale.id)
    assert refunded is not None
    assert (refunded.sold, refunded.withdrawn, refunded.taken) == (0, 2, 3)
    assert refunded.refunds_owed == 1

    # cid's payment fails at the gateway: the hold ends, and it counts as a failed payment,
    # once, however often the failure arrives. A hold failed for another reason (its intent
    # cancelled at the gateway) is no failed payment.
    assert refunded.payments_failed == 0
    for _ in range(2):
        await inventory.release(redis, sale.id, c.order_id, "failed", payment_failed=True)
    d = await inventory.reserve(redis, sale.id, "dan", 1, "k1")
    await inventory.release(redis, sale.id, d.order_id, "failed")
    failed = await sale_stats(redis, sale.id)
    assert failed is not None and (failed.payments_failed, failed.held) == (1, 0)

    # The ledger catches up: nothing waits in the outbox, so there is no lag.
    await drain_sale(redis, db, sale.id, "c", batch=100, claim_idle_ms=60_000)
    drained = await sale_stats(redis, sale.id)
    assert drained is not None
    assert (drained.outbox_length, drained.outbox_pending, drained.ledger_lag_ms) == (0, 0, 0)
    assert drained.held == 0


async def test_holds_past_their_expiry_are_due(redis: Redis, ledger_sale: SaleFactory):
    sale = await ledger_sale(stock=5, hold_seconds=1)
    await inventory.reserve(redis, sale.id, "ann", 1, "k1")
    stats = await sale_stats(redis, sale.id)
    assert stats is not None and (stats.holds, stats.holds_due) == (1, 0)
    await asyncio.sleep(1.1)
    stats = await sale_stats(redis, sale.id)
    assert stats is not None and (stats.holds, stats.holds_due) == (1, 1)


async def test_the_phase_says_what_a_shopper_meets(redis: Redis, ledger_sale: SaleFactory):
    now = await redis_ms(redis)
    upcoming = await ledger_sale(start_ms=now + 60_000, end_ms=now + 120_000)
    ended = await ledger_sale(start_ms=now - 120_000, end_ms=now - 60_000)
    paused = await ledger_sale(status="paused")
    phases = {s.sale_id: s.phase for s in (await all_sale_stats(redis))[1]}
    assert phases == {upcoming.id: "upcoming", ended.id: "ended", paused.id: "paused"}


async def test_every_live_sale_is_listed_and_a_vanished_one_is_left_out(
    redis: Redis, ledger_sale: SaleFactory
):
    first, second = await ledger_sale(), await ledger_sale()
    await redis.sadd(LIVE_SALES, "gone-by-hand")
    now_ms, stats = await all_sale_stats(redis)
    assert [s.sale_id for s in stats] == sorted([first.id, second.id])
    assert all(s.now_ms == now_ms for s in stats)
    assert await sale_stats(redis, "gone-by-hand") is None
