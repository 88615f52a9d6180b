"""The reserve script's batches and the server's coalescing of orders (engine.http.coalescer),
against a real Redis: a batch answers each order as if it ran alone, in order."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError, ResponseError

from engine import inventory
from engine.errors import Conflict, ProblemError
from engine.http import coalescer as reservations_module
from engine.http.coalescer import Reservations
from engine.http.pipeline import PipelinedRedis
from engine.inventory import MAX_BATCH, Hold, Order
from engine.keys import OUTBOX_GROUP, sale_keys
from engine.ledger import OrderChange, entry_changes, ledger_orders, write_changes
from engine.scripts import SCRIPTS
from engine.settings import Settings
from tests.conftest import SaleFactory
from tests.test_scripts import snapshot
from workers.outbox import drain_sale


@pytest.fixture
async def store(settings: Settings, redis: Redis) -> AsyncIterator[PipelinedRedis]:
    client = PipelinedRedis(settings.redis_url)
    yield client
    await client.aclose()


def shape(outcome: Hold | ProblemError) -> tuple[Any, ...]:
    """What a shopper sees of an outcome, without the order id and times."""
    if isinstance(outcome, ProblemError):
        return ("error", outcome.code, tuple(sorted(outcome.extra.items())))
    return ("hold", outcome.quantity, outcome.replayed)


async def outbox_changes(redis: Redis, sale_id: str) -> list[OrderChange]:
    entries = await redis.xrange(sale_keys(sale_id).outbox)
    return [c for _, fields in entries for c in OrderChange.all_from_entry(sale_id, fields)]


async def sale_state(redis: Redis, sale_id: str) -> dict[str, Any]:
    """Counts, and the outbox's changes without their order ids and times."""
    keys = sale_keys(sale_id)
    changes = await outbox_changes(redis, sale_id)
    return {
        "stock": await redis.get(keys.stock),
        "held": await redis.hget(keys.sale, "held"),
        "users": await redis.hgetall(keys.users),
        "holds": await redis.zcard(keys.holds),
        "outbox": [(c.user_id, c.quantity, c.state, c.idempotency_key) for c in changes],
    }


async def test_batch_decides_each_order_as_if_alone_in_order(redis: Redis, redis_sale: SaleFactory):
    sale = await redis_sale(stock=5, per_user_limit=3, per_order_max=3)
    orders: list[Order] = [
        ("alice", 2, "a1"),  # ok: stock 3 left
        ("alice", 2, "a1"),  # replay inside the batch: the first answer
        ("alice", 1, "a1"),  # same key, other body
        ("alice", 2, "a2"),  # 2 + 2 > 3
        ("alice", 0, "a3"),  # invalid quantity
        ("bob", 4, "b1"),  # above the per-order maximum
        ("bob", 3, "b2"),  # ok: stock 0 left
        ("carol", 1, "c1"),  # sold out
    ]
    outcomes = await inventory.reserve_many(redis, sale.id, orders)
    assert [shape(o) for o in outcomes] == [
        ("hold", 2, False),
        ("hold", 2, True),
        ("error", "idempotency-key-reused", ()),
        ("error", "limit-exceeded", (("already_held", 2), ("limit", 3))),
        ("error", "invalid-quantity", ()),
        ("error", "quantity-exceeds-maximum", (("maximum", 3),)),
        ("hold", 3, False),
        ("error", "sold-out", (("available", 0),)),
    ]
    first, replay = outcomes[0], outcomes[1]
    assert isinstance(first, Hold) and isinstance(replay, Hold)
    assert replay.order_id == first.order_id and replay.expires_ms == first.expires_ms
    state = await sale_state(redis, sale.id)
    assert state == {
        "stock": "0",
        "held": "5",
        "users": {"alice": "2", "bob": "3"},
        "holds": 2,
        "outbox": [("alice", 2, "reserved", "a1"), ("bob", 3, "reserved", "b2")],
    }
    # Both new orders in ONE outbox entry, with the times and ids the shoppers were given.
    [(_, fields)] = await redis.xrange(sale_keys(sale.id).outbox)
    changes = OrderChange.all_from_entry(sale.id, fields)
    bob = outcomes[6]
    assert isinstance(bob, Hold)
    assert [(c.order_id, c.created_ms, c.expires_ms) for c in changes] == [
        (first.order_id, first.created_ms, first.expires_ms),
        (bob.order_id, bob.created_ms, bob.expires_ms),
    ]
    # The replay inside the batch is a replay afterwards too, with the same answer.
    again = await inventory.reserve(redis, sale.id, "alice", 2, "a1")
    assert again.replayed and again.order_id == first.order_id


