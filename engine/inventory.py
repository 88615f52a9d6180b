"""Live stock, holds and orders in Redis: one typed async function per Lua script, plus reads.

Callers never build KEYS or ARGV; they get dataclasses back or a ``ProblemError`` with a stable
code. Every write here is exactly one script call, so exactly one Redis round trip.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from engine.errors import Conflict, NotFound, ProblemError, SaleClosed, Unprocessable
from engine.ids import new_order_ids
from engine.keys import LIVE_SALES, OUTBOX_GROUP, sale_keys
from engine.scripts import SCRIPTS, Code

__all__ = [
    "IDEMPOTENCY_TTL_S",
    "MAX_BATCH",
    "ORDER_STATES",
    "Hold",
    "Order",
    "Release",
    "SaleDefinition",
    "SoldOutView",
    "attach_payment",
    "confirm",
    "keep_live",
    "load_sale",
    "read_order",
    "read_sale",
    "refund",
    "release",
    "reserve",
    "reserve_call",
    "reserve_many",
    "reserve_outcome",
    "set_status",
    "sold_out",
    "sold_out_view",
]

# Every state an order can be in (the scripts' lua/ headers say which leads to which).
ORDER_STATES = ("reserved", "paid", "expired", "cancelled", "failed", "refund_pending", "refunded")

# Stripe keeps idempotency keys 24 h; shoppers' retries come within seconds, so this is generous.
IDEMPOTENCY_TTL_S = 24 * 3600

# Orders per reserve script call at most (the script refuses more than 1,000: it unpacks per-order
# lists, 2 values per order, into single commands, and Lua's C stack holds ~8,000). A bigger
# batch would also hold Redis longer while other sales wait; a server with 64 connections sends
# batches of up to 64.
MAX_BATCH = 256

_reserve = SCRIPTS["reserve"]
_release = SCRIPTS["release"]
_load_sale = SCRIPTS["load_sale"]
_set_status = SCRIPTS["set_status"]
_confirm = SCRIPTS["confirm"]
_refund = SCRIPTS["refund"]
_attach_payment = SCRIPTS["attach_payment"]
_sold_out_view = SCRIPTS["sold_out_view"]


@dataclass(frozen=True, slots=True)
class SaleDefinition:
    id: str
    name: str
    stock: int
    price: int  # minor units (cents)
    currency: str
    per_user_limit: int
    per_order_max: int
    hold_seconds: int
    start_ms: int
    end_ms: int
    status: str = "open"
    # stock.low for this sale at this many units available (None: FLASHSALE_STOCK_LOW_UNITS).
    stock_low_units: int | None = None

    def redis_fields(self) -> list[str | int]:
        fields: dict[str, str | int] = {
            "id": self.id,
            "name": self.name,
            "status": self.status,
            "start_ms": self.start_ms,
            "end_ms": self.end_ms,
            "price": self.price,
            "currency": self.currency,
            "per_user_limit": self.per_user_limit,
            "per_order_max": self.per_order_max,
            "hold_ms": self.hold_seconds * 1000,
        }
        if self.stock_low_units is not None:
            fields["stock_low_units"] = self.stock_low_units
        return [item for pair in fields.items() for item in pair]


@dataclass(frozen=True, slots=True)
class Hold:
    order_id: str
    quantity: int
    created_ms: int
    expires_ms: int
    replayed: bool


@dataclass(frozen=True, slots=True)
class Release:
    code: Code
    state: str
    version: int


def _sale_error(code: Code, reply: list[Any], sale_id: str) -> ProblemError:
    if code is Code.SALE_NOT_FOUND:
        return NotFound("sale-not-found", f"there is no sale {sale_id!r}")
    if code is Code.SALE_NOT_STARTED:
        return SaleClosed(
            "sale-not-started", "the sale has not started yet", status=425, starts_at_ms=reply[1]
        )
    if code is Code.SALE_ENDED:
        return SaleClosed("sale-ended", "the sale has ended", status=410, ended_at_ms=reply[1])
    if code is Code.SALE_PAUSED:
        return SaleClosed("sale-paused", "the sale is paused", status=403)
    raise AssertionError(f"not a sale state code: {code!r}")


def sold_out(available: int) -> Conflict:
    """The answer to an order the stock cannot cover (``reserve``, or the sold-out memory)."""
    return Conflict("sold-out", "not enough stock left for this quantity", available=available)


@dataclass(frozen=True, slots=True)
class SoldOutView:
    """A sale that is open, inside its window and out of stock, as ``sold_out_view`` read it."""

    now_ms: int  # Redis's clock when it was read
    end_ms: int
    per_order_max: int
    per_user_limit: int
    shoppers: int  # how many shoppers ever held a unit
    fingerprint: str  # the outbox's last id: the same means the same shoppers
    names: list[str] | None  # all of them, or None when the caller's fingerprint still holds


async def sold_out_view(
    redis: Redis, sale_id: str, known_fingerprint: str, max_shoppers: int
) -> SoldOutView | None:
    """The sale's sold-out view, or None when it is not for a server to answer by itself."""
    keys = sale_keys(sale_id)
    reply = await _sold_out_view(
        redis,
        [keys.sale, keys.stock, keys.users, keys.outbox],
        [known_fingerprint, max_shoppers],
    )
    if Code(reply[0]) is not Code.OK:
        return None
    return SoldOutView(
        now_ms=reply[1],
        end_ms=reply[2],
        per_order_max=reply[3],
        per_user_limit=reply[4],
        shoppers=reply[5],
        fingerprint=reply[6],
        names=reply[7],
    )


