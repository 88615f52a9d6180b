"""Workers: the outbox drain into Postgres and hold expiry, in-process and as real processes, and
the cron table that names every job."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import pytest
from redis.asyncio import Redis

from engine import inventory
from engine.errors import Conflict
from engine.invariants import audit_sale, ledger_agrees, outbox_backlog, wait_for_ledger
from engine.keys import LIVE_SALES, OUTBOX_GROUP, sale_keys
from engine.ledger import OrderChange, entry_changes, write_changes
from engine.mockgateway import MockGateway
from engine.scripts import SCRIPTS
from engine.settings import Settings
from localrun.demo import start_process
from tests.conftest import CountingGateway, SaleFactory
from workers.context import each_sale
from workers.deliveries import DISPATCHER, Dispatcher
from workers.heartbeats import HEALTH, WorkerHealth
from workers.holds import expire_sale
from workers.outbox import drain_sale
from workers.settings import WorkerSettings


async def flood(redis: Redis, sale_id: str, calls: int, shoppers: int) -> set[str]:
    async def one(i: int) -> str | None:
        try:
            hold = await inventory.reserve(redis, sale_id, f"u{i % shoppers}", 1 + i % 2, f"k{i}")
        except Conflict:
            return None
        return hold.order_id

    return {o for o in await asyncio.gather(*(one(i) for i in range(calls))) if o}


async def test_drain_after_a_flood_makes_the_ledger_exact(
    redis: Redis, db: asyncpg.Pool, ledger_sale: SaleFactory
):
    sale = await ledger_sale(stock=300, per_user_limit=2, per_order_max=2)
    accepted = await flood(redis, sale.id, 3000, 1500)
    cancelled = sorted(accepted)[:40]
    for order_id in cancelled:
        await inventory.release(redis, sale.id, order_id, "cancelled")

    written = await drain_sale(redis, db, sale.id, "c1", batch=250, claim_idle_ms=60_000)
    assert written == len(accepted) + len(cancelled)
    audit = await audit_sale(redis, db, sale.id, accepted)
    assert audit.ok, audit.violations
    assert audit.orders_in_ledger == len(accepted)
    assert audit.states == {"reserved": len(accepted) - 40, "cancelled": 40}
    events = await db.fetchval("SELECT count(*) FROM order_events")
    assert events == len(accepted) + len(cancelled)
    assert await redis.xlen(sale_keys(sale.id).outbox) == 0  # acknowledged and deleted

    assert await drain_sale(redis, db, sale.id, "c1", batch=250, claim_idle_ms=60_000) == 0


async def test_an_older_change_never_overwrites_a_newer_one(
    redis: Redis, db: asyncpg.Pool, ledger_sale: SaleFactory
):
    sale = await ledger_sale()
    hold = await inventory.reserve(redis, sale.id, "alice", 1, "k1")
    await inventory.release(redis, sale.id, hold.order_id, "cancelled")
    entries = [fields for _, fields in await redis.xrange(sale_keys(sale.id).outbox)]
    newest, oldest = (c for f in reversed(entries) for c in entry_changes(f))
    await write_changes(db, sale.id, [newest])
    await write_changes(db, sale.id, [oldest])  # a redelivery, late and out of order
    await write_changes(db, sale.id, [oldest, newest, oldest])  # duplicates inside one batch
    row = await db.fetchrow("SELECT state, version FROM orders WHERE id = $1", hold.order_id)
    assert (row["state"], row["version"]) == ("cancelled", 2)
    assert await db.fetchval("SELECT count(*) FROM order_events") == 2
    try:
        await db.execute("UPDATE orders SET version = 1 WHERE id = $1", hold.order_id)
    except asyncpg.CheckViolationError:
        pass
    else:
        raise AssertionError("the ledger let a version go backwards")


ORDER_ROW = (
    "SELECT o.id, o.sale_id, o.user_id, o.quantity, o.state, o.version, o.idempotency_key,"
    " o.created_at, o.expires_at, o.updated_at, o.payment_intent_id, p.amount, p.currency,"
    " p.order_state, p.order_version,"
    " (SELECT array_agg((e.version, e.state, e.at) ORDER BY e.version)"
    "  FROM order_events e WHERE e.order_id = o.id) AS events"
    " FROM orders o LEFT JOIN payments p ON p.intent_id = o.payment_intent_id WHERE o.id = $1"
)


def at(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


async def test_the_ledger_keeps_every_value_of_every_change(
    redis: Redis, db: asyncpg.Pool, ledger_sale: SaleFactory
):
    sale = await ledger_sale()
    hold = await inventory.reserve(redis, sale.id, "al.ice+1@example.com", 2, "Key_1.a:b-c")
    await inventory.attach_payment(redis, sale.id, hold.order_id, "pi_3Xy_z", "s", 3000, "usd")
    entries = await redis.xrange(sale_keys(sale.id).outbox)
    reserved, attached = (OrderChange.from_entry(sale.id, f) for _, f in entries)
    assert (reserved.version, reserved.intent_id, reserved.amount) == (1, "", 0)
    assert (attached.version, attached.intent_id, attached.amount) == (2, "pi_3Xy_z", 3000)
    unpaid = replace(attached, version=1, at_ms=reserved.at_ms, intent_id="", amount=0, currency="")
    assert unpaid == reserved  # the same order: only what attaching a payment changes differs
    assert await drain_sale(redis, db, sale.id, "c", batch=10, claim_idle_ms=60_000) == 2
    row = await db.fetchrow(ORDER_ROW, hold.order_id)
    assert tuple(row.values()) == (
        hold.order_id,
        sale.id,
        "al.ice+1@example.com",
        2,
        "reserved",
        2,
        "Key_1.a:b-c",
        at(hold.created_ms),
        at(hold.expires_ms),
        at(attached.at_ms),
        "pi_3Xy_z",
        3000,
        "usd",
        "reserved",
        2,
        [(1, "reserved", at(hold.created_ms)), (2, "reserved", at(attached.at_ms))],
    )


async def test_entries_written_before_packing_are_still_delivered(
    redis: Redis, db: asyncpg.Pool, ledger_sale: SaleFactory
):
    """An upgrade can find entries of the old shape (a field per value) in a stream."""
    sale = await ledger_sale()
    order_id, t = f"{sale.id}.00000000000000aa", 1_700_000_000_000
    order = {"order": order_id, "user": "bob", "qty": 1, "created_ms": t, "expires_ms": t + 600}
    outbox = sale_keys(sale.id).outbox
    # As reserve wrote it, then as emit did (payment fields included).
    await redis.xadd(outbox, order | {"state": "reserved", "version": 1, "at_ms": t, "idem": "k9"})
    paid = {"state": "paid", "version": 2, "at_ms": t + 1, "idem": "k9", "pi": "pi_9"}
    await redis.xadd(outbox, order | paid | {"amount": 1500, "currency": "usd"})
    assert await drain_sale(redis, db, sale.id, "c", batch=10, claim_idle_ms=60_000) == 2
    row = await db.fetchrow(ORDER_ROW, order_id)
    assert tuple(row.values()) == (
        order_id,
        sale.id,
        "bob",
        1,
        "paid",
        2,
        "k9",
        at(t),
        at(t + 600),
        at(t + 1),
        "pi_9",
        1500,
        "usd",
        "paid",
        2,
        [(1, "reserved", at(t)), (2, "paid", at(t + 1))],
    )


async def test_entries_of_a_dead_consumer_are_claimed_once(
    redis: Redis, db: asyncpg.Pool, ledger_sale: SaleFactory
):
    sale = await ledger_sale(stock=500)
    accepted = await flood(redis, sale.id, 400, 400)
    outbox = sale_keys(sale.id).outbox
    # A consumer reads a batch, commits it, and dies before XACK: the worst moment.
    reply = await redis.xreadgroup(OUTBOX_GROUP, "dead", {outbox: ">"}, count=150)
    read = reply[0][1]
    await write_changes(db, sale.id, [c for _, f in read for c in entry_changes(f)])

    written = await drain_sale(redis, db, sale.id, "alive", batch=100, claim_idle_ms=60_000)
    assert written == len(accepted) - 150  # not claimable yet: the dead one may be slow
    await asyncio.sleep(0.25)
    written = await drain_sale(redis, db, sale.id, "alive", batch=100, claim_idle_ms=200)
    assert written == 150
    assert await outbox_backlog(redis, sale.id) == 0
    audit = await audit_sale(redis, db, sale.id, accepted)
    assert audit.ok, audit.violations
    assert await db.fetchval("SELECT count(*) FROM order_events") == len(accepted)


async def test_expiry_releases_due_holds_only(
    redis: Redis, db: asyncpg.Pool, ledger_sale: SaleFactory
):
    short = await ledger_sale(stock=100, hold_seconds=1)
    long = await ledger_sale(stock=100, hold_seconds=600)
    short_orders = await flood(redis, short.id, 60, 60)
    long_orders = await flood(redis, long.id, 60, 60)
    assert await expire_sale(redis, short.id) == 0
    await asyncio.sleep(1.1)
    assert await expire_sale(redis, short.id) == len(short_orders)
    assert await expire_sale(redis, long.id) == 0
    assert await expire_sale(redis, short.id) == 0
    assert await redis.get(sale_keys(short.id).stock) == "100"
    for sale, accepted in ((short, short_orders), (long, long_orders)):
        await drain_sale(redis, db, sale.id, "c", batch=100, claim_idle_ms=60_000)
        audit = await audit_sale(redis, db, sale.id, accepted)
        assert audit.ok, audit.violations
    assert (await audit_sale(redis, db, short.id)).states == {"expired": len(short_orders)}


def start_worker(settings: Settings, log: Path) -> subprocess.Popen[bytes]:
    # Only the drain: the payment jobs would bump versions while the test audits.
    return start_process(["worker", "--jobs", "drain_outboxes"], settings, log)


async def test_sigkill_mid_drain_loses_and_duplicates_nothing(
    redis: Redis, db: asyncpg.Pool, ledger_sale: SaleFactory, settings: Settings, tmp_path: Path
):
    sale = await ledger_sale(stock=30_000, per_user_limit=2, per_order_max=2)
    accepted = await flood(redis, sale.id, 12_000, 6_000)
    total = len(accepted)
    # Small batches make the drain take long enough to be killed in the middle of it.
    worker_settings = replace(settings, drain_batch=50, claim_idle_ms=500)
    log = tmp_path / "worker.log"
    kills = 0
    proc = start_worker(worker_settings, log)
    try:
        for target in (total // 4, total // 2, (3 * total) // 4):
            deadline = time.monotonic() + 60
            while await db.fetchval("SELECT count(*) FROM orders") < target:
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline, "worker made no progress"
                await asyncio.sleep(0.005)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
            in_ledger = await db.fetchval("SELECT count(*) FROM orders")
            assert in_ledger < total, "killed too late to prove anything"
            proc = start_worker(worker_settings, log)
        await wait_for_ledger(redis, sale.id, timeout_s=60)
    finally:
        proc.kill()
        proc.wait()
    assert kills == 3
    audit = await audit_sale(redis, db, sale.id, accepted)
    assert audit.ok, audit.violations
    assert audit.orders_in_ledger == total
    # The same, from one atomic read of Redis: counters and every order as of one instant.
    snapshot, violations = await ledger_agrees(redis, db, sale.id, accepted, timeout_s=10)
    assert violations == []
    assert snapshot.orders.keys() == accepted
    # Every version of every order recorded exactly once: none missing, none twice.
    gaps = await db.fetchval(
        "SELECT count(*) FROM orders o WHERE o.version <> "
        "(SELECT count(DISTINCT version) FROM order_events e WHERE e.order_id = o.id)"
    )
    assert gaps == 0


async def test_ack_script_contract_and_reload(redis: Redis, redis_sale: SaleFactory):
    """ack-1: acknowledges and deletes exactly the ids given (more than one unpack slice),
    leaves the rest pending, and reloads itself after SCRIPT FLUSH."""
    sale = await redis_sale(stock=2000, per_user_limit=1, per_order_max=2)
    outbox = sale_keys(sale.id).outbox
    await flood(redis, sale.id, 1200, 1200)
    reply = await redis.xreadgroup(OUTBOX_GROUP, "c", {outbox: ">"}, count=1200)
    ids = [entry_id for entry_id, _ in reply[0][1]]
    assert len(ids) == 600  # 1 + i % 2 units, limit 1: every other call is refused
    await redis.script_flush()
    done = await SCRIPTS["ack"](redis, [outbox], [OUTBOX_GROUP, ",".join(ids[:550])])
    assert done == [1, 550]
    assert await redis.xlen(outbox) == 50
    pending = await redis.xpending(outbox, OUTBOX_GROUP)
    assert pending["pending"] == 50
    again = await SCRIPTS["ack"](redis, [outbox], [OUTBOX_GROUP, ",".join(ids[:550])])
    assert again == [1, 0]  # acknowledging twice changes nothing


async def test_one_failing_sale_does_not_stop_the_others(
    redis: Redis, caplog: pytest.LogCaptureFixture
):
    await redis.sadd(LIVE_SALES, "a-sale", "b-sale", "c-sale")

    async def work(sale_id: str) -> int:
        if sale_id == "b-sale":
            raise RuntimeError("the gateway said no")
        return 10

    ctx = {"store": redis, HEALTH: WorkerHealth()}
    assert await each_sale(ctx, "test job", work) == 20
    assert "test job for sale b-sale failed" in caplog.text
    # The next tick fails the same way: counted, not logged again.
    logged = len(caplog.records)
    assert await each_sale(ctx, "test job", work) == 20
    assert len(caplog.records) == logged


async def test_every_job_on_2000_unpaid_holds_calls_the_gateway_for_none(
    redis: Redis, db: asyncpg.Pool, ledger_sale: SaleFactory, settings: Settings
):
    """No job looks at holds nobody asked to pay for: with 2,000 live holds and no /pay, a run
    of every job in the cron table asks the gateway nothing about any order."""
    sale = await ledger_sale(stock=5000, per_user_limit=1, per_order_max=1)
    placed = await inventory.reserve_many(
        redis, sale.id, [(f"u{i}", 1, f"k{i}") for i in range(2000)]
    )
    assert await redis.zcard(sale_keys(sale.id).holds) == len(placed) == 2000
    gateway = CountingGateway(MockGateway(redis))
    health = WorkerHealth()
    ctx = {
        "store": redis,
        "drain_store": redis,
        "db": db,
        "drain_db": db,
        "gateway": gateway,
        "settings": settings,
        "consumer": "t",
        HEALTH: health,
        DISPATCHER: Dispatcher(settings, db),
    }
    for job in WorkerSettings.cron_jobs:
        await job.coroutine(ctx)
    await ctx[DISPATCHER].aclose()
    # Every job ran to its end: a job that failed would also have made no gateway call.
    assert set(health.ran) == {job.name.removeprefix("cron:") for job in WorkerSettings.cron_jobs}
    assert not [name for name, outage in health.jobs.items() if outage.since is not None]
    assert health.stores.since is None
    # Reconcile asks what changed at the gateway since its cursor: one page, whatever the holds.
    assert gateway.calls == {"event_page": 1}


def test_the_cron_table_runs_each_job_from_its_family_module():
    # `flashsale worker --jobs` and the bench pick jobs by these names.
    jobs = {job.name.removeprefix("cron:"): job.coroutine for job in WorkerSettings.cron_jobs}
    assert len(WorkerSettings.cron_jobs) == len(jobs)  # no name twice
    assert {name: coroutine.__module__ for name, coroutine in jobs.items()} == {
        "drain_outboxes": "workers.outbox",
        "expire_holds": "workers.holds",
        "refunds": "workers.payments",
        "webhook_retries": "workers.webhooks",
        "reconcile_sales": "workers.reconcile",
        "deliver_events": "workers.deliveries",
        "retire_sales": "workers.retire",
    }
