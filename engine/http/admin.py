"""Operator routes under ``/v1/admin/``, each behind ``require_admin``."""

from __future__ import annotations

import hmac

from starlette.requests import Request
from starlette.responses import Response

from engine import inventory
from engine.errors import Unauthorized
from engine.http.bodies import JSONResponse
from engine.http.context import order_ids, services

__all__ = ["refund_order", "require_scope"]


def require_scope(request: Request, scope: str) -> str:
    """Who is acting (for the audit), or 401 unless the request may do ``scope`` (for instance
    ``sales:read``, ``refunds:write``). Today: the bearer token ``FLASHSALE_ADMIN_TOKEN`` may do
    everything; without a configured token every admin route refuses everyone."""
    expected = services(request).settings.admin_token
    given = request.headers.get("authorization", "")
    # Compared in constant time: the token is the whole of the admin's credential.
    if not expected or not hmac.compare_digest(given.encode(), f"Bearer {expected}".encode()):
        raise Unauthorized("an admin bearer token is required")
    return "admin-token"


async def refund_order(request: Request) -> Response:
    require_scope(request, "refunds:write")
    sale_id, order_id = order_ids(request)
    restock = request.query_params.get("restock", "false") == "true"
    result = await inventory.refund(services(request).store, sale_id, order_id, "request", restock)
    # The refund at Stripe is made by a worker (or `flashsale order refund`); 202 says so.
    return JSONResponse({"id": order_id, "state": result.state}, status_code=202)