def _order_keys(sale_id: str, order_id: str, *extra: str) -> list[str]:
    """The KEYS every order-changing script takes first, in their header's order."""
    keys = sale_keys(sale_id)
    return [
        keys.sale,
        keys.stock,
        keys.users,
        keys.holds,
        keys.outbox,
        keys.order(order_id),
        *extra,
    ]


Order = tuple[str, int, str]  # (user id, quantity, Idempotency-Key)


def reserve_outcome(reply: list[Any], sale_id: str) -> Hold | ProblemError | None:
    """One order's reply from the reserve script: its hold, the error to answer with, or None
    when its order id was taken (64 random bits collided; nothing was written: place it again,
    with a new id)."""
    code = Code(reply[0])
    if code is Code.ORDER_ID_TAKEN:
        return None
    if code is Code.OK or code is Code.REPLAYED:
        return Hold(
            order_id=reply[1],
            quantity=reply[2],
            created_ms=reply[3],
            expires_ms=reply[4],
            replayed=code is Code.REPLAYED,
        )
    if code is Code.SOLD_OUT:
        return sold_out(reply[1])
    if code is Code.LIMIT_EXCEEDED:
        return Conflict(
            "limit-exceeded",
            f"at most {reply[1]} units per shopper in this sale",
            limit=reply[1],
            already_held=reply[2],
        )
    if code is Code.IDEMPOTENCY_KEY_REUSED:
        return Unprocessable(
            "idempotency-key-reused",
            "this Idempotency-Key was already used with a different request",
        )
    if code is Code.QUANTITY_EXCEEDS_MAXIMUM:
        return Unprocessable(
            "quantity-exceeds-maximum", f"at most {reply[1]} units per order", maximum=reply[1]
        )
    if code is Code.INVALID_QUANTITY:
        return Unprocessable("invalid-quantity", "quantity must be a positive integer")
    return _sale_error(code, reply, sale_id)


def reserve_call(sale_id: str, orders: Sequence[Order]) -> tuple[list[str], list[str | int]]:
    """The reserve script's KEYS and ARGV for ``orders`` (at most MAX_BATCH), each with a newly
    drawn order id."""
    if not 0 < len(orders) <= MAX_BATCH:
        raise ValueError(f"a reserve call takes 1 to {MAX_BATCH} orders, not {len(orders)}")
    keys = sale_keys(sale_id)
    script_keys = [keys.sale, keys.stock, keys.users, keys.holds, keys.outbox]
    args: list[str | int] = [IDEMPOTENCY_TTL_S]
    for (user_id, quantity, idempotency_key), order_id in zip(
        orders, new_order_ids(sale_id, len(orders)), strict=True
    ):
        script_keys += [keys.order(order_id), keys.idempotency(user_id, idempotency_key)]
        # The request body is just the quantity, so the quantity is the whole fingerprint.
        args += [order_id, user_id, quantity, quantity, idempotency_key]
    return script_keys, args


async def reserve_many(
    redis: Redis, sale_id: str, orders: Sequence[Order]
) -> list[Hold | ProblemError]:
    """Place ``orders`` in one script call, decided one after another in the order given: each
    gets what ``reserve`` alone would have answered at that point (``engine.http.coalescer``
    batches a server's concurrent orders the same way)."""
    outcomes: list[Hold | ProblemError | None] = [None] * len(orders)
    pending = list(range(len(orders)))
    while pending:
        chunk, pending = pending[:MAX_BATCH], pending[MAX_BATCH:]
        replies = await _reserve(redis, *reserve_call(sale_id, [orders[i] for i in chunk]))
        retry = []
        for i, reply in zip(chunk, replies, strict=True):
            outcome = reserve_outcome(reply, sale_id)
            if outcome is None:
                retry.append(i)
            outcomes[i] = outcome
        pending = retry + pending
    return [outcome for outcome in outcomes if outcome is not None]


async def reserve(
    redis: Redis, sale_id: str, user_id: str, quantity: int, idempotency_key: str
) -> Hold:
    [outcome] = await reserve_many(redis, sale_id, [(user_id, quantity, idempotency_key)])
    if isinstance(outcome, ProblemError):
        raise outcome
    return outcome


