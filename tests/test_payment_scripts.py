"""Contract, NOSCRIPT and flood tests of confirm, refund and attach_payment (real Redis)."""

from __future__ import annotations

import asyncio
import random
import subprocess
from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime

import asyncpg
import pytest
from redis.asyncio import Redis

from engine import inventory
from engine.errors import Conflict, NotFound
from engine.invariants import audit_sale
from engine.keys import LIVE_SALES, OUTBOX_GROUP, sale_keys
from engine.mockgateway import MockGateway
from engine.reconcile import reconcile
from engine.scripts import SCRIPTS, Code
from engine.settings import Settings
from tests.conftest import SaleFactory, flashsale
from tests.test_scripts import snapshot
from workers.outbox import drain_sale


async def unchanged(redis: Redis, call: object) -> object:
    """The call wrote nothing of its sale. Its wrapper may still put the sale on the live set
    (``inventory.keep_live``, after every call that finds the order): membership, no change."""
    before = await snapshot(redis)
    result = await call  # type: ignore[misc]
    after = await snapshot(redis)
    after.pop(LIVE_SALES, None)
    before.pop(LIVE_SALES, None)
    assert after == before, "a refused call wrote something"
    return result


async def test_confirm_contract(redis: Redis, redis_sale: SaleFactory):
    sale = await redis_sale(stock=3, per_user_limit=2)
    keys = sale_keys(sale.id)
    hold = await inventory.reserve(redis, sale.id, "alice", 2, "k1")
    await inventory.attach_payment(redis, sale.id, hold.order_id, "pi_1", "sec", 3000, "usd")

    with pytest.raises(NotFound):
        await unchanged(
            redis, inventory.confirm(redis, sale.id, sale.id + ".00000000000000aa", "pi_1")
        )
    mismatch = await unchanged(redis, inventory.confirm(redis, sale.id, hold.order_id, "pi_2"))
    assert mismatch.code is Code.PAYMENT_MISMATCH

    paid = await inventory.confirm(redis, sale.id, hold.order_id, "pi_1", 5_000)
    assert (paid.code, paid.state, paid.version) == (Code.OK, "paid", 3)
    assert await redis.hmget(keys.sale, "held", "sold") == ["0", "2"]
    assert await redis.zcard(keys.holds) == 0
    assert await redis.hget(keys.users, "alice") == "2"  # paid units still count

    again = await unchanged(redis, inventory.confirm(redis, sale.id, hold.order_id, "pi_1", 6_000))
    assert (again.code, again.state) == (Code.ALREADY_FINAL, "paid")
    stale = await unchanged(redis, inventory.confirm(redis, sale.id, hold.order_id, "pi_1", 4_000))
    assert stale.code is Code.STALE


async def test_confirm_after_release_re_reserves_or_asks_for_refund(
    redis: Redis, redis_sale: SaleFactory
):
    sale = await redis_sale(stock=2, per_user_limit=1, per_order_max=1)
    keys = sale_keys(sale.id)
    a = await inventory.reserve(redis, sale.id, "alice", 1, "k")
    b = await inventory.reserve(redis, sale.id, "bob", 1, "k")
    await inventory.release(redis, sale.id, a.order_id, "cancelled")
    await inventory.release(redis, sale.id, b.order_id, "failed")
    # alice bought the one unit again meanwhile: over her limit, so her late money goes back.
    await inventory.reserve(redis, sale.id, "alice", 1, "k2")

    late = await inventory.confirm(redis, sale.id, b.order_id, "pi_b")
    assert (late.code, late.state) == (Code.RE_RESERVED, "paid")
    refused = await inventory.confirm(redis, sale.id, a.order_id, "pi_a")
    assert (refused.code, refused.state) == (Code.REFUND_PENDING, "refund_pending")
    assert await redis.zrange(keys.refunds, 0, -1) == [a.order_id]
    assert await redis.get(keys.stock) == "0"
    assert await redis.hmget(keys.sale, "held", "sold") == ["1", "1"]