async def test_batch_on_a_closed_or_missing_sale_writes_nothing(
    redis: Redis, redis_sale: SaleFactory
):
    sale = await redis_sale()
    early = await inventory.reserve(redis, sale.id, "alice", 1, "k1")
    await inventory.set_status(redis, sale.id, "paused")
    before = await snapshot(redis)
    outcomes = await inventory.reserve_many(
        redis, sale.id, [("alice", 1, "k1"), ("bob", 1, "k2"), ("carol", 1, "k3")]
    )
    # A replay answers first, whatever the sale does now; the others hear it is paused.
    assert isinstance(outcomes[0], Hold) and outcomes[0].order_id == early.order_id
    assert [shape(o)[1] for o in outcomes[1:]] == ["sale-paused", "sale-paused"]
    missing = await inventory.reserve_many(redis, "nope", [("a", 1, "k"), ("b", 1, "k")])
    assert [shape(o)[1] for o in missing] == ["sale-not-found", "sale-not-found"]
    assert await snapshot(redis) == before


@pytest.mark.parametrize("seed", range(6))
async def test_batch_answers_what_one_call_per_order_answers(
    redis: Redis, redis_sale: SaleFactory, seed: int
):
    """Differential: the same random orders as one batch on one sale, and one call each on a
    twin sale, give the same answers and leave the same counts."""
    rng = random.Random(seed)
    limits = {"stock": rng.randint(5, 40), "per_user_limit": 3, "per_order_max": 2}
    batched, alone = await redis_sale(**limits), await redis_sale(**limits)
    users = [f"u{i}" for i in range(rng.randint(2, 12))]
    orders: list[Order] = [
        (rng.choice(users), rng.choice((0, 1, 1, 2, 3)), f"k{rng.randint(0, 25)}")
        for _ in range(rng.randint(20, 120))
    ]
    together = await inventory.reserve_many(redis, batched.id, orders)
    one_by_one: list[Hold | ProblemError] = []
    for user, quantity, key in orders:
        one_by_one += await inventory.reserve_many(redis, alone.id, [(user, quantity, key)])
    assert [shape(o) for o in together] == [shape(o) for o in one_by_one]
    assert await sale_state(redis, batched.id) == await sale_state(redis, alone.id)


async def test_batch_draws_again_for_a_taken_order_id(
    redis: Redis, redis_sale: SaleFactory, monkeypatch: pytest.MonkeyPatch
):
    sale = await redis_sale(stock=10)
    taken = await inventory.reserve(redis, sale.id, "alice", 1, "k1")
    drawn = iter([taken.order_id, f"{sale.id}.00000000000000ab", f"{sale.id}.00000000000000cd"])
    monkeypatch.setattr(inventory, "new_order_ids", lambda _, n: [next(drawn) for _ in range(n)])
    outcomes = await inventory.reserve_many(redis, sale.id, [("bob", 1, "k"), ("carol", 1, "k")])
    ids = [o.order_id for o in outcomes if isinstance(o, Hold)]
    # carol's order ran first with ...ab; bob's, whose id was taken, again with ...cd.
    assert ids == [f"{sale.id}.00000000000000cd", f"{sale.id}.00000000000000ab"]
    order = await inventory.read_order(redis, sale.id, taken.order_id)
    assert order is not None and order["user"] == "alice"


