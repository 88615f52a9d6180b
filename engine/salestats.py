"""What a live sale looks like right now, read cheaply from Redis: for the dashboard and for
per-sale gauges.

One pipelined round trip of a dozen commands per sale, whatever its size: counters from the sale
hash, lengths and counts of its indexes, the outbox's oldest entry. Nothing here scans holds or
orders, so a poll every second costs the same with 10 holds or 10 million.

Ledger lag is the age of the outbox's oldest entry. The drain deletes an entry in the same call
that acknowledges it (lua/ack-1.lua), so the oldest entry left is the oldest change Postgres has
not committed: its age is how far the ledger trails Redis (0 when the outbox is empty). Stream ids
start with the Redis clock in ms, and ages are taken against Redis's own ``TIME``, the clock the
scripts stamp with, so a skewed app server clock does not skew them.

Redis keeps no count of orders accepted (a released hold gives its units back to stock), so the
counter that only grows with accepted orders is not here; ``taken`` (units held, sold or
withdrawn: initial stock minus what is available) is what the stock has lost to shoppers, and its
rate is what sells a sale out.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from redis.asyncio import Redis

from engine.db import redis_ms
from engine.keys import OUTBOX_GROUP, sale_keys
from engine.sales import live_sale_ids

__all__ = ["SaleStats", "all_sale_stats", "sale_stats"]

_SALE_FIELDS = (
    "name",
    "status",
    "start_ms",
    "end_ms",
    "initial_stock",
    "held",
    "sold",
    "withdrawn",
    "price",
    "currency",
    "payments_failed",
)


@dataclass(frozen=True, slots=True)
class SaleStats:
    sale_id: str
    name: str
    status: str  # as set: open, paused or closed
    phase: str  # what a shopper meets now: upcoming, open, paused, closed or ended
    start_ms: int
    end_ms: int
    initial: int
    available: int
    held: int  # units in live holds (reserved, not yet paid)
    sold: int  # units paid for: the paid count
    withdrawn: int  # units refunded and not put back on sale
    taken: int  # initial - available: held + sold + withdrawn
    price: int  # minor units
    currency: str
    holds: int  # live holds, with or without a PaymentIntent
    holds_due: int  # holds whose expiry has passed and that a worker has not yet released
    outbox_length: int  # changes the ledger has not committed
    outbox_pending: int  # of those, delivered to a worker and not yet acknowledged
    ledger_lag_ms: int  # age of the oldest uncommitted change; 0 when the outbox is empty
    payments_failed: int  # holds ended because the gateway failed their payment
    refunds_owed: int  # paid orders to be refunded at the gateway
    cancels_owed: int  # cancelled orders whose PaymentIntent still has to be cancelled
    now_ms: int  # Redis's clock when this was read

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def _int(value: str | None) -> int:
    return int(value) if value else 0


def _phase(status: str, start_ms: int, end_ms: int, now_ms: int) -> str:
    if status != "open":
        return status
    if now_ms < start_ms:
        return "upcoming"
    return "open" if now_ms < end_ms else "ended"


async def sale_stats(redis: Redis, sale_id: str, now_ms: int | None = None) -> SaleStats | None:
    """The sale's figures, or None when Redis has no such sale. ``now_ms``: Redis's clock
    (``db.redis_ms``), read once by a caller that reads many sales."""
    if now_ms is None:
        now_ms = await redis_ms(redis)
    keys = sale_keys(sale_id)
    # One MULTI: the figures come from one instant (every key shares the sale's slot).
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hmget(keys.sale, list(_SALE_FIELDS))
        pipe.get(keys.stock)
        pipe.zcard(keys.holds)
        pipe.zcard(keys.intent_holds)
        pipe.zcount(keys.holds, "-inf", now_ms)
        pipe.zcount(keys.intent_holds, "-inf", now_ms)
        pipe.zcard(keys.refunds)
        pipe.zcard(keys.voids)
        pipe.xlen(keys.outbox)
        pipe.xrange(keys.outbox, "-", "+", count=1)
        pipe.exists(keys.outbox)
        replies = await pipe.execute()
    fields, stock, holds, intent_holds, due, intent_due, refunds, voids = replies[:8]
    outbox_length, oldest, outbox_exists = replies[8:]
    sale = dict(zip(_SALE_FIELDS, fields, strict=True))
    if sale["status"] is None:
        return None
    pending = 0
    if outbox_exists:
        # Apart from the MULTI: XINFO on a missing stream is an error reply, not an empty answer.
        for group in await redis.xinfo_groups(keys.outbox):
            if group["name"] == OUTBOX_GROUP:
                pending = int(group.get("pending", 0))
    lag_ms = 0
    if oldest:
        entry_ms = int(oldest[0][0].split("-")[0])
        lag_ms = max(0, now_ms - entry_ms)
    start_ms, end_ms = _int(sale["start_ms"]), _int(sale["end_ms"])
    initial, available = _int(sale["initial_stock"]), _int(stock)
    return SaleStats(
        sale_id=sale_id,
        name=sale["name"] or sale_id,
        status=sale["status"],
        phase=_phase(sale["status"], start_ms, end_ms, now_ms),
        start_ms=start_ms,
        end_ms=end_ms,
        initial=initial,
        available=available,
        held=_int(sale["held"]),
        sold=_int(sale["sold"]),
        withdrawn=_int(sale["withdrawn"]),
        taken=initial - available,
        price=_int(sale["price"]),
        currency=sale["currency"] or "",
        holds=holds + intent_holds,
        holds_due=due + intent_due,
        outbox_length=outbox_length,
        outbox_pending=pending,
        ledger_lag_ms=lag_ms,
        payments_failed=_int(sale["payments_failed"]),
        refunds_owed=refunds,
        cancels_owed=voids,
        now_ms=now_ms,
    )


async def all_sale_stats(redis: Redis) -> tuple[int, list[SaleStats]]:
    """Redis's clock (ms) and the figures of every live sale, by sale id. A sale in the live set
    whose hash is gone (deleted by hand) is left out rather than shown as zeros."""
    now_ms = await redis_ms(redis)
    found = []
    for sale_id in await live_sale_ids(redis):
        stats = await sale_stats(redis, sale_id, now_ms)
        if stats is not None:
            found.append(stats)
    return now_ms, found