async def test_refund_contract(redis: Redis, redis_sale: SaleFactory):
    sale = await redis_sale(stock=4)
    keys = sale_keys(sale.id)
    hold = await inventory.reserve(redis, sale.id, "alice", 2, "k1")
    with pytest.raises(Conflict):
        await unchanged(redis, inventory.refund(redis, sale.id, hold.order_id, "request"))
    with pytest.raises(NotFound):
        await inventory.refund(redis, sale.id, sale.id + ".00000000000000aa", "request")
    await inventory.confirm(redis, sale.id, hold.order_id, "pi_1")
    with pytest.raises(Conflict):
        await unchanged(redis, inventory.refund(redis, sale.id, hold.order_id, "complete"))

    asked = await inventory.refund(redis, sale.id, hold.order_id, "request", restock=False)
    assert (asked.code, asked.state) == (Code.OK, "refund_pending")
    assert await redis.hmget(keys.sale, "sold", "withdrawn") == ["0", "2"]
    assert await redis.get(keys.stock) == "2"  # withdrawn, not back on sale
    assert await redis.hget(keys.users, "alice") == "0"  # stays listed as a past buyer
    twice = await unchanged(redis, inventory.refund(redis, sale.id, hold.order_id, "request"))
    assert twice.code is Code.ALREADY_FINAL

    done = await inventory.refund(redis, sale.id, hold.order_id, "complete", refund_id="re_1")
    assert (done.code, done.state) == (Code.OK, "refunded")
    assert await redis.zcard(keys.refunds) == 0
    assert (
        await unchanged(
            redis, inventory.refund(redis, sale.id, hold.order_id, "complete", refund_id="re_2")
        )
    ).code is Code.ALREADY_FINAL
    reply = await SCRIPTS["refund"](
        redis,
        inventory._order_keys(sale.id, hold.order_id, keys.refunds),
        [hold.order_id, "bogus", 0, ""],
    )
    assert reply[0] == Code.INVALID_STATE


async def test_refund_with_restock_puts_units_back(redis: Redis, redis_sale: SaleFactory):
    sale = await redis_sale(stock=4)
    hold = await inventory.reserve(redis, sale.id, "alice", 2, "k1")
    await inventory.confirm(redis, sale.id, hold.order_id, "pi_1")
    await inventory.refund(redis, sale.id, hold.order_id, "request", restock=True)
    assert await redis.get(sale_keys(sale.id).stock) == "4"


async def test_attach_payment_contract(redis: Redis, redis_sale: SaleFactory):
    sale = await redis_sale()
    hold = await inventory.reserve(redis, sale.id, "alice", 1, "k1")
    with pytest.raises(NotFound):
        await inventory.attach_payment(
            redis, sale.id, sale.id + ".00000000000000aa", "pi", "s", 1, "usd"
        )
    first = await inventory.attach_payment(redis, sale.id, hold.order_id, "pi_1", "s1", 1500, "usd")
    second = await unchanged(
        redis, inventory.attach_payment(redis, sale.id, hold.order_id, "pi_2", "s2", 1500, "usd")
    )
    assert first == second == ("pi_1", "s1")


async def test_attach_moves_the_hold_to_the_intent_index_and_release_takes_it_out(
    redis: Redis, redis_sale: SaleFactory
):
    sale = await redis_sale()
    keys = sale_keys(sale.id)
    paying = (await inventory.reserve(redis, sale.id, "alice", 1, "k")).order_id
    cancelling = (await inventory.reserve(redis, sale.id, "bob", 1, "k")).order_id
    plain = await inventory.reserve(redis, sale.id, "carol", 1, "k")
    for i, order_id in enumerate((paying, cancelling)):
        await inventory.attach_payment(redis, sale.id, order_id, f"pi_{i}", "s", 1, "usd")
    assert await redis.zrange(keys.holds, 0, -1) == [plain.order_id]
    with_intent = dict(await redis.zrange(keys.intent_holds, 0, -1, withscores=True))
    assert set(with_intent) == {paying, cancelling}
    order = await inventory.read_order(redis, sale.id, paying)
    assert with_intent[paying] == int(order["expires_ms"])  # scored by the hold's expiry

    await inventory.confirm(redis, sale.id, paying, order["pi"])
    await inventory.release(redis, sale.id, cancelling, "cancelled")
    assert await redis.zcard(keys.intent_holds) == 0
    assert await redis.zrange(keys.voids, 0, -1) == [cancelling]


