"""Reconcile from a cursor: only what changed at the gateway since the sale's cursor is read and
compared, in pages; the full sweep still finds what the cursor has passed."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import stripe
from redis.asyncio import Redis

from engine import inventory
from engine.keys import mock_intent, sale_keys
from engine.mockgateway import MockGateway
from engine.payments import StripeGateway, events_since
from engine.reconcile import CURSOR_OVERLAP_S, reconcile
from engine.settings import Settings
from tests.conftest import CountingGateway, SaleFactory, flashsale
from tests.test_payment_jobs import holds_with_intents
from workers.outbox import drain_sale


def kinds(report: object) -> list[str]:
    return sorted(d.kind for d in report.differences)  # type: ignore[attr-defined]


async def test_the_cursor_moves_on_and_the_full_sweep_still_finds_what_it_passed(
    redis: Redis, db: asyncpg.Pool, ledger_sale: SaleFactory
):
    sale = await ledger_sale(stock=10)
    mock = MockGateway(redis)
    orders = await holds_with_intents(redis, mock, sale.id, 3)
    [(paid, paid_intent), (quiet, quiet_intent), (kept, _)] = orders
    await drain_sale(redis, db, sale.id, "c", batch=100, claim_idle_ms=60_000)
    counting = CountingGateway(mock)
    cursor = sale_keys(sale.id).reconciled

    before = int(time.time())
    assert (await reconcile(redis, db, counting, sale.id, full=False)).differences == []
    first = int(await redis.get(cursor))
    assert before <= first <= time.time()

    # Paid at the gateway; the webhook never came.
    await mock.settle(paid_intent, succeeded=True)
    found = await reconcile(redis, db, counting, sale.id, full=False)
    assert kinds(found) == ["missed-webhook", "paid-at-gateway-not-here"]
    assert {d.order_id for d in found.differences} == {paid}
    await reconcile(redis, db, counting, sale.id, full=False, repair=True)
    assert (await inventory.read_order(redis, sale.id, paid))["state"] == "paid"
    await drain_sale(redis, db, sale.id, "c", batch=100, claim_idle_ms=60_000)
    assert (await reconcile(redis, db, counting, sale.id, full=False)).differences == []
    assert int(await redis.get(cursor)) >= first
    # Each sweep read one page of events and asked about no order one by one.
    assert set(counting.calls) == {"event_page"}

    # Differences that no gateway event names: paid at the gateway without an event, and a
    # ledger row changed behind Redis's back. Since the cursor nothing changed; the full
    # sweep finds both.
    await redis.hset(mock_intent(quiet_intent), "status", "succeeded")
    await db.execute("UPDATE orders SET state = 'expired', version = 9 WHERE id = $1", kept)
    assert (await reconcile(redis, db, counting, sale.id, full=False)).differences == []
    full = await reconcile(redis, db, counting, sale.id, full=True)
    assert [(d.kind, d.order_id) for d in sorted(full.differences, key=lambda d: d.kind)] == [
        ("paid-at-gateway-not-here", quiet),
        ("state-mismatch", kept),
    ]


async def test_events_older_than_the_cursor_are_not_read_again(
    redis: Redis, db: asyncpg.Pool, ledger_sale: SaleFactory
):
    sale = await ledger_sale(stock=10)
    mock = MockGateway(redis)
    [(order_id, intent_id)] = await holds_with_intents(redis, mock, sale.id, 1)
    await mock.settle(intent_id, succeeded=True)
    await drain_sale(redis, db, sale.id, "c", batch=100, claim_idle_ms=60_000)
    # A cursor past the event (and the overlap): nothing since then to compare.
    await redis.set(sale_keys(sale.id).reconciled, int(time.time()) + CURSOR_OVERLAP_S + 2)
    assert (await reconcile(redis, db, mock, sale.id, full=False)).differences == []
    assert (await inventory.read_order(redis, sale.id, order_id))["state"] == "reserved"
    # Without a cursor the sweep starts three days back, and finds it.
    await redis.delete(sale_keys(sale.id).reconciled)
    found = await reconcile(redis, db, mock, sale.id, full=False)
    assert kinds(found) == ["missed-webhook", "paid-at-gateway-not-here"]


async def test_250_changes_are_read_in_three_pages(
    redis: Redis, db: asyncpg.Pool, ledger_sale: SaleFactory
):
    sale = await ledger_sale(stock=300, per_user_limit=1, per_order_max=1)
    mock = MockGateway(redis)
    orders = await holds_with_intents(redis, mock, sale.id, 250)
    for _, intent_id in orders:
        await mock.settle(intent_id, succeeded=True)
    await drain_sale(redis, db, sale.id, "c", batch=1000, claim_idle_ms=60_000)
    counting = CountingGateway(mock)
    report = await reconcile(redis, db, counting, sale.id, full=False, repair=True)
    assert counting.calls == {"event_page": 3}
    # The webhooks received late wrote to the outbox: the ledger is compared next time.
    assert kinds(report) == ["missed-webhook"] * 250 + ["outbox-backlog"]
    paid = [(await inventory.read_order(redis, sale.id, o))["state"] for o, _ in orders]
    assert paid == ["paid"] * 250


async def test_stripe_event_pages_cover_every_event_once(
    gateway: StripeGateway,
    sdk: stripe.StripeClient,
):
    """Against localstripe: 150 events since a moment ago, read in pages of 100."""
    since = int(time.time())
    made = {sdk.v1.customers.create({"email": f"c{i}@example.com"}).id for i in range(150)}
    seen: list[str] = []
    pages = 0
    async for page in events_since(gateway, since):
        pages += 1
        seen += [e["data"]["object"]["id"] for e in page if e["type"] == "customer.created"]
    assert pages >= 2
    assert len(seen) == len(set(seen))
    assert made <= set(seen)


async def test_the_command_compares_since_the_cursor_unless_full(
    settings: Settings, redis: Redis, db: asyncpg.Pool, ledger_sale: SaleFactory
):
    sale = await ledger_sale(stock=5)
    [(order_id, intent_id)] = await holds_with_intents(redis, MockGateway(redis), sale.id, 1)
    await drain_sale(redis, db, sale.id, "c", batch=100, claim_idle_ms=60_000)
    await redis.hset(mock_intent(intent_id), "status", "succeeded")  # no event: a quiet change
    since = await asyncio.to_thread(flashsale, settings, "reconcile", "--sale", sale.id)
    assert since.returncode == 0, since.stdout + since.stderr
    full = await asyncio.to_thread(flashsale, settings, "reconcile", "--sale", sale.id, "--full")
    assert full.returncode == 1 and "paid-at-gateway-not-here" in full.stdout
    assert order_id in full.stdout


async def test_a_success_stands_over_a_failure_of_the_same_second(
    redis: Redis, db: asyncpg.Pool, ledger_sale: SaleFactory
):
    """A card declined, then another accepted: whichever order the events list in, the
    intent succeeded."""
    sale = await ledger_sale(stock=5)
    mock = MockGateway(redis)
    [(order_id, intent_id)] = await holds_with_intents(redis, mock, sale.id, 1)
    await mock.settle(intent_id, succeeded=False)
    await mock.settle(intent_id, succeeded=True)
    await drain_sale(redis, db, sale.id, "c", batch=100, claim_idle_ms=60_000)
    report = await reconcile(redis, db, mock, sale.id, full=False)
    paid = [d for d in report.differences if d.kind == "paid-at-gateway-not-here"]
    assert [d.order_id for d in paid] == [order_id]
