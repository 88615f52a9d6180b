"""Operator routes under ``/v1/admin/`` that act on one order's money: each passes
``require_scope`` (``engine.http.adminauth``) and leaves an audit row."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from engine import inventory
from engine.http.adminauth import admin_action, require_scope
from engine.http.adminbodies import query_flag
from engine.http.bodies import JSONResponse
from engine.http.context import order_ids, services

__all__ = ["refund_order", "require_scope"]


async def _refund_order(request: Request, actor: str) -> Response:
    sale_id, order_id = order_ids(request)
    restock = query_flag(request, "restock", False)
    request.state.audit_detail = {"restock": restock}
    result = await inventory.refund(services(request).store, sale_id, order_id, "request", restock)
    # The refund at Stripe is made by a worker (or `flashsale order refund`); 202 says so.
    return JSONResponse({"id": order_id, "state": result.state}, status_code=202)


refund_order = admin_action("order.refund", "refunds:write", _refund_order)