async def test_payment_scripts_reload_after_script_flush(redis: Redis, redis_sale: SaleFactory):
    sale = await redis_sale()
    hold = await inventory.reserve(redis, sale.id, "alice", 1, "k1")
    await redis.script_flush()
    await inventory.attach_payment(redis, sale.id, hold.order_id, "pi_1", "s", 1, "usd")
    await redis.script_flush()
    assert (await inventory.confirm(redis, sale.id, hold.order_id, "pi_1")).code is Code.OK
    await redis.script_flush()
    result = await inventory.refund(redis, sale.id, hold.order_id, "request")
    assert result.state == "refund_pending"


async def test_flood_of_payments_racing_expiry_and_cancels(
    redis: Redis, db: asyncpg.Pool, ledger_sale: SaleFactory
):
    """Each order gets confirms (duplicated), cancels and expiries at once: exactly one outcome
    each, and the counters add up."""
    sale = await ledger_sale(stock=300, per_user_limit=2, per_order_max=2, hold_seconds=1)
    keys = sale_keys(sale.id)
    holds = await asyncio.gather(
        *(inventory.reserve(redis, sale.id, f"u{i}", 1 + i % 2, f"k{i}") for i in range(200))
    )
    await asyncio.gather(
        *(
            inventory.attach_payment(redis, sale.id, h.order_id, f"pi_{i}", "s", 100, "usd")
            for i, h in enumerate(holds)
        )
    )
    await asyncio.sleep(1.05)
    calls = []
    for i, hold in enumerate(holds):
        if i % 2 == 0:
            calls += [inventory.confirm(redis, sale.id, hold.order_id, f"pi_{i}") for _ in range(4)]
        calls += [inventory.release(redis, sale.id, hold.order_id, "expired") for _ in range(3)]
        calls += [inventory.release(redis, sale.id, hold.order_id, "cancelled") for _ in range(3)]
    random.Random(3).shuffle(calls)
    await asyncio.gather(*calls)
    states = Counter()
    units = Counter()
    for hold in holds:
        order = await inventory.read_order(redis, sale.id, hold.order_id)
        states[order["state"]] += 1
        units[order["state"]] += hold.quantity
    sold, held = (int(x) for x in await redis.hmget(keys.sale, "sold", "held"))
    assert held == 0 and sold == units["paid"]
    assert int(await redis.get(keys.stock)) == 300 - sold
    assert states["reserved"] == 0
    assert sum(states.values()) == 200
    await drain_sale(redis, db, sale.id, "c", batch=500, claim_idle_ms=60_000)
    audit = await audit_sale(redis, db, sale.id, {h.order_id for h in holds})
    assert audit.ok, audit.violations


async def test_reconcile_command_exit_codes(
    settings: Settings, redis: Redis, db: asyncpg.Pool, ledger_sale: SaleFactory
):
    sale = await ledger_sale(stock=5)

    def run(*args: str, settings: Settings = settings) -> subprocess.CompletedProcess[str]:
        return flashsale(settings, "reconcile", *args)

    hold = await inventory.reserve(redis, sale.id, "alice", 1, "k1")
    mock = MockGateway(redis)
    intent = await mock.create_intent(hold.order_id, sale.id, sale.price, sale.currency)
    await inventory.attach_payment(redis, sale.id, hold.order_id, intent.id, "s", 1, "usd")
    await drain_sale(redis, db, sale.id, "c", batch=100, claim_idle_ms=60_000)
    clean = await asyncio.to_thread(run, "--sale", sale.id)
    assert clean.returncode == 0, clean.stdout + clean.stderr

    await mock.settle(intent.id, succeeded=True)  # paid at the gateway, webhook lost
    found = await asyncio.to_thread(run, "--sale", sale.id)
    assert found.returncode == 1 and "paid-at-gateway-not-here" in found.stdout
    fixed = await asyncio.to_thread(run, "--sale", sale.id, "--repair")
    assert fixed.returncode == 1 and "repaired" in fixed.stdout
    assert (await inventory.read_order(redis, sale.id, hold.order_id))["state"] == "paid"
    await drain_sale(redis, db, sale.id, "c", batch=100, claim_idle_ms=60_000)
    assert (await asyncio.to_thread(run, "--sale", sale.id)).returncode == 0

    unreachable = replace(settings, redis_url="redis://127.0.0.1:1/0")
    broken = await asyncio.to_thread(run, "--sale", sale.id, settings=unreachable)
    assert broken.returncode == 2