async def release(
    redis: Redis,
    sale_id: str,
    order_id: str,
    state: str,
    owner: str | None = None,
    payment_failed: bool = False,
) -> Release:
    """End a live hold as ``state`` (cancelled, expired, failed). Safe to call any number of
    times: stock and the shopper's count come back only on the first that finds it reserved.
    ``payment_failed``: the gateway failed its payment (counted once, for the dashboard)."""
    keys = sale_keys(sale_id)
    reply = await _release(
        redis,
        _order_keys(sale_id, order_id, keys.voids, keys.intent_holds),
        [order_id, state, owner or "", "1" if payment_failed else ""],
    )
    code = Code(reply[0])
    if code is Code.ORDER_NOT_FOUND:
        raise NotFound("order-not-found", f"there is no order {order_id!r}")
    if code is Code.INVALID_STATE:
        raise ValueError(f"cannot release into state {state!r}")
    return Release(code=code, state=reply[1], version=int(reply[2]))


async def confirm(
    redis: Redis, sale_id: str, order_id: str, intent_id: str, event_ms: int = 0
) -> Release:
    """A payment succeeded: paid, re-reserved (late payment with stock left), refund_pending
    (late payment without), or nothing (already final, stale event, another intent)."""
    keys = sale_keys(sale_id)
    reply = await _confirm(
        redis,
        _order_keys(sale_id, order_id, keys.refunds, keys.intent_holds),
        [order_id, intent_id, event_ms],
    )
    code = Code(reply[0])
    if code is Code.ORDER_NOT_FOUND:
        raise NotFound("order-not-found", f"there is no order {order_id!r}")
    await keep_live(redis, sale_id)
    return Release(code=code, state=reply[1], version=int(reply[2]))


async def keep_live(redis: Redis, sale_id: str) -> None:
    """Put the sale back on the live set the workers walk, after a change that can give a
    retired sale work (``engine.sales.retire_sale``): a late payment, a refund, a restock
    write its outbox and may owe a refund. Called after the change's script whatever it
    answered: a retry that finds the change already made (its first try's SADD lost with the
    connection) must still put the sale back. A quiet sale is retired again a minute later."""
    await redis.sadd(LIVE_SALES, sale_id)


async def refund(
    redis: Redis,
    sale_id: str,
    order_id: str,
    step: str,
    restock: bool = False,
    refund_id: str = "",
) -> Release:
    """``step`` 'request': paid -> refund_pending; 'complete': refund_pending -> refunded."""
    reply = await _refund(
        redis,
        _order_keys(sale_id, order_id, sale_keys(sale_id).refunds),
        [order_id, step, int(restock), refund_id],
    )
    code = Code(reply[0])
    if code is Code.ORDER_NOT_FOUND:
        raise NotFound("order-not-found", f"there is no order {order_id!r}")
    if code is Code.INVALID_STATE:
        raise Conflict("order-not-refundable", f"the order is {reply[1]}", state=reply[1])
    await keep_live(redis, sale_id)
    return Release(code=code, state=reply[1], version=int(reply[2]))


async def attach_payment(
    redis: Redis,
    sale_id: str,
    order_id: str,
    intent_id: str,
    client_secret: str,
    amount: int,
    currency: str,
) -> tuple[str, str]:
    """Tie an intent to the order; the first attached wins, and the hold moves to the index
    of holds with an intent. Returns (intent id, secret)."""
    keys = sale_keys(sale_id)
    reply = await _attach_payment(
        redis,
        [keys.order(order_id), keys.outbox, keys.holds, keys.intent_holds],
        [intent_id, client_secret, amount, currency],
    )
    code = Code(reply[0])
    if code is Code.ORDER_NOT_FOUND:
        raise NotFound("order-not-found", f"there is no order {order_id!r}")
    if code is Code.INVALID_STATE:
        raise Conflict("order-not-payable", f"the order is {reply[1]}", state=reply[1])
    return str(reply[1]), str(reply[2])


async def load_sale(redis: Redis, sale: SaleDefinition) -> Code:
    keys = sale_keys(sale.id)
    reply = await _load_sale(
        redis,
        [keys.sale, keys.stock, keys.outbox],
        [OUTBOX_GROUP, sale.stock, *sale.redis_fields()],
    )
    return Code(reply[0])


async def set_status(redis: Redis, sale_id: str, status: str) -> str:
    """Open, pause or close a sale; returns the previous status."""
    reply = await _set_status(redis, [sale_keys(sale_id).sale], [status])
    code = Code(reply[0])
    if code is Code.SALE_NOT_FOUND:
        raise NotFound("sale-not-found", f"there is no sale {sale_id!r} in Redis")
    if code is Code.INVALID_STATE:
        raise Conflict(
            "invalid-status",
            f"cannot move a {reply[1] if len(reply) > 1 else '?'} sale to {status!r}",
        )
    return str(reply[1])


async def read_sale(redis: Redis, sale_id: str) -> dict[str, str] | None:
    """The sale hash plus ``stock`` (units available now), in one round trip."""
    keys = sale_keys(sale_id)
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hgetall(keys.sale)
        pipe.get(keys.stock)
        sale, stock = await pipe.execute()
    if not sale:
        return None
    sale["stock"] = stock or "0"
    return dict(sale)


async def read_order(redis: Redis, sale_id: str, order_id: str) -> dict[str, str] | None:
    order: dict[str, str] = await redis.hgetall(sale_keys(sale_id).order(order_id))
    return order or None
