"""Reconciliation: compare Redis (live truth), Postgres (ledger) and the payment gateway.

Two sweeps, one report:

- **Since the cursor** (``full=False``: the worker every minute, ``flashsale reconcile``): only
  what changed at the gateway since the sale's cursor is compared. The gateway's events are read
  in pages of 100 (Stripe's event list, ``created[gte]``, ``starting_after``); the orders they
  name are compared against Redis and the ledger; then the cursor moves to when the sweep began.
  Its cost follows the payments made, not the orders stored. Events from the last
  ``CURSOR_OVERLAP_S`` before the cursor are read again, so a difference near the cursor can be
  reported by two sweeps.
- **Full** (``full=True``: ``flashsale reconcile --full``, audits): every order of the sale in
  Redis against the ledger, every intent retrieved from the gateway one by one, and the events
  of the last three days (Stripe's webhook retry window).

Each difference has a kind, the order, what was seen, and what ``--repair`` does about it:

| kind                      | repair                                                      |
| ------------------------- | ----------------------------------------------------------- |
| outbox-backlog            | none: the ledger is still catching up; run again later      |
| missing-in-ledger         | write Redis's state of the order into the ledger            |
| state-mismatch            | write Redis's (newer) state into the ledger                 |
| unknown-in-ledger         | none (manual): the ledger has an order Redis does not       |
| paid-at-gateway-not-here  | confirm: paid, re-reserved, or refund_pending               |
| paid-here-not-at-gateway  | none (manual): never release a sale on a gateway's word     |
| unknown-at-gateway        | none (manual): the gateway does not know the order's intent |
| refund-owed               | refund at the gateway, then mark refunded                   |
| missed-webhook            | receive the event now, as if Stripe had delivered it        |
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from redis.asyncio import Redis

from engine import inventory
from engine.db import redis_ms
from engine.invariants import outbox_backlog, redis_orders
from engine.keys import sale_keys
from engine.ledger import pack_change, write_changes
from engine.metrics import RECONCILE_DIFFERENCES
from engine.payments import GatewayRefused, Intent, PaymentGateway, events_since, intent_of
from engine.webhooks import HANDLED, receive

__all__ = [
    "CURSOR_OVERLAP_S",
    "LOOK_BACK_S",
    "REFUND_GRACE_MS",
    "Difference",
    "ReconcileReport",
    "reconcile",
]

log = logging.getLogger("flashsale.reconcile")

UNPAID_STATES = ("reserved", "expired", "cancelled", "failed")
# An intent in one of these never changes again.
FINAL_STATUSES = ("canceled", "succeeded")
# Stripe retries a webhook for three days: the full sweep's event window, and where a sale's
# cursor starts.
LOOK_BACK_S = 3 * 86_400
# Events Stripe lists a little after their creation time are still read by the next sweep.
CURSOR_OVERLAP_S = 30
# A refund owed this long (ms) is one the refunds job (every second) has not managed to pay.
REFUND_GRACE_MS = 60_000
# Refunds owed listed by one sweep since the cursor; the rest are counted.
REFUNDS_LISTED = 200


@dataclass(frozen=True, slots=True)
class Difference:
    kind: str
    order_id: str
    detail: str

    def __str__(self) -> str:
        return f"{self.kind:<26} {self.order_id:<34} {self.detail}"


@dataclass
class ReconcileReport:
    sale_id: str
    differences: list[Difference] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)

    def found(self, kind: str, order_id: str, detail: str) -> None:
        self.differences.append(Difference(kind, order_id, detail))

    def reported(self) -> None:
        """Log each difference and count it in the metrics (``reconcile`` calls it)."""
        for difference in self.differences:
            log.warning("reconcile %s: %s", self.sale_id, difference)
            RECONCILE_DIFFERENCES.labels(difference.kind).inc()


def _change(order: dict[str, str]) -> str:
    """An order hash as the outbox would carry its latest change (the hash names the values
    as the change does, but for its id and its last change's time)."""
    return pack_change({**order, "order": order["id"], "at_ms": order["updated_ms"]})


async def _compare_ledger(
    db: asyncpg.Pool,
    redis: Redis,
    sale_id: str,
    orders: dict[str, dict[str, str]],
    report: ReconcileReport,
    repair: bool,
    every_order: bool,
) -> None:
    """``orders`` (from Redis) against their ledger rows; ``every_order``: they are all of the
    sale's, so a ledger row outside them is a difference too."""
    backlog = await outbox_backlog(redis, sale_id)
    if backlog:
        report.found("outbox-backlog", "-", f"{backlog} outbox entries not yet in the ledger")
        return
    if every_order:
        rows = await db.fetch("SELECT id, state, version FROM orders WHERE sale_id = $1", sale_id)
    else:
        rows = await db.fetch(
            "SELECT id, state, version FROM orders WHERE id = any($1::text[])", list(orders)
        )
    ledger = {r["id"]: (r["state"], r["version"]) for r in rows}
    stale = []
    for order_id, order in orders.items():
        if order_id not in ledger:
            report.found("missing-in-ledger", order_id, f"redis {order['state']}")
            stale.append(order)
        elif ledger[order_id] != (order["state"], int(order["version"])):
            state, version = ledger[order_id]
            detail = f"redis {order['state']} v{order['version']}, ledger {state} v{version}"
            report.found("state-mismatch", order_id, detail)
            stale.append(order)
    if every_order:
        for order_id in ledger.keys() - orders.keys():
            report.found("unknown-in-ledger", order_id, f"ledger {ledger[order_id][0]}")
    if repair and stale:
        await write_changes(db, sale_id, [_change(o) for o in stale])
        report.repaired.append(f"wrote {len(stale)} orders from Redis into the ledger")


def _sale_events(page: list[dict[str, Any]], sale_id: str) -> list[dict[str, Any]]:
    """The events of ``page`` that reconciliation handles, about this sale's orders."""
    return [
        e
        for e in page
        if e.get("type") in HANDLED
        and str((e["data"]["object"].get("metadata") or {}).get("order_id", "")).startswith(
            sale_id + "."
        )
    ]


async def _missed_webhooks(
    db: asyncpg.Pool,
    redis: Redis,
    gateway: PaymentGateway,
    events: list[dict[str, Any]],
    report: ReconcileReport,
    repair: bool,
) -> None:
    """Events the gateway sent that never reached the receiver; with ``repair``, received now."""
    arrived = {
        r["id"]
        for r in await db.fetch(
            "SELECT id FROM webhook_events WHERE id = any($1::text[])", [e["id"] for e in events]
        )
    }
    for event in events:
        if event["id"] in arrived:
            continue
        order_id = event["data"]["object"]["metadata"]["order_id"]
        report.found("missed-webhook", order_id, f"{event['type']} {event['id']}")
        if repair:
            outcome = await receive(db, redis, gateway, event)
            report.repaired.append(f"{order_id}: received {event['id']} late: {outcome}")


async def _compare_payment(
    redis: Redis,
    sale_id: str,
    order_id: str,
    state: str,
    intent: Intent,
    report: ReconcileReport,
    repair: bool,
) -> str:
    """The order's state against its intent's; returns the order's state after any repair."""
    if intent.status == "succeeded" and state in UNPAID_STATES:
        detail = f"{intent.id} succeeded, order {state}"
        report.found("paid-at-gateway-not-here", order_id, detail)
        if repair:
            result = await inventory.confirm(redis, sale_id, order_id, intent.id)
            report.repaired.append(f"{order_id}: confirmed, now {result.state}")
            return result.state
    elif state == "paid" and intent.status != "succeeded":
        report.found("paid-here-not-at-gateway", order_id, f"{intent.id} is {intent.status}")
    return state


async def _refund_owed(
    redis: Redis,
    gateway: PaymentGateway,
    sale_id: str,
    order_id: str,
    intent_id: str,
    detail: str,
    report: ReconcileReport,
    repair: bool,
) -> None:
    report.found("refund-owed", order_id, detail)
    if repair:
        refund_id = await gateway.refund(intent_id, order_id)
        await inventory.refund(redis, sale_id, order_id, "complete", refund_id=refund_id)
        report.repaired.append(f"{order_id}: refunded ({refund_id})")


async def _full(
    redis: Redis, db: asyncpg.Pool, gateway: PaymentGateway, sale_id: str, repair: bool
) -> ReconcileReport:
    report = ReconcileReport(sale_id)
    orders = await redis_orders(redis, sale_id)
    await _compare_ledger(db, redis, sale_id, orders, report, repair, every_order=True)

    async for page in events_since(gateway, int(time.time()) - LOOK_BACK_S):
        await _missed_webhooks(db, redis, gateway, _sale_events(page, sale_id), report, repair)
    if repair and report.repaired:
        orders = await redis_orders(redis, sale_id)

    gate = asyncio.Semaphore(8)

    async def look_up(intent_id: str) -> Intent | None:
        async with gate:
            try:
                return await gateway.retrieve_intent(intent_id)
            except GatewayRefused:
                return None

    with_intent = [(oid, o) for oid, o in orders.items() if o.get("pi")]
    intents = await asyncio.gather(*(look_up(o["pi"]) for _, o in with_intent))
    for (order_id, order), intent in zip(with_intent, intents, strict=True):
        if intent is None:
            report.found("unknown-at-gateway", order_id, f"{order['pi']}, order {order['state']}")
            continue
        state = await _compare_payment(
            redis, sale_id, order_id, order["state"], intent, report, repair
        )
        if state == "refund_pending":
            detail = f"{intent.id} {intent.amount} {intent.currency}"
            await _refund_owed(redis, gateway, sale_id, order_id, intent.id, detail, report, repair)
    return report


def _standing(seen: tuple[int, Intent] | None, created: int, intent: Intent) -> tuple[int, Intent]:
    """Of two states of one intent from its events (created, intent), the one that stands: a
    succeeded or canceled intent never changes again; otherwise the later event's."""
    candidate = (created, intent)
    if seen is None:
        return candidate
    return max(seen, candidate, key=lambda pair: (pair[1].status in FINAL_STATUSES, pair[0]))


async def _since_cursor(
    redis: Redis, db: asyncpg.Pool, gateway: PaymentGateway, sale_id: str, repair: bool
) -> ReconcileReport:
    report = ReconcileReport(sale_id)
    keys = sale_keys(sale_id)
    started = int(time.time())
    cursor = await redis.get(keys.reconciled)
    # Never further back than the gateway's retry window: a sale retired for weeks and put
    # back (a late refund) must not page through weeks of the account's events in one job.
    since = max(int(cursor) - CURSOR_OVERLAP_S if cursor else 0, started - LOOK_BACK_S)

    touched: set[str] = set()
    intents: dict[str, tuple[int, Intent]] = {}  # order id -> its intent as events leave it
    async for page in events_since(gateway, since):
        events = _sale_events(page, sale_id)
        await _missed_webhooks(db, redis, gateway, events, report, repair)
        for event in events:
            obj = event["data"]["object"]
            order_id = obj["metadata"]["order_id"]
            touched.add(order_id)
            if event["type"].startswith("payment_intent."):
                seen = intents.get(order_id)
                intents[order_id] = _standing(seen, event["created"], intent_of(obj))

    # Read after the events: a missed webhook received above has changed its order.
    names = sorted(touched)
    async with redis.pipeline(transaction=False) as pipe:
        for order_id in names:
            pipe.hgetall(keys.order(order_id))
        read = await pipe.execute()
    orders = {oid: o for oid, o in zip(names, read, strict=True) if o}
    if orders:
        await _compare_ledger(db, redis, sale_id, orders, report, repair, every_order=False)

    for order_id, (_, intent) in intents.items():
        order = orders.get(order_id)
        if order is None or order.get("pi") != intent.id:
            continue  # confirm refuses an intent the order is not tied to; the receiver logs it
        if order["state"] == "paid" and intent.status != "succeeded":
            # The events read may all predate the success: the gateway itself decides.
            try:
                intent = await gateway.retrieve_intent(intent.id)
            except GatewayRefused:
                report.found("unknown-at-gateway", order_id, f"{intent.id}, order paid")
                continue
        await _compare_payment(redis, sale_id, order_id, order["state"], intent, report, repair)

    await _refunds_owed(redis, gateway, sale_id, report, repair)
    await redis.set(keys.reconciled, started)
    return report


async def _refunds_owed(
    redis: Redis, gateway: PaymentGateway, sale_id: str, report: ReconcileReport, repair: bool
) -> None:
    """Refunds the refunds job has owed for over ``REFUND_GRACE_MS``, from their index."""
    keys = sale_keys(sale_id)
    overdue = await redis_ms(redis) - REFUND_GRACE_MS
    owed: list[str] = await redis.zrangebyscore(
        keys.refunds, "-inf", overdue, start=0, num=REFUNDS_LISTED + 1
    )
    for order_id in owed[:REFUNDS_LISTED]:
        intent_id, amount, currency = await redis.hmget(
            keys.order(order_id), "pi", "amount", "currency"
        )
        detail = f"{intent_id} {amount} {currency}"
        await _refund_owed(redis, gateway, sale_id, order_id, intent_id, detail, report, repair)
    if len(owed) > REFUNDS_LISTED:
        more = await redis.zcount(keys.refunds, "-inf", overdue) - REFUNDS_LISTED
        report.found("refund-owed", "-", f"and {more} more refunds owed")


async def reconcile(
    redis: Redis,
    db: asyncpg.Pool,
    gateway: PaymentGateway,
    sale_id: str,
    repair: bool = False,
    full: bool = True,
) -> ReconcileReport:
    """Compare the sale across Redis, the ledger and the gateway: everything (``full``), or
    what changed at the gateway since the sale's cursor, which then moves on. Every difference
    found is logged and counted here, whoever ran it: the cursor moved on, so no later run
    finds it again."""
    if full:
        report = await _full(redis, db, gateway, sale_id, repair)
    else:
        report = await _since_cursor(redis, db, gateway, sale_id, repair)
    report.reported()
    return report