async def test_an_id_drawn_twice_in_one_batch_goes_to_its_first_order(
    redis: Redis, redis_sale: SaleFactory, monkeypatch: pytest.MonkeyPatch
):
    sale = await redis_sale(stock=10)
    twice, fresh = f"{sale.id}.00000000000000ab", f"{sale.id}.00000000000000cd"
    drawn = iter([twice, twice, fresh])
    monkeypatch.setattr(inventory, "new_order_ids", lambda _, n: [next(drawn) for _ in range(n)])
    outcomes = await inventory.reserve_many(redis, sale.id, [("bob", 1, "k"), ("carol", 1, "k")])
    assert [(o.order_id, o.quantity) for o in outcomes if isinstance(o, Hold)] == [
        (twice, 1),
        (fresh, 1),
    ]
    for order_id, user in ((twice, "bob"), (fresh, "carol")):
        order = await inventory.read_order(redis, sale.id, order_id)
        assert order is not None and order["user"] == user


async def test_reserve_script_refuses_a_wrong_key_count(redis: Redis, redis_sale: SaleFactory):
    sale = await redis_sale()
    keys = sale_keys(sale.id)
    fixed = [keys.sale, keys.stock, keys.users, keys.holds, keys.outbox]
    for wrong in (fixed, [*fixed, keys.order("x")]):
        with pytest.raises(ValueError, match="5 keys \\+ 2 per item"):
            await SCRIPTS["reserve"](redis, wrong, [60])


# --- coalescing in a server process -----------------------------------------------------------


async def test_orders_of_one_turn_share_one_script_call(
    redis: Redis, redis_sale: SaleFactory, store: PipelinedRedis
):
    sale, other = await redis_sale(stock=1000), await redis_sale(stock=1000)
    reservations = Reservations(store)
    await store.ping()  # connected: the batch goes straight out with this turn's write
    await redis.config_resetstat()
    holds = await asyncio.gather(
        *(reservations.reserve(sale.id, f"u{i}", 1, f"k{i}") for i in range(50)),
        *(reservations.reserve(other.id, f"u{i}", 1, f"k{i}") for i in range(30)),
    )
    assert len({h.order_id for h in holds}) == 80
    stats = await redis.info("commandstats")
    assert stats["cmdstat_evalsha"]["calls"] == 2  # one per sale
    assert await redis.get(sale_keys(sale.id).stock) == "950"
    assert await redis.get(sale_keys(other.id).stock) == "970"


async def test_flood_through_coalescing_never_oversells(
    redis: Redis, redis_sale: SaleFactory, store: PipelinedRedis
):
    sale = await redis_sale(stock=100, per_user_limit=2, per_order_max=2)
    keys = sale_keys(sale.id)
    reservations = Reservations(store)
    rng = random.Random(3)
    shoppers = [f"u{i}" for i in range(2000)]
    calls = [
        (rng.choice(shoppers), rng.choice((1, 2)), f"k{rng.randint(0, 3000)}") for _ in range(5000)
    ]

    async def attempt(user: str, quantity: int, key: str) -> tuple[str, str, int] | str:
        try:
            hold = await reservations.reserve(sale.id, user, quantity, key)
        except ProblemError as exc:
            return exc.code
        return (user, hold.order_id, hold.quantity)

    outcomes = []
    # Waves of concurrent orders, so batches meet stock, limits and replays of earlier waves.
    for start in range(0, len(calls), 1000):
        outcomes += await asyncio.gather(*(attempt(*c) for c in calls[start : start + 1000]))
    holds = {
        (user, order_id, q) for user, order_id, q in (o for o in outcomes if isinstance(o, tuple))
    }
    per_user = Counter()
    for user, _, quantity in holds:
        per_user[user] += quantity
    assert sum(per_user.values()) == 100
    assert max(per_user.values()) <= 2
    assert await redis.get(keys.stock) == "0"
    assert await redis.hget(keys.sale, "held") == "100"
    assert {u: int(n) for u, n in (await redis.hgetall(keys.users)).items()} == dict(per_user)
    changes = await outbox_changes(redis, sale.id)
    assert sorted(c.order_id for c in changes) == sorted(order_id for _, order_id, _ in holds)
    assert await redis.zcard(keys.holds) == len(holds)
    rejected = Counter(o for o in outcomes if isinstance(o, str))
    assert set(rejected) <= {"sold-out", "limit-exceeded", "idempotency-key-reused"}
    assert rejected["sold-out"] > 0


