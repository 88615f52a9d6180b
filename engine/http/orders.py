"""A shopper's own orders: read, cancel, pay. Each needs the shopper's bearer token."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from engine import checkout, inventory
from engine.errors import Conflict, NotFound
from engine.http.bodies import JSONResponse, stored_order_body
from engine.http.context import order_ids, services
from engine.scripts import Code

__all__ = ["cancel_order", "cancelled", "get_order", "pay_order"]


async def get_order(request: Request) -> Response:
    found = services(request)
    user = found.verifier.user_of(request.headers.get("authorization"))
    sale_id, order_id = order_ids(request)
    order = await inventory.read_order(found.store, sale_id, order_id)
    # Someone else's order answers exactly like a missing one: ids are not secrets, but who
    # bought what is.
    if order is None or order["user"] != user:
        raise NotFound("order-not-found", f"there is no order {order_id!r}")
    return JSONResponse(stored_order_body(order, sale_id))


async def cancel_order(request: Request) -> Response:
    found = services(request)
    user = found.verifier.user_of(request.headers.get("authorization"))
    return await cancelled(request, user)


async def cancelled(request: Request, owner: str | None) -> Response:
    """End the path's order as cancelled (``owner``: only if it is theirs; None: anyone's, for
    an admin) and answer it; cancelling again answers the same."""
    store = services(request).store
    sale_id, order_id = order_ids(request)
    result = await inventory.release(store, sale_id, order_id, "cancelled", owner)
    if result.code is Code.ALREADY_FINAL and result.state != "cancelled":
        raise Conflict(
            "order-not-cancellable",
            f"the order is {result.state} and can no longer be cancelled",
            state=result.state,
        )
    order = await inventory.read_order(store, sale_id, order_id)
    assert order is not None  # orders are never deleted while their sale is live
    return JSONResponse(stored_order_body(order, sale_id))


async def pay_order(request: Request) -> Response:
    found = services(request)
    user = found.verifier.user_of(request.headers.get("authorization"))
    sale_id, order_id = order_ids(request)
    payment = await checkout.payment_for(found.store, found.payments, sale_id, order_id, user)
    return JSONResponse(payment)
