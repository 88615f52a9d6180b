"""``POST /v1/webhooks/stripe``: Stripe's signed events, verified on the raw body."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from engine import webhooks
from engine.http.bodies import JSONResponse, read_body
from engine.http.context import services

__all__ = ["MAX_WEBHOOK_BYTES", "stripe_webhook"]

# Stripe's events are a few KiB; anything far larger is not one of theirs.
MAX_WEBHOOK_BYTES = 256 * 1024


async def stripe_webhook(request: Request) -> Response:
    found = services(request)
    body = await read_body(request, MAX_WEBHOOK_BYTES)
    event = webhooks.verify(
        body,
        request.headers.get("stripe-signature"),
        found.settings.webhook_secret or "",
        found.settings.webhook_tolerance_s,
    )
    outcome = await webhooks.receive(found.ledger, found.store, found.payments, event)
    return JSONResponse({"received": True, "outcome": outcome})
