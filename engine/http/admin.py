"""Operator routes under ``/v1/admin/``, each behind ``require_admin``."""

from __future__ import annotations

import hmac

from starlette.requests import Request
from starlette.responses import Response

from engine import inventory
from engine.errors import Unauthorized
from engine.http.bodies import JSONResponse
from engine.http.context import order_ids, services

__all__ = ["refund_order"]


def require_admin(request: Request) -> None:
    """401 unless the request carries ``FLASHSALE_ADMIN_TOKEN`` as its bearer token; without a
    configured token every admin route refuses everyone."""
    expected = services(request).settings.admin_token
    given = request.headers.get("authorization", "")
    # Compared in constant time: the token is the whole of the admin's credential.
    if not expected or not hmac.compare_digest(given.encode(), f"Bearer {expected}".encode()):
        raise Unauthorized("an admin bearer token is required")


async def refund_order(request: Request) -> Response:
    require_admin(request)
    sale_id, order_id = order_ids(request)
    restock = request.query_params.get("restock", "false") == "true"
    result = await inventory.refund(services(request).store, sale_id, order_id, "request", restock)
    # The refund at Stripe is made by a worker (or `flashsale order refund`); 202 says so.
    return JSONResponse({"id": order_id, "state": result.state}, status_code=202)
