"""Sale routes: ``GET /v1/sales/{sale_id}`` (placing an order is ``engine.http.orderroute``)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from engine import inventory
from engine.errors import NotFound
from engine.http.bodies import JSONResponse, iso_ms
from engine.http.context import sale_id, services

__all__ = ["get_sale"]


async def get_sale(request: Request) -> Response:
    sale = sale_id(request)
    found = await inventory.read_sale(services(request).store, sale)
    if found is None:
        raise NotFound("sale-not-found", f"there is no sale {sale!r}")
    return JSONResponse(
        {
            "id": sale,
            "name": found.get("name", sale),
            "status": found["status"],
            "starts_at": iso_ms(int(found["start_ms"])),
            "ends_at": iso_ms(int(found["end_ms"])),
            "price": int(found["price"]),
            "currency": found["currency"],
            "per_user_limit": int(found["per_user_limit"]),
            "per_order_max": int(found["per_order_max"]),
            "hold_seconds": int(found["hold_ms"]) // 1000,
            "units_left": int(found["stock"]),
        }
    )
