"""Admin routes for the engine's checks and its inbound Stripe events: run a sale's reconcile
and read its last report; list stored Stripe webhook events and apply one again. Each passes
``require_scope`` and leaves an audit row (``engine.http.adminauth.admin_action``)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from engine import inventory, webhooks
from engine.errors import NotFound, Unavailable, Unprocessable
from engine.http.adminauth import admin_action
from engine.http.adminbodies import page_limit, query_flag
from engine.http.bodies import JSONResponse
from engine.http.context import sale_id, services
from engine.keys import sale_keys
from engine.payments import GatewayUnavailable
from engine.reconcile import reconcile

__all__ = ["apply_stripe_event", "last_reconcile", "list_stripe_events", "run_reconcile"]

# A report stays readable this long after its run: long enough to compare with the next day's.
REPORT_TTL_S = 7 * 86_400


async def _run_reconcile(request: Request, actor: str) -> Response:
    """Compare the sale across Redis, the ledger and the gateway (everything with ``full``, else
    what changed at the gateway since its cursor), repair with ``repair``, and keep the report."""
    sale = sale_id(request)
    # The cursor comparison by default: the whole sweep reads every intent at the gateway, at
    # the shoppers' priority, and is for audits (full=true) of a sale that is over.
    full, repair = query_flag(request, "full", False), query_flag(request, "repair", False)
    found = services(request)
    if await inventory.read_sale(found.store, sale) is None:
        raise NotFound("sale-not-found", f"there is no sale {sale!r} in Redis")
    try:
        report = await reconcile(found.store, found.ledger, found.payments, sale, repair, full)
    except GatewayUnavailable:
        raise Unavailable(
            "payment-unavailable", "the payment gateway did not answer; run it again later"
        ) from None
    body = {
        "sale_id": sale,
        "ran_at": datetime.now().astimezone().isoformat(),
        "ran_by": actor,
        "full": full,
        "repair": repair,
        "differences": [
            {"kind": d.kind, "order_id": d.order_id, "detail": d.detail} for d in report.differences
        ],
        "repaired": report.repaired,
    }
    request.state.audit_detail = {
        "full": full,
        "repair": repair,
        "differences": len(report.differences),
    }
    await found.store.set(sale_keys(sale).reconcile_report, orjson.dumps(body), ex=REPORT_TTL_S)
    return JSONResponse(body)


async def _last_reconcile(request: Request, actor: str) -> Response:
    sale = sale_id(request)
    stored = await services(request).store.get(sale_keys(sale).reconcile_report)
    if stored is None:
        raise NotFound("report-not-found", f"no reconcile of {sale!r} has run in the last 7 days")
    report: dict[str, Any] = orjson.loads(stored)
    return JSONResponse(report)


async def _list_stripe_events(request: Request, actor: str) -> Response:
    """Stored events, newest first, a page at a time; ``pending=true``: only those not applied."""
    pending = query_flag(request, "pending", False)
    cursor = request.query_params.get("cursor")
    limit = page_limit(request)
    # The cursor is the last page's last event: received_at then id, so a page boundary inside
    # one instant loses nothing.
    after: tuple[datetime, str] | None = None
    if cursor is not None:
        stamp, _, event_id = cursor.partition("~")
        try:
            after = (datetime.fromisoformat(stamp), event_id)
        except ValueError:
            raise Unprocessable("invalid-query", "cursor is not one this API gave") from None
    rows = await services(request).ledger.fetch(
        """
        SELECT id, type, created_at, order_id, intent_id, received_at, processed_at, outcome
        FROM webhook_events
        WHERE (NOT $1 OR processed_at IS NULL)
          AND ($2::timestamptz IS NULL OR (received_at, id) < ($2, $3))
        ORDER BY received_at DESC, id DESC LIMIT $4
        """,
        pending,
        after[0] if after else None,
        after[1] if after else "",
        limit + 1,
    )
    # JSONResponse writes datetimes as ISO 8601 (orjson), as the cursor does here.
    page = [dict(row) for row in rows[:limit]]
    more = len(rows) > limit
    next_cursor = f"{page[-1]['received_at'].isoformat()}~{page[-1]['id']}" if more else None
    return JSONResponse({"events": page, "next_cursor": next_cursor})


async def _apply_stripe_event(request: Request, actor: str) -> Response:
    event_id: str = request.path_params["event_id"]
    found = services(request)
    outcome = await webhooks.reapply(found.ledger, found.store, found.payments, event_id)
    if outcome is None:
        raise NotFound("event-not-found", f"no Stripe event {event_id!r} is stored")
    request.state.audit_detail = {"outcome": outcome}
    return JSONResponse({"id": event_id, "outcome": outcome})


run_reconcile = admin_action("reconcile.run", "reconcile:run", _run_reconcile)
last_reconcile = admin_action("reconcile.show", "reconcile:run", _last_reconcile)
list_stripe_events = admin_action("stripe-event.list", "webhooks:read", _list_stripe_events)
apply_stripe_event = admin_action("stripe-event.apply", "webhooks:write", _apply_stripe_event)
