"""Webhook subscriptions under ``/v1/admin/webhooks/subscriptions``: create (the answer shows the
secret, once), list, show, update, rotate the secret, delete, and each one's deliveries.

Reading needs the scope ``webhooks:read``, changing ``webhooks:write`` (``require_scope``).
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from engine import subscriptions
from engine.errors import Unprocessable
from engine.http.adminauth import admin_action
from engine.http.adminbodies import json_object
from engine.http.bodies import JSONResponse
from engine.http.context import services

__all__ = [
    "MAX_DELIVERIES_PAGE",
    "MAX_SUBSCRIPTION_BYTES",
    "PATH",
    "create_subscription",
    "delete_subscription",
    "get_subscription",
    "list_deliveries",
    "list_subscriptions",
    "rotate_secret",
    "update_subscription",
]

# Where the routes live (app.route_table, and their part of the OpenAPI document).
PATH = "/v1/admin/webhooks/subscriptions"

# A URL of 2 KiB, every event type and a description fit many times over.
MAX_SUBSCRIPTION_BYTES = 8192
MAX_DELIVERIES_PAGE = 200


def _internal_ok(request: Request) -> bool:
    """Receivers on this machine or a private network: for development and tests only."""
    return services(request).settings.environment != "production"


def _subscription_id(request: Request) -> str:
    found: str = request.path_params["subscription_id"]
    return found


async def _create_subscription(request: Request, actor: str) -> Response:
    body = await json_object(request, None, MAX_SUBSCRIPTION_BYTES)
    found = services(request)
    created = await subscriptions.create_subscription(found.ledger, body, _internal_ok(request))
    return JSONResponse(created, status_code=201)


async def _list_subscriptions(request: Request, actor: str) -> Response:
    found = await subscriptions.list_subscriptions(services(request).ledger)
    return JSONResponse({"subscriptions": found})


async def _get_subscription(request: Request, actor: str) -> Response:
    db = services(request).ledger
    return JSONResponse(await subscriptions.get_subscription(db, _subscription_id(request)))


async def _update_subscription(request: Request, actor: str) -> Response:
    body = await json_object(request, None, MAX_SUBSCRIPTION_BYTES)
    db = services(request).ledger
    updated = await subscriptions.update_subscription(
        db, _subscription_id(request), body, _internal_ok(request)
    )
    return JSONResponse(updated)


async def _rotate_secret(request: Request, actor: str) -> Response:
    found = services(request)
    grace_s = found.settings.secret_grace_s
    rotated = await subscriptions.rotate_secret(found.ledger, _subscription_id(request), grace_s)
    return JSONResponse(rotated)


async def _delete_subscription(request: Request, actor: str) -> Response:
    subscription_id = _subscription_id(request)
    await subscriptions.delete_subscription(services(request).ledger, subscription_id)
    return JSONResponse({"id": subscription_id, "deleted": True})


async def _list_deliveries(request: Request, actor: str) -> Response:
    state = request.query_params.get("state")
    if state is not None and state not in subscriptions.DELIVERY_STATES:
        raise Unprocessable(
            "invalid-parameter",
            f"state must be one of {', '.join(subscriptions.DELIVERY_STATES)}",
        )
    raw_limit = request.query_params.get("limit", "50")
    digits = raw_limit.isascii() and raw_limit.isdigit() and len(raw_limit) <= 4
    if not digits or not 1 <= int(raw_limit) <= MAX_DELIVERIES_PAGE:
        raise Unprocessable(
            "invalid-parameter", f"limit must be an integer from 1 to {MAX_DELIVERIES_PAGE}"
        )
    found = await subscriptions.list_deliveries(
        services(request).ledger, _subscription_id(request), state, int(raw_limit)
    )
    return JSONResponse({"deliveries": found})


create_subscription = admin_action("subscription.create", "webhooks:write", _create_subscription)
list_subscriptions = admin_action("subscription.list", "webhooks:read", _list_subscriptions)
get_subscription = admin_action("subscription.show", "webhooks:read", _get_subscription)
update_subscription = admin_action("subscription.update", "webhooks:write", _update_subscription)
rotate_secret = admin_action("subscription.rotate-secret", "webhooks:write", _rotate_secret)
delete_subscription = admin_action("subscription.delete", "webhooks:write", _delete_subscription)
list_deliveries = admin_action("subscription.deliveries", "webhooks:read", _list_deliveries)