async def test_coalesced_entries_reach_the_ledger_exactly_once(
    redis: Redis, db: asyncpg.Pool, ledger_sale: SaleFactory, store: PipelinedRedis
):
    sale = await ledger_sale(stock=3000, per_user_limit=1, per_order_max=1)
    reservations = Reservations(store)
    holds = await asyncio.gather(
        *(reservations.reserve(sale.id, f"u{i}", 1, "k") for i in range(2000))
    )
    entries = await redis.xlen(sale_keys(sale.id).outbox)
    assert entries < 100  # batches of orders, not an entry per order
    # Read and committed by a consumer that dies before acknowledging: claimed and written
    # again by another, which the ledger absorbs.
    reply = await redis.xreadgroup(OUTBOX_GROUP, "dead", {sale_keys(sale.id).outbox: ">"}, count=3)
    read = [c for _, fields in reply[0][1] for c in entry_changes(fields)]
    await write_changes(db, sale.id, read)
    await asyncio.sleep(0.05)
    written = await drain_sale(redis, db, sale.id, "alive", batch=7, claim_idle_ms=10)
    assert written == 2000
    assert await redis.xlen(sale_keys(sale.id).outbox) == 0
    ledger = await ledger_orders(db, sale.id)
    assert sorted(ledger) == sorted(h.order_id for h in holds)
    assert await db.fetchval("SELECT count(*) FROM order_events") == 2000


async def test_coalescing_reloads_the_script_after_script_flush(
    redis: Redis, redis_sale: SaleFactory, store: PipelinedRedis
):
    sale = await redis_sale(stock=100)
    reservations = Reservations(store)
    await store.ping()
    await redis.script_flush()
    holds = await asyncio.gather(
        *(reservations.reserve(sale.id, f"u{i}", 1, f"k{i}") for i in range(20))
    )
    assert len({h.order_id for h in holds}) == 20
    assert await redis.script_exists(SCRIPTS["reserve"].sha) == [True]
    assert await redis.get(sale_keys(sale.id).stock) == "80"


async def test_coalescing_connects_on_first_use(
    redis: Redis, redis_sale: SaleFactory, store: PipelinedRedis
):
    sale = await redis_sale(stock=10)
    reservations = Reservations(store)
    holds = await asyncio.gather(
        *(reservations.reserve(sale.id, f"u{i}", 1, "k") for i in range(3))
    )
    assert [h.quantity for h in holds] == [1, 1, 1]
    assert await redis.get(sale_keys(sale.id).stock) == "7"


async def test_a_lost_connection_fails_every_order_of_the_batch(
    redis: Redis, redis_sale: SaleFactory, store: PipelinedRedis
):
    sale = await redis_sale(stock=100)
    keys = sale_keys(sale.id)
    reservations = Reservations(store)
    client_id = await store.execute_command("CLIENT", "ID")
    # Writes paused: the batch reaches Redis and waits there while its connection is killed.
    await redis.execute_command("CLIENT", "PAUSE", 5000, "WRITE")
    try:
        orders = [reservations.reserve(sale.id, f"u{i}", 1, f"k{i}") for i in range(10)]
        await asyncio.sleep(0.1)
        assert await redis.execute_command("CLIENT", "KILL", "ID", client_id) == 1
        results = await asyncio.wait_for(asyncio.gather(*orders, return_exceptions=True), 5)
    finally:
        await redis.execute_command("CLIENT", "UNPAUSE")
    assert all(isinstance(r, ConnectionError) for r in results)
    assert await redis.get(keys.stock) == "100" and await outbox_changes(redis, sale.id) == []
    # The next order reconnects.
    hold = await reservations.reserve(sale.id, "late", 1, "late")
    assert not hold.replayed and await redis.get(keys.stock) == "99"


