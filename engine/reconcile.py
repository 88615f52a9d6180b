"""Reconciliation: compare Redis (live truth), Postgres (ledger) and the payment gateway.

Each difference has a kind, the order, what was seen, and what ``--repair`` does about it:

| kind                      | repair                                                      |
| ------------------------- | ----------------------------------------------------------- |
| outbox-backlog            | none: the ledger is still catching up; run again later      |
| missing-in-ledger         | write Redis's state of the order into the ledger            |
| state-mismatch            | write Redis's (newer) state into the ledger                 |
| unknown-in-ledger         | none (manual): the ledger has an order Redis does not       |
| paid-at-gateway-not-here  | confirm: paid, re-reserved, or refund_pending               |
| paid-here-not-at-gateway  | none (manual): never release a sale on a gateway's word     |
| refund-owed               | refund at the gateway, then mark refunded                   |
| missed-webhook            | receive the event now, as if Stripe had delivered it        |

Stripe's recent events (three days: its retry window) are compared with ``webhook_events``.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import asyncpg
from redis.asyncio import Redis

from engine import inventory
from engine.invariants import outbox_backlog, redis_orders
from engine.ledger import pack_change, write_changes
from engine.payments import Intent, PaymentGateway
from engine.webhooks import HANDLED, receive

__all__ = ["Difference", "ReconcileReport", "reconcile"]

UNPAID_STATES = ("reserved", "expired", "cancelled", "failed")


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


def _change(order: dict[str, str]) -> str:
    """An order hash as the outbox would carry its latest change (the hash names the values
    as the change does, but for its id and its last change's time)."""
    return pack_change({**order, "order": order["id"], "at_ms": order["updated_ms"]})


async def reconcile(
    redis: Redis, db: asyncpg.Pool, gateway: PaymentGateway, sale_id: str, repair: bool = False
) -> ReconcileReport:
    report = ReconcileReport(sale_id)
    found = report.differences.append
    orders = await redis_orders(redis, sale_id)
    rows = await db.fetch("SELECT id, state, version FROM orders WHERE sale_id = $1", sale_id)
    ledger = {r["id"]: (r["state"], r["version"]) for r in rows}

    backlog = await outbox_backlog(redis, sale_id)
    if backlog:
        found(Difference("outbox-backlog", "-", f"{backlog} outbox entries not yet in the ledger"))
    else:
        stale = []
        for order_id, order in orders.items():
            if order_id not in ledger:
                found(Difference("missing-in-ledger", order_id, f"redis {order['state']}"))
                stale.append(order)
            elif ledger[order_id] != (order["state"], int(order["version"])):
                state, version = ledger[order_id]
                found(
                    Difference(
                        "state-mismatch",
                        order_id,
                        f"redis {order['state']} v{order['version']}, ledger {state} v{version}",
                    )
                )
                stale.append(order)
        for order_id in ledger.keys() - orders.keys():
            found(Difference("unknown-in-ledger", order_id, f"ledger {ledger[order_id][0]}"))
        if repair and stale:
            await write_changes(db, sale_id, [_change(o) for o in stale])
            report.repaired.append(f"wrote {len(stale)} orders from Redis into the ledger")

    gate = asyncio.Semaphore(8)

    async def look_up(intent_id: str) -> Intent:
        async with gate:
            return await gateway.retrieve_intent(intent_id)

    # Events the gateway sent about this sale's orders that never reached the receiver.
    events = [
        e
        for e in await gateway.recent_events(int(time.time()) - 3 * 86_400)
        if e.get("type") in HANDLED
        and str((e["data"]["object"].get("metadata") or {}).get("order_id", "")).startswith(
            sale_id + "."
        )
    ]
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
        found(Difference("missed-webhook", order_id, f"{event['type']} {event['id']}"))
        if repair:
            outcome = await receive(db, redis, gateway, event)
            report.repaired.append(f"{order_id}: received {event['id']} late: {outcome}")

    orders = await redis_orders(redis, sale_id) if repair and events else orders
    with_intent = [(oid, o) for oid, o in orders.items() if o.get("pi")]
    intents = await asyncio.gather(*(look_up(o["pi"]) for _, o in with_intent))
    for (order_id, order), intent in zip(with_intent, intents, strict=True):
        state = order["state"]
        if intent.status == "succeeded" and state in UNPAID_STATES:
            found(
                Difference(
                    "paid-at-gateway-not-here", order_id, f"{intent.id} succeeded, order {state}"
                )
            )
            if repair:
                result = await inventory.confirm(redis, sale_id, order_id, intent.id)
                report.repaired.append(f"{order_id}: confirmed, now {result.state}")
                state = result.state
        elif state == "paid" and intent.status != "succeeded":
            found(
                Difference("paid-here-not-at-gateway", order_id, f"{intent.id} is {intent.status}")
            )
        if state == "refund_pending":
            found(
                Difference(
                    "refund-owed", order_id, f"{intent.id} {intent.amount} {intent.currency}"
                )
            )
            if repair:
                refund_id = await gateway.refund(intent.id, order_id)
                await inventory.refund(redis, sale_id, order_id, "complete", refund_id=refund_id)
                report.repaired.append(f"{order_id}: refunded ({refund_id})")
    return report
