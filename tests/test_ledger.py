"""The ledger write: the plain-INSERT path for changes never seen, the upsert after a replay."""

from __future__ import annotations

from datetime import UTC, datetime

import asyncpg
import pytest

from engine import ledger
from engine.ledger import entry_changes, pack_change, write_changes
from tests.conftest import SaleFactory

CREATED_MS = 1_700_000_000_000

# What the ledger holds for one sale, in a form two ledgers can be compared by.
Ledger = tuple[list[tuple[object, ...]], list[tuple[object, ...]], list[tuple[object, ...]]]


def change(order: str, version: int, state: str = "reserved", intent: str = "") -> str:
    return pack_change(
        {
            "order": order,
            "user": "u-" + order,
            "qty": "1",
            "state": state,
            "version": str(version),
            "created_ms": str(CREATED_MS),
            "expires_ms": str(CREATED_MS + 600_000),
            "at_ms": str(CREATED_MS + version),
            "pi": intent,
            "amount": "1500" if intent else "",
            "currency": "usd" if intent else "",
            "idem": "k-" + order,
        }
    )


def at(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


def expected(sale_id: str, changes: list[str]) -> Ledger:
    """The ledger as if each distinct change had been applied once, newest version winning."""
    newest: dict[str, list[str]] = {}
    events = set()
    payments: dict[str, list[str]] = {}
    for packed in changes:
        v = packed.split("\x1f")
        events.add((v[0], int(v[4]), v[3], at(int(v[7]))))
        if v[0] not in newest or int(newest[v[0]][4]) < int(v[4]):
            newest[v[0]] = v
        if v[8] and (v[8] not in payments or int(payments[v[8]][4]) < int(v[4])):
            payments[v[8]] = v
    orders = [
        (v[0], sale_id, v[1], int(v[2]), v[3], int(v[4]), at(int(v[7])), v[8] or None)
        for v in newest.values()
    ]
    pays = [(pi, v[0], int(v[9]), v[10], v[3], int(v[4])) for pi, v in payments.items()]
    return sorted(orders), sorted(events), sorted(pays)


async def stored(db: asyncpg.Pool) -> Ledger:
    orders = await db.fetch(
        "SELECT id, sale_id, user_id, quantity, state, version, updated_at, payment_intent_id"
        " FROM orders ORDER BY id"
    )
    events = await db.fetch("SELECT order_id, version, state, at FROM order_events ORDER BY 1, 2")
    pays = await db.fetch(
        "SELECT intent_id, order_id, amount, currency, order_state, order_version FROM payments"
        " ORDER BY 1"
    )
    return [tuple(r) for r in orders], [tuple(r) for r in events], [tuple(r) for r in pays]


@pytest.fixture
def upsert_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """The general statement raises, so a write that succeeds took the plain-INSERT path."""
    monkeypatch.setattr(ledger, "_WRITE", "SELECT $1::text, $2::text[], 1 / 0")


async def test_changes_never_seen_take_the_plain_insert_path(
    db: asyncpg.Pool, ledger_sale: SaleFactory, upsert_fails: None
):
    sale = await ledger_sale()
    # New orders, and orders whose later versions come in the same batch, in either order.
    batch = [change(f"o{i}", 1) for i in range(50)]
    batch += [change("o50", 2, "paid", "pi_50"), change("o50", 1), change("o51", 1)]
    batch += [change("o51", 2, "paid", "pi_51"), change("o51", 3, "refunded", "pi_51")]
    await write_changes(db, sale.id, batch)
    assert await stored(db) == expected(sale.id, batch)
    # A replay cannot take it: it reaches the general statement (here made to fail).
    with pytest.raises(asyncpg.DivisionByZeroError):
        await write_changes(db, sale.id, batch[:1])


async def test_replays_mixed_with_new_changes_end_exactly_once(
    db: asyncpg.Pool, ledger_sale: SaleFactory
):
    sale = await ledger_sale()
    first = [change(f"o{i}", 1) for i in range(6)]
    await write_changes(db, sale.id, first)
    mixed = [
        change("o0", 1),  # replays
        change("o1", 1),
        change("o2", 2, "paid", "pi_2"),  # newer versions of orders the ledger has
        change("o3", 3, "expired"),
        change("o3", 2, "reserved", "pi_3"),
        change("n1", 2, "paid", "pi_n1"),  # new orders, both versions in one batch, either order
        change("n1", 1),
        change("n2", 1),
        change("n2", 2, "cancelled"),
        change("n3", 1),
    ]
    await write_changes(db, sale.id, mixed)
    want = expected(sale.id, first + mixed)
    assert await stored(db) == want
    # Replayed again whole, reversed, in parts, and with an older version after a newer one.
    for batch in (mixed, mixed[::-1], first + mixed, mixed[5:], [change("o2", 1)], mixed[:3]):
        await write_changes(db, sale.id, batch)
        assert await stored(db) == want


async def test_a_failed_plain_insert_leaves_nothing_behind(
    db: asyncpg.Pool, ledger_sale: SaleFactory, monkeypatch: pytest.MonkeyPatch
):
    sale = await ledger_sale()
    # The event of o1 is in the ledger but its order is not: the plain INSERT of the orders
    # would succeed and that of the events fail.
    await db.execute(
        "INSERT INTO order_events VALUES ('o1', 1, 'reserved', $1)", at(CREATED_MS + 1)
    )
    batch = [change("o0", 1), change("o1", 1), change("o2", 2, "paid", "pi_2")]
    with monkeypatch.context() as patched:
        patched.setattr(ledger, "_WRITE", "SELECT $1::text, $2::text[], 1 / 0")
        with pytest.raises(asyncpg.DivisionByZeroError):
            await write_changes(db, sale.id, batch)
    assert await db.fetchval("SELECT count(*) FROM orders") == 0
    assert await db.fetchval("SELECT count(*) FROM payments") == 0
    assert await db.fetchval("SELECT count(*) FROM order_events") == 1
    await write_changes(db, sale.id, batch)
    assert await stored(db) == expected(sale.id, batch)


async def test_a_replay_inside_the_callers_transaction_falls_back_in_a_savepoint(
    db: asyncpg.Pool, ledger_sale: SaleFactory
):
    sale = await ledger_sale()
    batch = [change("o0", 1), change("o1", 1), change("o0", 2, "paid", "pi_0")]
    await write_changes(db, sale.id, batch[:1])
    async with db.acquire() as conn, conn.transaction():
        await write_changes(conn, sale.id, batch)
        # The transaction survived the failed statement: it still takes statements.
        await conn.execute("UPDATE sales SET name = 'after the fallback' WHERE id = $1", sale.id)
    assert await stored(db) == expected(sale.id, batch)
    assert await db.fetchval("SELECT name FROM sales") == "after the fallback"


async def test_an_invalid_change_writes_none_of_its_batch(
    db: asyncpg.Pool, ledger_sale: SaleFactory
):
    sale = await ledger_sale()
    zero = change("o1", 1).replace("\x1f1\x1freserved", "\x1f0\x1freserved")
    with pytest.raises(asyncpg.CheckViolationError):
        await write_changes(db, sale.id, [change("o0", 1), zero])
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await write_changes(db, "no-such-sale", [change("o2", 1)])
    assert await stored(db) == ([], [], [])


def test_every_shape_of_outbox_entry_is_read():
    one, two = change("o1", 1), change("o2", 1)
    assert entry_changes({"changes": one + "\x1e" + two}) == [one, two]  # a reserve batch
    assert entry_changes({"change": one}) == [one]  # any other script
    # A field per value, as entries were written before packing.
    legacy = dict(zip(ledger._LAYOUT, one.split("\x1f"), strict=True))
    assert entry_changes(legacy) == [one]