async def test_sold_out_answers_are_the_same_through_coalescing(
    redis: Redis, redis_sale: SaleFactory, store: PipelinedRedis
):
    sale = await redis_sale(stock=1)
    reservations = Reservations(store)
    results = await asyncio.gather(
        *(reservations.reserve(sale.id, f"u{i}", 1, f"k{i}") for i in range(5)),
        return_exceptions=True,
    )
    assert isinstance(results[0], Hold)
    assert all(isinstance(r, Conflict) and r.extra == {"available": 0} for r in results[1:])
    assert (await redis.hgetall(sale_keys(sale.id).users)) == {"u0": "1"}


# --- limits and failures ------------------------------------------------------------------------


async def test_more_orders_than_a_call_takes_go_in_several_calls(
    redis: Redis, redis_sale: SaleFactory
):
    sale = await redis_sale(stock=1000, per_user_limit=1, per_order_max=1)
    orders: list[Order] = [(f"u{i}", 1, "k") for i in range(MAX_BATCH * 2 + 88)]
    outcomes = await inventory.reserve_many(redis, sale.id, orders)
    assert all(isinstance(o, Hold) and not o.replayed for o in outcomes)
    assert await redis.get(sale_keys(sale.id).stock) == str(1000 - len(orders))
    assert await redis.xlen(sale_keys(sale.id).outbox) == 3
    with pytest.raises(ValueError, match="1 to 256 orders"):
        inventory.reserve_call(sale.id, orders)
    with pytest.raises(ValueError, match="1 to 256 orders"):
        inventory.reserve_call(sale.id, [])


async def test_the_script_refuses_a_batch_too_big_for_lua_before_writing(
    redis: Redis, redis_sale: SaleFactory
):
    sale = await redis_sale(stock=5000, per_user_limit=1, per_order_max=1)
    keys = sale_keys(sale.id)
    script_keys = [keys.sale, keys.stock, keys.users, keys.holds, keys.outbox]
    args: list[str | int] = [60]
    for i in range(1001):
        order_id = f"{sale.id}.{i:016x}"
        script_keys += [keys.order(order_id), keys.idempotency(f"u{i}", "k")]
        args += [order_id, f"u{i}", 1, 1, "k"]
    before = await snapshot(redis)
    with pytest.raises(ResponseError, match="at most 1000 orders"):
        await SCRIPTS["reserve"](redis, script_keys, args)
    assert await snapshot(redis) == before


async def test_a_failing_hook_does_not_wedge_the_connection(store: PipelinedRedis):
    await store.ping()
    loop = asyncio.get_running_loop()
    seen: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: seen.append(context))
    try:

        def broken() -> None:
            store.send(("PING",), lambda _: None)  # sent all the same: queued before the raise
            raise RuntimeError("hook failed")

        assert store.before_write(broken)
        assert await asyncio.wait_for(store.ping(), 2)
    finally:
        loop.set_exception_handler(None)
    assert [str(c.get("exception")) for c in seen] == ["hook failed"]


async def test_a_batch_that_cannot_be_packed_or_read_fails_its_orders_only(
    redis: Redis, redis_sale: SaleFactory, store: PipelinedRedis, monkeypatch: pytest.MonkeyPatch
):
    sale = await redis_sale(stock=100)
    reservations = Reservations(store)
    await store.ping()

    async def turn_failing_at(step: str, prefix: str) -> list[str]:
        def broken(*_: Any) -> Any:
            raise RuntimeError(f"cannot {step}")

        with monkeypatch.context() as patch:
            patch.setattr(reservations_module, step, broken)
            failed = [reservations.reserve(sale.id, f"{prefix}{i}", 1, "k") for i in range(3)]
            results = await asyncio.wait_for(asyncio.gather(*failed, return_exceptions=True), 2)
        return [str(r) for r in results]

    assert await turn_failing_at("reserve_call", "u") == ["cannot reserve_call"] * 3
    assert await turn_failing_at("reserve_outcome", "v") == ["cannot reserve_outcome"] * 3
    # The connection still serves: the next turn's orders are placed.
    hold = await asyncio.wait_for(reservations.reserve(sale.id, "w", 1, "k"), 2)
    assert not hold.replayed
    assert await redis.get(sale_keys(sale.id).stock) == "96"  # the 3 unread ones were placed