async def test_no_payment_is_attached_to_an_ended_hold(redis: Redis, redis_sale: SaleFactory):
    sale = await redis_sale()
    hold = await inventory.reserve(redis, sale.id, "alice", 1, "k1")
    await inventory.release(redis, sale.id, hold.order_id, "cancelled")
    with pytest.raises(Conflict) as refused:
        await unchanged(
            redis, inventory.attach_payment(redis, sale.id, hold.order_id, "pi_1", "s", 1, "usd")
        )
    assert refused.value.code == "order-not-payable"


async def test_reloading_a_sale_never_reopens_or_moves_it(redis: Redis, redis_sale: SaleFactory):
    sale = await redis_sale()
    await inventory.set_status(redis, sale.id, "closed")
    moved = replace(sale, start_ms=sale.start_ms + 5, end_ms=sale.end_ms + 5, name="Renamed")
    assert await inventory.load_sale(redis, moved) is Code.UPDATED
    fields = await redis.hmget(sale_keys(sale.id).sale, "status", "start_ms", "end_ms", "name")
    assert fields == ["closed", str(sale.start_ms), str(sale.end_ms), "Renamed"]


async def test_reconcile_repairs_the_ledger_with_every_value_of_the_order(
    redis: Redis, db: asyncpg.Pool, ledger_sale: SaleFactory
):
    sale = await ledger_sale()
    gateway = MockGateway(redis)
    lost = await inventory.reserve(redis, sale.id, "alice", 2, "k1")
    paying = await gateway.create_intent(lost.order_id, sale.id, 3000, "usd")
    await inventory.attach_payment(redis, sale.id, lost.order_id, paying.id, "s", 3000, "usd")
    stale = await inventory.reserve(redis, sale.id, "bob", 1, "k2")
    await drain_sale(redis, db, sale.id, "c", batch=100, claim_idle_ms=60_000)
    rows = (
        "SELECT o.*, p.amount, p.currency, p.order_state, p.order_version"
        " FROM orders o LEFT JOIN payments p ON p.intent_id = o.payment_intent_id"
    )
    drained = {r["id"]: dict(r) for r in await db.fetch(rows)}
    # The ledger loses one order, and the other's last change is acknowledged but never written.
    await db.execute("DELETE FROM orders WHERE id = $1", lost.order_id)
    late = await gateway.create_intent(stale.order_id, sale.id, 1500, "usd")
    await inventory.attach_payment(redis, sale.id, stale.order_id, late.id, "s", 1500, "usd")
    outbox = sale_keys(sale.id).outbox
    [[_, [(entry_id, _)]]] = await redis.xreadgroup(OUTBOX_GROUP, "c", {outbox: ">"})
    await SCRIPTS["ack"](redis, [outbox], [OUTBOX_GROUP, entry_id])

    report = await reconcile(redis, db, gateway, sale.id, repair=True)
    assert sorted(d.kind for d in report.differences) == ["missing-in-ledger", "state-mismatch"]
    repaired = {r["id"]: dict(r) for r in await db.fetch(rows)}
    assert repaired[lost.order_id] == drained[lost.order_id]
    order = await inventory.read_order(redis, sale.id, stale.order_id)
    assert order is not None
    assert repaired[stale.order_id] == drained[stale.order_id] | {
        "version": 2,
        "updated_at": datetime.fromtimestamp(int(order["updated_ms"]) / 1000, UTC),
        "payment_intent_id": late.id,
        "amount": 1500,
        "currency": "usd",
        "order_state": "reserved",
        "order_version": 2,
    }
    assert (await reconcile(redis, db, gateway, sale.id)).differences == []


async def test_the_ledger_payment_row_follows_a_release(
    redis: Redis, db: asyncpg.Pool, ledger_sale: SaleFactory
):
    sale = await ledger_sale()
    hold = await inventory.reserve(redis, sale.id, "alice", 1, "k1")
    await inventory.attach_payment(redis, sale.id, hold.order_id, "pi_1", "s", 1500, "usd")
    await inventory.release(redis, sale.id, hold.order_id, "cancelled")
    await drain_sale(redis, db, sale.id, "c", batch=100, claim_idle_ms=60_000)
    row = await db.fetchrow("SELECT order_state, order_version FROM payments")
    assert tuple(row.values()) == ("cancelled", 3)
