"""Sale definitions: created in Postgres, then loaded into Redis where the sale runs.

Postgres is written first so a sale that takes orders always exists in the ledger (orders
reference it). Loading into Redis is idempotent, so a create that died between the two steps is
finished by running it again.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import asyncpg
from redis.asyncio import Redis

from engine.errors import Conflict, NotFound, Unprocessable
from engine.ids import is_sale_id
from engine.inventory import SaleDefinition, load_sale, read_sale, set_status
from engine.keys import LIVE_SALES, OUTBOX_GROUP, sale_keys
from engine.ledger import count_orders
from engine.scripts import SCRIPTS, Code

__all__ = [
    "DEFINITION_FIELDS",
    "change_status",
    "create_sale",
    "live_sale_ids",
    "retire_sale",
    "sale_report",
    "validate",
]

_retire = SCRIPTS["retire_sale"]

# A sale's definition as the sales table and the admin API name it (its id aside), in the order
# `flashsale sale show` prints it.
DEFINITION_FIELDS = (
    "name",
    "status",
    "stock",
    "price",
    "currency",
    "per_user_limit",
    "per_order_max",
    "hold_seconds",
    "starts_at",
    "ends_at",
    "stock_low_units",
)


def validate(sale: SaleDefinition) -> None:
    problems = []
    if not is_sale_id(sale.id):
        problems.append("id must be 1-48 of a-z, 0-9 and '-', starting with a letter or digit")
    if sale.stock < 0:
        problems.append("stock must be >= 0")
    if sale.price < 0:
        problems.append("price must be >= 0 (minor units)")
    if len(sale.currency) != 3 or not sale.currency.isalpha() or not sale.currency.islower():
        problems.append("currency must be a lowercase ISO 4217 code such as 'usd'")
    if sale.per_user_limit < 1:
        problems.append("per-user limit must be >= 1")
    if sale.per_order_max < 1:
        problems.append("per-order maximum must be >= 1")
    if sale.hold_seconds < 1:
        problems.append("hold seconds must be >= 1")
    if sale.end_ms <= sale.start_ms:
        problems.append("the sale must end after it starts")
    if sale.stock_low_units is not None and sale.stock_low_units < 0:
        problems.append("the stock.low threshold must be >= 0")
    if sale.status not in ("open", "paused"):
        problems.append("a new sale starts open or paused")
    if problems:
        raise Unprocessable("invalid-sale", "; ".join(problems), errors=problems)


def _ts(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


async def create_sale(db: asyncpg.Pool, redis: Redis, sale: SaleDefinition) -> bool:
    """Write the sale to Postgres and load it into Redis. Returns False when the very same sale
    already existed (a harmless re-run); a different sale under the same id is a conflict."""
    validate(sale)
    row = await db.fetchrow(
        """
        INSERT INTO sales (id, name, stock, price, currency, per_user_limit, per_order_max,
                           hold_seconds, starts_at, ends_at, status, stock_low_units)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
        ON CONFLICT (id) DO NOTHING
        RETURNING id
        """,
        sale.id,
        sale.name,
        sale.stock,
        sale.price,
        sale.currency,
        sale.per_user_limit,
        sale.per_order_max,
        sale.hold_seconds,
        _ts(sale.start_ms),
        _ts(sale.end_ms),
        sale.status,
        sale.stock_low_units,
    )
    created = row is not None
    if not created:
        existing = await db.fetchrow(
            "SELECT stock, price, currency, per_user_limit, per_order_max, hold_seconds"
            " FROM sales WHERE id = $1",
            sale.id,
        )
        assert existing is not None
        wanted = (
            sale.stock,
            sale.price,
            sale.currency,
            sale.per_user_limit,
            sale.per_order_max,
            sale.hold_seconds,
        )
        if tuple(existing.values()) != wanted:
            raise Conflict("sale-exists", f"sale {sale.id!r} already exists with other terms")
    await load_sale(redis, sale)
    await redis.sadd(LIVE_SALES, sale.id)
    return created


async def change_status(db: asyncpg.Pool, redis: Redis, sale_id: str, status: str) -> str:
    """Pause, resume (open) or close a sale, in Redis (where it takes effect) and Postgres."""
    previous = await set_status(redis, sale_id, status)
    await db.execute(
        "UPDATE sales SET status = $2, updated_at = now() WHERE id = $1", sale_id, status
    )
    return previous


async def retire_sale(redis: Redis, sale_id: str, grace_s: int) -> bool:
    """Take the sale off the live set if it ended more than ``grace_s`` ago and has nothing
    left to do (no hold, refund or intent cancel owed, no unwritten change): the workers walk
    every live sale every tick, so finished ones would make every tick slower for good.
    Whatever gives it work again puts it back (``inventory.keep_live``)."""
    keys = sale_keys(sale_id)
    reply = await _retire(
        redis,
        [
            keys.sale,
            keys.holds,
            keys.intent_holds,
            keys.refunds,
            keys.voids,
            keys.outbox,
            LIVE_SALES,
        ],
        [sale_id, grace_s * 1000],
    )
    return Code(reply[0]) is Code.OK


async def live_sale_ids(redis: Redis) -> list[str]:
    members: set[str] = await redis.smembers(LIVE_SALES)
    return sorted(members)


async def sale_report(db: asyncpg.Pool, redis: Redis, sale_id: str) -> dict[str, Any]:
    """Definition, live counters and outbox lag: what `flashsale sale show` prints."""
    row = await db.fetchrow("SELECT * FROM sales WHERE id = $1", sale_id)
    live = await read_sale(redis, sale_id)
    if row is None and live is None:
        raise NotFound("sale-not-found", f"there is no sale {sale_id!r}")
    report: dict[str, Any] = {"id": sale_id}
    if row is not None:
        report["definition"] = {
            k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in dict(row).items()
        }
    if live is not None:
        keys = sale_keys(sale_id)
        lag: int | None = None
        pending = 0
        for group in await redis.xinfo_groups(keys.outbox):
            if group["name"] == OUTBOX_GROUP:
                lag = group.get("lag")
                pending = int(group.get("pending", 0))
        report["live"] = {
            "status": live["status"],
            "available": int(live["stock"]),
            "held": int(live.get("held", 0)),
            "sold": int(live.get("sold", 0)),
            "initial_stock": int(live.get("initial_stock", 0)),
            "outbox_length": await redis.xlen(keys.outbox),
            "outbox_lag": lag,
            "outbox_pending": pending,
        }
    report["ledger_orders"] = await count_orders(db, sale_id)
    return report
