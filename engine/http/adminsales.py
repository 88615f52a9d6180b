"""Admin sale routes under ``/v1/admin/sales``: create, list, show, amend before the start,
pause, resume, close and restock. Each passes ``require_scope`` and leaves an audit row
(``engine.http.adminauth.admin_action``)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from engine import inventory, restock, sales
from engine.errors import Conflict, NotFound, Unprocessable
from engine.http.adminauth import admin_action
from engine.http.adminbodies import json_object, page_cursor, page_limit, positive_int, time_ms
from engine.http.bodies import JSONResponse
from engine.http.context import sale_id, services
from engine.http.soldout import SoldOutMemory
from engine.keys import sale_keys
from engine.scripts import SCRIPTS, Code

__all__ = [
    "amend_sale",
    "close_sale",
    "create_sale",
    "list_sales",
    "pause_sale",
    "restock_sale",
    "resume_sale",
    "show_sale",
]

_amend = SCRIPTS["amend_sale"]

_CREATE_FIELDS = {"id", *sales.DEFINITION_FIELDS}
# What may change before the start, with its column in Postgres and its field in Redis.
_AMENDABLE = {
    "name": ("name", "name"),
    "price": ("price", "price"),
    "per_user_limit": ("per_user_limit", "per_user_limit"),
    "per_order_max": ("per_order_max", "per_order_max"),
    "hold_seconds": ("hold_seconds", "hold_ms"),
    "starts_at": ("starts_at", "start_ms"),
    "ends_at": ("ends_at", "end_ms"),
    "stock_low_units": ("stock_low_units", "stock_low_units"),
}


async def _create_sale(request: Request, actor: str) -> Response:
    body = await json_object(request, _CREATE_FIELDS)
    request.state.audit_target = body.get("id")
    name, currency, status = body.get("name"), body.get("currency"), body.get("status")
    if not isinstance(body.get("id"), str):
        raise Unprocessable("invalid-body", "id must be a string")
    for text in (name, currency, status):
        if text is not None and not isinstance(text, str):
            raise Unprocessable("invalid-body", "name, currency and status are strings")
    limit = positive_int(body, "per_user_limit")
    definition = inventory.SaleDefinition(
        id=body["id"],
        name=name or body["id"],
        stock=positive_int(body, "stock", minimum=0),
        price=positive_int(body, "price", minimum=0),
        currency="usd" if currency is None else currency,
        per_user_limit=limit,
        per_order_max=positive_int(body, "per_order_max") if "per_order_max" in body else limit,
        hold_seconds=(
            positive_int(body, "hold_seconds")
            if "hold_seconds" in body
            else services(request).settings.hold_seconds
        ),
        start_ms=time_ms(body, "starts_at"),
        end_ms=time_ms(body, "ends_at"),
        status=status or "open",
        stock_low_units=(
            positive_int(body, "stock_low_units", minimum=0) if "stock_low_units" in body else None
        ),
    )
    found = services(request)
    created = await sales.create_sale(found.ledger, found.store, definition)
    report = await sales.sale_report(found.ledger, found.store, definition.id)
    return JSONResponse(report, status_code=201 if created else 200)


async def _list_sales(request: Request, actor: str) -> Response:
    cursor = page_cursor(request)
    limit = page_limit(request)
    rows = await services(request).ledger.fetch(
        "SELECT * FROM sales WHERE id > $1 ORDER BY id LIMIT $2", cursor, limit + 1
    )
    page = [dict(row) for row in rows[:limit]]
    more = len(rows) > limit
    return JSONResponse({"sales": page, "next_cursor": page[-1]["id"] if more else None})


async def _show_sale(request: Request, actor: str) -> Response:
    sale = sale_id(request)
    found = services(request)
    report = await sales.sale_report(found.ledger, found.store, sale)
    report["ledger_restocked"] = await restock.restocked_units(found.ledger, sale)
    return JSONResponse(report)


async def _amend_sale(request: Request, actor: str) -> Response:
    sale = sale_id(request)
    body = await json_object(request, set(_AMENDABLE))
    if not body:
        raise Unprocessable("invalid-body", f"give any of {', '.join(sorted(_AMENDABLE))}")
    request.state.audit_detail = body
    found = services(request)
    row = await found.ledger.fetchrow("SELECT * FROM sales WHERE id = $1", sale)
    if row is None:
        raise NotFound("sale-not-found", f"there is no sale {sale!r}")
    values: dict[str, Any] = {}
    for name in body:
        if name in ("starts_at", "ends_at"):
            values[name] = time_ms(body, name)
        elif name == "name":
            if not isinstance(body[name], str) or not body[name]:
                raise Unprocessable("invalid-body", "name must be a non-empty string")
            values[name] = body[name]
        else:
            low = name in ("price", "stock_low_units")
            values[name] = positive_int(body, name, minimum=0 if low else 1)
    start = values.get("starts_at", int(row["starts_at"].timestamp() * 1000))
    end = values.get("ends_at", int(row["ends_at"].timestamp() * 1000))
    sales.validate(
        inventory.SaleDefinition(
            id=sale,
            name=values.get("name", row["name"]),
            stock=row["stock"],
            price=values.get("price", row["price"]),
            currency=row["currency"],
            per_user_limit=values.get("per_user_limit", row["per_user_limit"]),
            per_order_max=values.get("per_order_max", row["per_order_max"]),
            hold_seconds=values.get("hold_seconds", row["hold_seconds"]),
            start_ms=start,
            end_ms=end,
        )
    )
    fields: list[str | int] = []
    for name, value in values.items():
        redis_field = _AMENDABLE[name][1]
        fields += [redis_field, value * 1000 if redis_field == "hold_ms" else value]
    # Built before Redis changes, so nothing in them can fail after it did.
    times = {"starts_at", "ends_at"}
    ledger_values = [
        datetime.fromtimestamp(v / 1000, tz=UTC) if k in times else v for k, v in values.items()
    ]
    reply = await _amend(found.store, [sale_keys(sale).sale], fields)
    code = Code(reply[0])
    if code is Code.SALE_NOT_FOUND:
        raise NotFound("sale-not-found", f"there is no sale {sale!r} in Redis")
    if code is Code.INVALID_STATE:
        raise Conflict("sale-started", f"the sale is {reply[1]}: its terms can no longer change")
    assignments = ", ".join(f"{_AMENDABLE[name][0]} = ${i}" for i, name in enumerate(values, 2))
    await found.ledger.execute(
        f"UPDATE sales SET {assignments}, updated_at = now() WHERE id = $1", sale, *ledger_values
    )
    return JSONResponse(await sales.sale_report(found.ledger, found.store, sale))


def _status_route(status: str) -> Any:
    async def change(request: Request, actor: str) -> Response:
        sale = sale_id(request)
        found = services(request)
        previous = await sales.change_status(found.ledger, found.store, sale, status)
        request.state.audit_detail = {"from": previous, "to": status}
        return JSONResponse({"id": sale, "status": status, "previous_status": previous})

    change.__name__ = f"{status}_sale"
    return change


async def _restock_sale(request: Request, actor: str) -> Response:
    sale = sale_id(request)
    body = await json_object(request, {"units"})
    units = positive_int(body, "units")
    request.state.audit_detail = {"units": units}
    result = await restock.restock(services(request).store, sale, units, actor)
    # This process's sold-out memory lets go at once; other processes' at their next view read
    # (FLASHSALE_SOLD_OUT_REFRESH_MS).
    memory: SoldOutMemory = request.app.state.order_route.sold_out
    memory.stock_back(sale)
    return JSONResponse(
        {
            "id": sale,
            "units_added": units,
            "available": result.available,
            "initial_stock": result.initial_stock,
        }
    )


create_sale = admin_action("sale.create", "sales:write", _create_sale)
list_sales = admin_action("sale.list", "sales:read", _list_sales)
show_sale = admin_action("sale.show", "sales:read", _show_sale)
amend_sale = admin_action("sale.amend", "sales:write", _amend_sale)
pause_sale = admin_action("sale.pause", "sales:write", _status_route("paused"))
resume_sale = admin_action("sale.resume", "sales:write", _status_route("open"))
close_sale = admin_action("sale.close", "sales:write", _status_route("closed"))
restock_sale = admin_action("sale.restock", "sales:write", _restock_sale)
