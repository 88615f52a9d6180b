"""Contract, NOSCRIPT and flood tests of every Lua script, against a real Redis."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from typing import Any

import pytest
from redis.asyncio import Redis

from engine import inventory
from engine.db import connect_redis
from engine.errors import Conflict, NotFound, ProblemError, SaleClosed, Unprocessable
from engine.keys import LIVE_SALES, OUTBOX_GROUP, sale_keys
from engine.ledger import OrderChange
from engine.scripts import SCRIPTS, Code
from engine.settings import Settings
from tests.conftest import SaleFactory


async def snapshot(redis: Redis) -> dict[str, Any]:
    """Every key and its full content: two equal snapshots mean nothing was written."""
    state: dict[str, Any] = {}
    async for key in redis.scan_iter(count=1000):
        kind = await redis.type(key)
        if kind == "string":
            state[key] = await redis.get(key)
        elif kind == "hash":
            state[key] = await redis.hgetall(key)
        elif kind == "zset":
            state[key] = await redis.zrange(key, 0, -1, withscores=True)
        elif kind == "set":
            state[key] = sorted(await redis.smembers(key))
        elif kind == "stream":
            state[key] = await redis.xrange(key)
    return state


async def refused(redis: Redis, call: Any, error: type[ProblemError], code: str) -> ProblemError:
    before = await snapshot(redis)
    with pytest.raises(error) as caught:
        await call
    assert caught.value.code == code
    assert await snapshot(redis) == before, "a refused call wrote something"
    return caught.value


# --- reserve: one test per result code -------------------------------------------------------


async def test_reserve_ok_takes_stock_and_writes_everything(redis: Redis, redis_sale: SaleFactory):
    sale = await redis_sale(stock=10, hold_seconds=300)
    keys = sale_keys(sale.id)
    hold = await inventory.reserve(redis, sale.id, "alice", 2, "k1")
    assert not hold.replayed and hold.quantity == 2
    assert hold.expires_ms - hold.created_ms == 300_000
    assert await redis.get(keys.stock) == "8"
    assert await redis.hget(keys.users, "alice") == "2"
    assert await redis.hget(keys.sale, "held") == "2"
    assert await redis.zscore(keys.holds, hold.order_id) == hold.expires_ms
    order = await inventory.read_order(redis, sale.id, hold.order_id)
    assert order is not None
    assert (order["user"], order["qty"], order["state"], order["version"]) == (
        "alice",
        "2",
        "reserved",
        "1",
    )
    [(_, entry)] = await redis.xrange(keys.outbox)
    assert OrderChange.from_entry(sale.id, entry) == OrderChange(
        order_id=hold.order_id,
        sale_id=sale.id,
        user_id="alice",
        quantity=2,
        state="reserved",
        version=1,
        idempotency_key="k1",
        created_ms=hold.created_ms,
        expires_ms=hold.expires_ms,
        at_ms=hold.created_ms,
    )


async def test_reserve_replay_answers_first_answer_and_writes_nothing(
    redis: Redis, redis_sale: SaleFactory
):
    sale = await redis_sale()
    first = await inventory.reserve(redis, sale.id, "alice", 1, "k1")
    before = await snapshot(redis)
    again = await inventory.reserve(redis, sale.id, "alice", 1, "k1")
    assert again.replayed and again.order_id == first.order_id
    assert again.expires_ms == first.expires_ms
    assert await snapshot(redis) == before


async def test_reserve_replay_is_per_user(redis: Redis, redis_sale: SaleFactory):
    sale = await redis_sale()
    a = await inventory.reserve(redis, sale.id, "alice", 1, "same-key")
    b = await inventory.reserve(redis, sale.id, "bob", 1, "same-key")
    assert a.order_id != b.order_id and not b.replayed


async def test_reserve_key_reused_with_other_body(redis: Redis, redis_sale: SaleFactory):
    sale = await redis_sale()
    await inventory.reserve(redis, sale.id, "alice", 1, "k1")
    call = inventory.reserve(redis, sale.id, "alice", 2, "k1")
    await refused(redis, call, Unprocessable, "idempotency-key-reused")


async def test_reserve_sale_not_found(redis: Redis):
    call = inventory.reserve(redis, "nope", "alice", 1, "k1")
    await refused(redis, call, NotFound, "sale-not-found")


async def test_reserve_sale_not_started(redis: Redis, redis_sale: SaleFactory):
    sale = await redis_sale(start_ms=10**13, end_ms=10**13 + 1000)
    error = await refused(
        redis, inventory.reserve(redis, sale.id, "a", 1, "k"), SaleClosed, "sale-not-started"
    )
    assert error.status_code == 425


async def test_reserve_sale_ended_by_time_and_by_close(redis: Redis, redis_sale: SaleFactory):
    sale = await redis_sale(start_ms=1000, end_ms=2000)
    error = await refused(
        redis, inventory.reserve(redis, sale.id, "a", 1, "k"), SaleClosed, "sale-ended"
    )
    assert error.status_code == 410
    other = await redis_sale()
    await inventory.set_status(redis, other.id, "closed")
    await refused(redis, inventory.reserve(redis, other.id, "a", 1, "k"), SaleClosed, "sale-ended")


async def test_reserve_sale_paused(redis: Redis, redis_sale: SaleFactory):
    sale = await redis_sale()
    await inventory.set_status(redis, sale.id, "paused")
    error = await refused(
        redis, inventory.reserve(redis, sale.id, "a", 1, "k"), SaleClosed, "sale-paused"
    )
    assert error.status_code == 403


async def test_reserve_invalid_quantity(redis: Redis, redis_sale: SaleFactory):
    sale = await redis_sale()
    for quantity in (0, -1):
        call = inventory.reserve(redis, sale.id, "a", quantity, "k")
        await refused(redis, call, Unprocessable, "invalid-quantity")


async def test_reserve_quantity_exceeds_maximum(redis: Redis, redis_sale: SaleFactory):
    sale = await redis_sale(per_user_limit=5, per_order_max=3)
    call = inventory.reserve(redis, sale.id, "a", 4, "k")
    error = await refused(redis, call, Unprocessable, "quantity-exceeds-maximum")
    assert error.extra["maximum"] == 3


async def test_reserve_limit_exceeded_counts_live_holds(redis: Redis, redis_sale: SaleFactory):
    sale = await redis_sale(per_user_limit=2)
    await inventory.reserve(redis, sale.id, "alice", 1, "k1")
    await inventory.reserve(redis, sale.id, "alice", 1, "k2")
    error = await refused(
        redis, inventory.reserve(redis, sale.id, "alice", 1, "k3"), Conflict, "limit-exceeded"
    )
    assert error.extra == {"limit": 2, "already_held": 2}


async def test_reserve_limit_frees_up_after_release(redis: Redis, redis_sale: SaleFactory):
    sale = await redis_sale(per_user_limit=1)
    hold = await inventory.reserve(redis, sale.id, "alice", 1, "k1")
    await inventory.release(redis, sale.id, hold.order_id, "cancelled", "alice")
    again = await inventory.reserve(redis, sale.id, "alice", 1, "k2")
    assert not again.replayed


async def test_reserve_sold_out(redis: Redis, redis_sale: SaleFactory):
    sale = await redis_sale(stock=1, per_user_limit=5, per_order_max=5)
    call = inventory.reserve(redis, sale.id, "a", 2, "k")
    error = await refused(redis, call, Conflict, "sold-out")
    assert error.extra["available"] == 1


async def test_reserve_refuses_to_overwrite_a_taken_order_id(redis: Redis, redis_sale: SaleFactory):
    sale = await redis_sale()
    hold = await inventory.reserve(redis, sale.id, "alice", 1, "k1")
    keys = sale_keys(sale.id)
    before = await snapshot(redis)
    reply = await SCRIPTS["reserve"](
        redis,
        [
            keys.sale,
            keys.stock,
            keys.users,
            keys.holds,
            keys.outbox,
            keys.order(hold.order_id),
            keys.idempotency("bob", "k9"),
        ],
        [60, hold.order_id, "bob", 1, 1, "k9"],
    )
    assert reply == [[Code.ORDER_ID_TAKEN]]
    assert await snapshot(redis) == before


# --- release ---------------------------------------------------------------------------------


async def test_release_contract(redis: Redis, redis_sale: SaleFactory):
    sale = await redis_sale(stock=5, hold_seconds=600)
    keys = sale_keys(sale.id)
    hold = await inventory.reserve(redis, sale.id, "alice", 2, "k1")

    before = await snapshot(redis)
    not_due = await inventory.release(redis, sale.id, hold.order_id, "expired")
    assert not_due.code is Code.NOT_DUE
    with pytest.raises(NotFound):
        await inventory.release(redis, sale.id, hold.order_id, "cancelled", "mallory")
    with pytest.raises(NotFound):
        await inventory.release(redis, sale.id, sale.id + ".0000000000000000", "cancelled")
    with pytest.raises(ValueError):
        await inventory.release(redis, sale.id, hold.order_id, "paid")
    assert await snapshot(redis) == before

    done = await inventory.release(redis, sale.id, hold.order_id, "cancelled", "alice")
    assert (done.code, done.state, done.version) == (Code.OK, "cancelled", 2)
    assert await redis.get(keys.stock) == "5"
    assert await redis.hget(keys.users, "alice") == "0"  # stays listed as a past buyer
    assert await redis.hget(keys.sale, "held") == "0"
    assert await redis.zcard(keys.holds) == 0

    before = await snapshot(redis)
    again = await inventory.release(redis, sale.id, hold.order_id, "expired")
    assert (again.code, again.state, again.version) == (Code.ALREADY_FINAL, "cancelled", 2)
    assert await snapshot(redis) == before


# --- load_sale and set_status ----------------------------------------------------------------


async def test_load_sale_twice_keeps_live_counters(redis: Redis, redis_sale: SaleFactory):
    sale = await redis_sale(stock=10)
    keys = sale_keys(sale.id)
    groups = await redis.xinfo_groups(keys.outbox)
    assert [g["name"] for g in groups] == [OUTBOX_GROUP]
    await inventory.reserve(redis, sale.id, "alice", 2, "k1")
    assert await inventory.load_sale(redis, sale) is Code.UPDATED
    assert await redis.get(keys.stock) == "8"
    assert await redis.hget(keys.sale, "held") == "2"


async def test_set_status_contract(redis: Redis, redis_sale: SaleFactory):
    sale = await redis_sale()
    assert await inventory.set_status(redis, sale.id, "paused") == "open"
    assert await inventory.set_status(redis, sale.id, "open") == "paused"
    assert await inventory.set_status(redis, sale.id, "closed") == "open"
    with pytest.raises(Conflict):
        await inventory.set_status(redis, sale.id, "open")
    with pytest.raises(NotFound):
        await inventory.set_status(redis, "nope", "open")
    reply = await SCRIPTS["set_status"](redis, [sale_keys(sale.id).sale], ["bogus"])
    assert reply == [Code.INVALID_STATE]


# --- NOSCRIPT --------------------------------------------------------------------------------


async def test_every_script_reloads_after_script_flush(redis: Redis, redis_sale: SaleFactory):
    sale = await redis_sale()
    await redis.script_flush()
    await inventory.set_status(redis, sale.id, "open")
    await redis.script_flush()
    assert await inventory.load_sale(redis, sale) is Code.UPDATED
    await redis.script_flush()
    hold = await inventory.reserve(redis, sale.id, "alice", 1, "k1")
    await redis.script_flush()
    result = await inventory.release(redis, sale.id, hold.order_id, "cancelled")
    assert result.code is Code.OK
    # Only the script called since the last flush is back: each reloads itself, on demand.
    assert await redis.script_exists(*(s.sha for s in SCRIPTS.values())) == [
        name == "release" for name in SCRIPTS
    ]


# --- floods ----------------------------------------------------------------------------------


async def test_flood_of_reserves_never_oversells(
    redis: Redis, redis_sale: SaleFactory, settings: Settings
):
    sale = await redis_sale(stock=100, per_user_limit=2, per_order_max=2)
    keys = sale_keys(sale.id)
    rng = random.Random(1)
    shoppers = [f"u{i}" for i in range(2000)]
    calls = [(rng.choice(shoppers), rng.choice((1, 2)), f"k{i}") for i in range(5000)]
    stock_seen: list[int] = []
    done = asyncio.Event()

    # Its own connection, so its reads interleave with the flood instead of queueing behind it.
    watcher_client = connect_redis(settings, pool_size=1)

    async def watch_stock() -> None:
        while not done.is_set():
            stock_seen.append(int(await watcher_client.get(keys.stock)))

    async def attempt(user: str, quantity: int, key: str) -> tuple[str, int] | str:
        try:
            hold = await inventory.reserve(redis, sale.id, user, quantity, key)
        except Conflict as exc:
            return exc.code
        return (user, hold.quantity)

    watcher = asyncio.create_task(watch_stock())
    outcomes = await asyncio.gather(*(attempt(*call) for call in calls))
    done.set()
    await watcher
    await watcher_client.aclose()

    holds = [o for o in outcomes if isinstance(o, tuple)]
    assert sum(q for _, q in holds) == 100
    per_user = Counter()
    for user, quantity in holds:
        per_user[user] += quantity
    assert max(per_user.values()) <= 2
    assert await redis.get(keys.stock) == "0"
    assert await redis.hget(keys.sale, "held") == "100"
    assert {u: int(n) for u, n in (await redis.hgetall(keys.users)).items()} == dict(per_user)
    assert await redis.xlen(keys.outbox) == len(holds)
    assert min(stock_seen) >= 0 and len(stock_seen) > 10
    rejected = Counter(o for o in outcomes if isinstance(o, str))
    assert set(rejected) <= {"sold-out", "limit-exceeded"}
    assert rejected["sold-out"] > 0


async def test_flood_of_replays_makes_one_order(redis: Redis, redis_sale: SaleFactory):
    sale = await redis_sale(stock=50)
    keys = sale_keys(sale.id)
    holds = await asyncio.gather(
        *(inventory.reserve(redis, sale.id, "alice", 2, "the-key") for _ in range(1000))
    )
    assert len({h.order_id for h in holds}) == 1
    assert sum(1 for h in holds if not h.replayed) == 1
    assert await redis.get(keys.stock) == "48"
    assert await redis.xlen(keys.outbox) == 1
    assert len([k async for k in redis.scan_iter(match=keys.order("*"))]) == 1


async def test_interleaved_cancel_and_expire_return_each_unit_once(
    redis: Redis, redis_sale: SaleFactory
):
    sale = await redis_sale(stock=400, per_user_limit=2, per_order_max=2, hold_seconds=1)
    keys = sale_keys(sale.id)
    holds = await asyncio.gather(
        *(inventory.reserve(redis, sale.id, f"u{i}", 1 + i % 2, f"k{i}") for i in range(250))
    )
    taken = sum(h.quantity for h in holds)
    assert await redis.get(keys.stock) == str(400 - taken)
    await asyncio.sleep(1.05)  # every hold is now due
    calls = []
    for i, hold in enumerate(holds):
        calls += [inventory.release(redis, sale.id, hold.order_id, "expired") for _ in range(5)]
        calls += [
            inventory.release(redis, sale.id, hold.order_id, "cancelled", f"u{i}") for _ in range(5)
        ]
    random.Random(2).shuffle(calls)
    results = await asyncio.gather(*calls)

    assert sum(1 for r in results if r.code is Code.OK) == len(holds)
    assert await redis.get(keys.stock) == "400"
    assert await redis.hget(keys.sale, "held") == "0"
    assert set((await redis.hgetall(keys.users)).values()) == {"0"}
    assert await redis.zcard(keys.holds) == 0
    changes = [OrderChange.from_entry(sale.id, e) for _, e in await redis.xrange(keys.outbox)]
    releases = Counter(c.order_id for c in changes if c.version == 2)
    assert set(releases.values()) == {1} and len(releases) == len(holds)
    assert await redis.sismember(LIVE_SALES, sale.id) == 0  # loaded straight, not via the CLI
