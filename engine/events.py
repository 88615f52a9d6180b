"""Events for subscribers, produced by the workers, never on the order path.

Order events come from the outbox: the drain writes a batch of changes into the ledger and, in
the same Postgres transaction, one event per change whose state subscribers can ask for, with
one delivery row per subscription that wants it. An event's id is made from the order and
version it reports (``msg_<order>_<version>``), so a batch written twice (a worker killed before
its XACK) produces nothing new: exactly one event per ledger change, whatever the replays.

Sale events (``stock.low``, ``sale.sold_out``, ``sale.opened``, ``sale.closed``) are not in the
outbox: the delivery job observes each live sale in Redis, where its stock and status live, and
produces each milestone once per sale (the id is ``msg_<sale>_<milestone>``). ``stock.low`` fires
when the available units first fall to the sale's own ``stock_low_units`` (else the setting's)
or below (only for a sale whose stock is above it); a restock does not arm it again.

A subscription receives the events produced after it was made; each event is thin (ids, state,
amounts), so a receiver re-reads the resource for the rest.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson
from redis.asyncio import Redis

from engine.db import redis_ms
from engine.inventory import read_sale
from engine.ledger import INCOMING_CHANGES, write_changes

__all__ = [
    "EVENT_TYPES",
    "ORDER_EVENTS",
    "anyone_wants",
    "event_body",
    "observe_sale",
    "write_with_events",
]

# An order state -> the event of reaching it. 'failed' and 'refund_pending' have none.
ORDER_EVENTS: dict[str, str] = {
    "reserved": "order.placed",
    "paid": "order.paid",
    "cancelled": "order.cancelled",
    "expired": "order.expired",
    "refunded": "order.refunded",
}
SALE_EVENTS = ("stock.low", "sale.sold_out", "sale.opened", "sale.closed")
EVENT_TYPES: tuple[str, ...] = (*ORDER_EVENTS.values(), *SALE_EVENTS)

_STATES = ", ".join(f"('{state}', '{kind}')" for state, kind in ORDER_EVENTS.items())

# A delivery per enabled subscription to each event just produced (the CTE ``produced``): an
# event produced before (a replay) is not in it, so it gets none again.
_DELIVER_PRODUCED = """
INSERT INTO outbound_deliveries (subscription_id, event_id)
SELECT s.id, p.id FROM produced p
JOIN webhook_subscriptions s ON s.enabled AND p.type = ANY (s.event_types)
ON CONFLICT DO NOTHING
"""

# One event per change of the batch whose type someone subscribes to, and a delivery per such
# subscription. Only newly inserted events (RETURNING) get deliveries, so a replayed batch adds
# none. The amount is the payment's when the change carries one, else quantity x price.
_PRODUCE = f"""
WITH {INCOMING_CHANGES},
typed AS (
    -- A 'reserved' change after the first (a PaymentIntent attached to the hold) is the same
    -- order still held: only version 1 places it.
    SELECT DISTINCT ON (i.id, i.version) i.*, t.type
    FROM incoming i JOIN (VALUES {_STATES}) AS t (state, type) USING (state)
    WHERE i.state <> 'reserved' OR i.version = 1
),
wanted AS (
    SELECT * FROM typed
    WHERE EXISTS (SELECT 1 FROM webhook_subscriptions s
                  WHERE s.enabled AND typed.type = ANY (s.event_types))
),
produced AS (
    INSERT INTO outbound_events (id, type, sale_id, occurred_at, data)
    SELECT 'msg_' || w.id || '_' || w.version, w.type, $1, w.at,
           jsonb_build_object(
               'order_id', w.id, 'sale_id', $1::text, 'user_id', w.user_id, 'state', w.state,
               'version', w.version, 'quantity', w.quantity,
               'amount', CASE WHEN w.amount > 0 THEN w.amount ELSE w.quantity * s.price END,
               'currency', coalesce(nullif(w.currency, ''), s.currency))
    FROM wanted w LEFT JOIN sales s ON s.id = $1
    ON CONFLICT (id) DO NOTHING
    RETURNING id, type
)
{_DELIVER_PRODUCED}"""

_ANYONE = """
SELECT EXISTS (SELECT 1 FROM webhook_subscriptions WHERE enabled AND event_types && $1::text[])
"""


async def anyone_wants(db: asyncpg.Pool | asyncpg.Connection, types: Sequence[str]) -> bool:
    """Whether an enabled subscription takes any of ``types``: without one, nothing is
    produced (nobody would receive it), and producing costs the ledger or a read per sale."""
    return bool(await db.fetchval(_ANYONE, list(types)))


_PRODUCE_SALE = f"""
WITH produced AS (
    INSERT INTO outbound_events (id, type, sale_id, occurred_at, data)
    SELECT 'msg_' || $1 || '_' || m.type, m.type, $1, $2, m.data::jsonb
    FROM unnest($3::text[], $4::text[]) AS m (type, data)
    ON CONFLICT (id) DO NOTHING
    RETURNING id, type
)
{_DELIVER_PRODUCED}"""


async def write_with_events(pool: asyncpg.Pool, sale_id: str, changes: Sequence[str]) -> None:
    """Write one sale's changes to the ledger and produce their events, in one transaction: a
    worker that dies mid-way leaves neither, and the batch is written again whole."""
    if not changes:
        return
    async with pool.acquire() as conn:
        # Without a subscriber to order events the batch is the ledger's alone (this look costs
        # a round trip per batch). With one, every order also writes an event and a delivery
        # row: `python -m loadtests.costs`, 1,000 orders a pass in entries of 20, Postgres CPU
        # per order 13.5 µs without, 44.0 µs with one subscriber to order.placed (worker 3.6
        # against 4.4 µs). A subscription made meanwhile gets events from the next batch on.
        if not await anyone_wants(conn, list(ORDER_EVENTS.values())):
            await write_changes(conn, sale_id, changes)
            return
        async with conn.transaction():
            await write_changes(conn, sale_id, changes)
            await conn.execute(_PRODUCE, sale_id, changes)


def _milestones(sale: dict[str, str], now_ms: int, default_low: int) -> dict[str, Any]:
    """The sale's milestones that hold now, each with its event's data. ``default_low``: the
    stock.low threshold of a sale that has none of its own."""
    own_low = sale.get("stock_low_units")
    stock_low_units = int(own_low) if own_low is not None else default_low
    available = int(sale.get("stock", 0))
    initial = int(sale.get("initial_stock", 0))
    status = sale.get("status", "")
    about = {"sale_id": sale.get("id", ""), "status": status, "available": available}
    found: dict[str, Any] = {}
    started = int(sale.get("start_ms", 0)) <= now_ms
    ended = now_ms >= int(sale.get("end_ms", 0))
    if status == "open" and started and not ended:
        found["sale.opened"] = about
    if status == "closed" or ended:
        found["sale.closed"] = about
    if initial > 0 and available <= 0:
        found["sale.sold_out"] = {**about, "initial_stock": initial}
    if initial > stock_low_units and available <= stock_low_units:
        found["stock.low"] = {**about, "initial_stock": initial, "threshold": stock_low_units}
    return found


async def observe_sale(db: asyncpg.Pool, redis: Redis, sale_id: str, stock_low_units: int) -> None:
    """Produce the sale's milestone events that hold now and were not produced before."""
    sale = await read_sale(redis, sale_id)
    if sale is None:
        return
    now_ms = await redis_ms(redis)
    found = _milestones(sale, now_ms, stock_low_units)
    if not found:
        return
    await db.execute(
        _PRODUCE_SALE,
        sale_id,
        datetime.fromtimestamp(now_ms / 1000, tz=UTC),
        list(found),
        [orjson.dumps(data).decode() for data in found.values()],
    )


def event_body(kind: str, occurred_at: datetime, data: dict[str, Any]) -> bytes:
    """What a subscriber receives: the Standard Webhooks payload shape."""
    stamp = occurred_at.astimezone(UTC).isoformat(timespec="milliseconds")
    return orjson.dumps({"type": kind, "timestamp": stamp, "data": data})
