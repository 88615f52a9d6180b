"""Stripe webhooks: verify the signature on the raw body, store the event by its id, apply it.

Stripe delivers at least once, in any order, for days. So:
- a duplicate event id stops at the ``webhook_events`` primary key and is acknowledged;
- every state change is a Lua script that refuses what the order has moved past (a failure
  after success changes nothing; success after expiry re-reserves or asks for a refund);
- an event that cannot be applied yet (the order is unknown to Redis, or a refund that
  arrived before the payment it refunds) stays stored with ``processed_at`` NULL and a worker
  applies it later: acknowledged, never lost;
- an event about no order of ours (another product on the same Stripe account) is stored as
  ``not-ours`` so it never clogs the retry queue.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson
import stripe
from redis.asyncio import Redis

from engine import inventory
from engine.checkout import end_hold_with_intent
from engine.errors import BadRequest, Conflict, NotFound
from engine.ids import sale_of_order
from engine.metrics import WEBHOOK_EVENTS
from engine.payments import GatewayUnavailable, PaymentGateway
from engine.scripts import Code

__all__ = ["HANDLED", "apply_event", "apply_pending", "reapply", "receive", "verify"]

log = logging.getLogger("flashsale.webhooks")

HANDLED = frozenset(
    {
        "payment_intent.succeeded",
        "payment_intent.payment_failed",
        "payment_intent.canceled",
        "charge.refunded",
    }
)


def verify(body: bytes, header: str | None, secret: str, tolerance_s: int) -> dict[str, Any]:
    """The event, if ``header`` signs ``body`` with ``secret`` within the tolerance."""
    if not header:
        raise BadRequest("invalid-signature", "the Stripe-Signature header is missing")
    try:
        stripe.WebhookSignature.verify_header(body.decode("utf-8"), header, secret, tolerance_s)
    # TypeError: hmac.compare_digest refuses a non-ASCII signature; it is just a bad one.
    except (stripe.SignatureVerificationError, UnicodeDecodeError, TypeError, ValueError) as exc:
        raise BadRequest("invalid-signature", f"bad webhook signature: {exc}") from None
    try:
        event = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise BadRequest("invalid-payload", "the webhook body is not JSON") from None
    if not (
        isinstance(event, dict)
        and isinstance(event.get("id"), str)
        and isinstance(event.get("type"), str)
        and isinstance(event.get("created"), int)
        and isinstance(event.get("data", {}).get("object"), dict)
    ):
        raise BadRequest("invalid-payload", "not a Stripe event (id, type, created, data.object)")
    return event


def _ids(event: dict[str, Any]) -> tuple[str | None, str | None]:
    """(order id, payment intent id) the event is about, when it says."""
    obj = event["data"]["object"]
    metadata = obj.get("metadata") or {}
    if event["type"].startswith("payment_intent."):
        return metadata.get("order_id"), obj.get("id")
    return metadata.get("order_id"), obj.get("payment_intent")


async def _resolve(db: asyncpg.Pool, event: dict[str, Any]) -> tuple[str | None, str | None]:
    order_id, intent_id = _ids(event)
    if order_id is None and intent_id is not None and event["type"] == "charge.refunded":
        # A charge carries the intent, not our metadata: the ledger knows whose it is.
        order_id = await db.fetchval(
            "SELECT order_id FROM payments WHERE intent_id = $1", intent_id
        )
    return order_id, intent_id


async def receive(
    db: asyncpg.Pool, redis: Redis, gateway: PaymentGateway, event: dict[str, Any]
) -> str:
    """Store, then apply. Returns what happened: duplicate, ignored, pending or an outcome."""
    order_id, intent_id = await _resolve(db, event)
    stored = await db.fetchval(
        """
        INSERT INTO webhook_events (id, type, created_at, order_id, intent_id, payload)
        VALUES ($1, $2, $3, $4, $5, $6::jsonb)
        ON CONFLICT (id) DO NOTHING
        RETURNING id
        """,
        event["id"],
        event["type"],
        datetime.fromtimestamp(event["created"], tz=UTC),
        order_id,
        intent_id,
        orjson.dumps(event).decode(),
    )
    if stored is None:
        WEBHOOK_EVENTS.labels(event["type"], "duplicate").inc()
        return "duplicate"
    outcome = await apply_event(redis, gateway, event, order_id, intent_id)
    WEBHOOK_EVENTS.labels(event["type"], outcome).inc()
    if outcome != "pending":
        await db.execute(
            "UPDATE webhook_events SET processed_at = now(), outcome = $2 WHERE id = $1",
            event["id"],
            outcome,
        )
    return outcome


async def apply_event(
    redis: Redis,
    gateway: PaymentGateway,
    event: dict[str, Any],
    order_id: str | None,
    intent_id: str | None,
) -> str:
    """Apply one event to Redis; 'pending' when it cannot be applied yet."""
    kind = event["type"]
    if kind not in HANDLED:
        return "ignored"
    sale_id = sale_of_order(order_id) if order_id else None
    if kind == "charge.refunded" and order_id is None and intent_id:
        return "pending"  # perhaps ours, and the ledger has not got the payment yet
    if sale_id is None or order_id is None or not intent_id:
        return "not-ours"
    try:
        if kind == "payment_intent.succeeded":
            result = await inventory.confirm(
                redis, sale_id, order_id, intent_id, event["created"] * 1000
            )
            if result.code is Code.PAYMENT_MISMATCH:
                # Money on an intent the order is not tied to: Stripe's idempotency key makes
                # this near impossible; it is logged for reconciliation, never kept silently.
                log.error(
                    "payment %s succeeded for %s, tied to another intent", intent_id, order_id
                )
                return "foreign-intent"
            return result.state if result.code is not Code.STALE else "stale"
        order = await inventory.read_order(redis, sale_id, order_id)
        if order is None:
            return "pending"
        if kind in ("payment_intent.payment_failed", "payment_intent.canceled"):
            # Only the intent tied to the order speaks for it; an old one is noise.
            if order.get("pi") != intent_id or order["state"] != "reserved":
                return order["state"]
            failed = kind == "payment_intent.payment_failed"
            return await _fail(redis, gateway, sale_id, order_id, intent_id, failed)
        # charge.refunded: money went back (perhaps from Stripe's dashboard).
        charge = event["data"]["object"]
        if charge.get("refunded") is False:
            return "partial-refund"  # the order stands; reconcile shows the amount
        if order["state"] not in ("paid", "refund_pending", "refunded"):
            return "pending"  # the payment it refunds has not reached us yet
        requested = await inventory.refund(redis, sale_id, order_id, "request")
        if requested.state == "refunded":
            return "refunded"
        done = await inventory.refund(redis, sale_id, order_id, "complete")
        return done.state
    except NotFound:
        return "pending"
    except Conflict:
        return "ignored"


async def _fail(
    redis: Redis,
    gateway: PaymentGateway,
    sale_id: str,
    order_id: str,
    intent_id: str,
    payment_failed: bool,
) -> str:
    """A failed attempt (or an intent cancelled at the gateway) ends the hold, but a failure
    event can be older than a retry the shopper made since: the gateway's answer to a cancel
    decides. ``payment_failed``: the event says the payment failed (counted)."""
    try:
        return await end_hold_with_intent(
            redis, gateway, sale_id, order_id, intent_id, "failed", payment_failed
        )
    except GatewayUnavailable:
        return "pending"


async def apply_pending(
    db: asyncpg.Pool, redis: Redis, gateway: PaymentGateway, older_than_s: float = 5.0
) -> int:
    """Apply stored events that could not be applied when they arrived. Returns how many.

    Stripe retries for three days; an event still unapplicable after that is given up on
    (outcome ``gave-up``, logged) so it cannot hold the queue forever."""
    rows = await db.fetch(
        """
        SELECT id, payload, received_at < now() - interval '3 days' AS too_old
        FROM webhook_events
        WHERE processed_at IS NULL AND received_at < now() - make_interval(secs => $1)
        ORDER BY received_at LIMIT 500
        """,
        older_than_s,
    )
    applied = 0
    for row in rows:
        event = orjson.loads(row["payload"])
        order_id, intent_id = await _resolve(db, event)
        outcome = await apply_event(redis, gateway, event, order_id, intent_id)
        if outcome == "pending":
            if not row["too_old"]:
                continue
            log.error("webhook event %s could not be applied in 3 days", row["id"])
            outcome = "gave-up"
        await db.execute(
            "UPDATE webhook_events SET processed_at = now(), outcome = $2, order_id = $3"
            " WHERE id = $1",
            row["id"],
            outcome,
            order_id,
        )
        applied += 1
    return applied


async def reapply(
    db: asyncpg.Pool, redis: Redis, gateway: PaymentGateway, event_id: str
) -> str | None:
    """Apply a stored event again (an operator's retry) and record the outcome; None when no
    event has that id. Applying is idempotent, so a re-applied event changes only what is still
    due: an order already past it stays as it is."""
    payload = await db.fetchval("SELECT payload FROM webhook_events WHERE id = $1", event_id)
    if payload is None:
        return None
    event = orjson.loads(payload)
    order_id, intent_id = await _resolve(db, event)
    outcome = await apply_event(redis, gateway, event, order_id, intent_id)
    await db.execute(
        "UPDATE webhook_events SET processed_at = CASE WHEN $2 = 'pending' THEN NULL"
        " ELSE now() END, outcome = $2, order_id = $3 WHERE id = $1",
        event_id,
        outcome,
        order_id,
    )
    return outcome
