"""Admin order routes under ``/v1/admin/orders``: search the ledger, show one order with its
history, cancel a hold. (Refunds: ``engine.http.admin``.) Each passes ``require_scope`` and
leaves an audit row (``engine.http.adminauth.admin_action``)."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from engine import inventory
from engine.errors import NotFound, Unprocessable
from engine.http import orders
from engine.http.adminauth import admin_action
from engine.http.adminbodies import page_cursor, page_limit
from engine.http.bodies import JSONResponse, stored_order_body
from engine.http.context import order_ids, services
from engine.ids import is_sale_id, is_user_id
from engine.inventory import ORDER_STATES

__all__ = ["cancel_order", "search_orders", "show_order"]

_ORDER_COLUMNS = (
    "id, sale_id, user_id, quantity, state, version, idempotency_key, payment_intent_id,"
    " created_at, expires_at, updated_at"
)


def _filter(request: Request, name: str, valid: Any) -> str | None:
    value = request.query_params.get(name)
    if value is not None and not valid(value):
        raise Unprocessable("invalid-query", f"{name} {value!r} is not valid")
    return value


async def _search_orders(request: Request, actor: str) -> Response:
    """The ledger's orders (ordered by id) of a sale, a shopper and/or a state, a page at a
    time: ``next_cursor`` is the ``cursor`` of the next page, null after the last."""
    sale = _filter(request, "sale_id", is_sale_id)
    user = _filter(request, "user_id", is_user_id)
    state = _filter(request, "state", ORDER_STATES.__contains__)
    cursor = page_cursor(request)
    limit = page_limit(request)
    # Only the filters given, so the planner can use the index each one has (a prepared
    # "$1 IS NULL OR ..." can be planned once for all of them, with none).
    given = {"sale_id": sale, "user_id": user, "state": state}
    values: list[object] = [cursor, limit + 1]
    where = ["id > $1"]
    for column, value in given.items():
        if value is not None:
            values.append(value)
            where.append(f"{column} = ${len(values)}")
    rows = await services(request).ledger.fetch(
        f"SELECT {_ORDER_COLUMNS} FROM orders WHERE {' AND '.join(where)} ORDER BY id LIMIT $2",
        *values,
    )
    page = [dict(row) for row in rows[:limit]]
    more = len(rows) > limit
    return JSONResponse({"orders": page, "next_cursor": page[-1]["id"] if more else None})


async def _show_order(request: Request, actor: str) -> Response:
    """The order as the ledger has it, every state it went through, and its live state in
    Redis (null once the sale is gone from Redis, or before the drain has it: either may lag)."""
    sale, order_id = order_ids(request)
    found = services(request)
    row = await found.ledger.fetchrow(
        f"SELECT {_ORDER_COLUMNS} FROM orders WHERE id = $1", order_id
    )
    live = await inventory.read_order(found.store, sale, order_id)
    if row is None and live is None:
        raise NotFound("order-not-found", f"there is no order {order_id!r}")
    events = await found.ledger.fetch(
        "SELECT version, state, at FROM order_events WHERE order_id = $1 ORDER BY version",
        order_id,
    )
    return JSONResponse(
        {
            "id": order_id,
            "sale_id": sale,
            "ledger": dict(row) if row is not None else None,
            "live": stored_order_body(live, sale) if live is not None else None,
            "events": [dict(event) for event in events],
        }
    )


async def _cancel_order(request: Request, actor: str) -> Response:
    """End a live hold as cancelled, whoever's it is (again: the same answer)."""
    return await orders.cancelled(request, None)


search_orders = admin_action("order.search", "orders:read", _search_orders)
show_order = admin_action("order.show", "orders:read", _show_order)
cancel_order = admin_action("order.cancel", "orders:write", _cancel_order)
