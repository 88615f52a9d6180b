"""The admin operations of the OpenAPI document (``engine.http.openapi``): every route under
``/v1/admin/``, the scope it needs and the problem codes it can answer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["admin_paths"]

# Every admin route meets these: no credential, a customer's token, a key without the scope,
# and a store that is down.
_AUTH = ("invalid-token", "admin-role-required", "insufficient-scope", "not-ready")
_BODY = ("body-too-large", "invalid-body")
_ADMIN: list[dict[str, list[str]]] = [{"admin": []}]

_OBJECT = {"type": "object"}
_SALE_BODY = {
    "type": "object",
    "required": ["id", "stock", "price", "per_user_limit", "starts_at", "ends_at"],
    "additionalProperties": False,
    "properties": {
        "id": {"type": "string", "description": "a-z, 0-9 and '-', at most 48"},
        "name": {"type": "string"},
        "stock": {"type": "integer", "minimum": 0},
        "price": {"type": "integer", "minimum": 0, "description": "Minor units."},
        "currency": {"type": "string", "default": "usd"},
        "per_user_limit": {"type": "integer", "minimum": 1},
        "per_order_max": {"type": "integer", "minimum": 1},
        "hold_seconds": {"type": "integer", "minimum": 1},
        "starts_at": {"type": "string", "format": "date-time"},
        "ends_at": {"type": "string", "format": "date-time"},
        "status": {"enum": ["open", "paused"], "default": "open"},
        "stock_low_units": {
            "type": "integer",
            "minimum": 0,
            "description": "stock.low at this many units available (default "
            "FLASHSALE_STOCK_LOW_UNITS)",
        },
    },
}
_AMEND_BODY = {
    "type": "object",
    "minProperties": 1,
    "additionalProperties": False,
    "properties": {
        name: _SALE_BODY["properties"][name]  # type: ignore[index]
        for name in (
            "name",
            "price",
            "per_user_limit",
            "per_order_max",
            "hold_seconds",
            "starts_at",
            "ends_at",
            "stock_low_units",
        )
    },
}
_RESTOCK_BODY = {
    "type": "object",
    "required": ["units"],
    "additionalProperties": False,
    "properties": {"units": {"type": "integer", "minimum": 1, "maximum": 1_000_000}},
}

Operation = Callable[..., dict[str, Any]]
Parameter = Callable[..., dict[str, Any]]


def admin_paths(
    operation: Operation,
    parameter: Parameter,
    sale_id: dict[str, Any],
    order_id: dict[str, Any],
    restock: dict[str, Any],
) -> dict[str, Any]:
    """The admin paths, built with the document's own ``operation`` and ``parameter``."""

    def admin(
        op_id: str,
        summary: str,
        scope: str,
        status: str,
        answer: str,
        codes: tuple[str, ...],
        *,
        body: dict[str, Any] | None = None,
        parameters: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        extra: dict[str, Any] = {"security": _ADMIN, "x-scope": scope}
        if parameters:
            extra["parameters"] = parameters
        if body is not None:
            extra["requestBody"] = {
                "required": True,
                "description": "At most FLASHSALE_MAX_BODY_BYTES bytes.",
                "content": {"application/json": {"schema": body}},
            }
        answers = {
            status: {"description": answer, "content": {"application/json": {"schema": _OBJECT}}}
        }
        return operation(
            op_id, "admin", f"{summary} (scope {scope})", answers, (*_AUTH, *codes), **extra
        )

    def query(name: str, description: str, schema: dict[str, Any] | None = None) -> Any:
        return parameter(name, "query", schema or {"type": "string"}, description, required=False)

    page = [
        query("cursor", "The next_cursor of the page before; none: the first page."),
        query(
            "limit",
            "Rows per page (default 50).",
            {"type": "integer", "minimum": 1, "maximum": 500},
        ),
    ]
    flag = {"type": "boolean"}
    event_id = parameter("event_id", "path", {"type": "string"}, "A stored Stripe event's id.")
    status_change = ("sale-not-found", "invalid-status")
    return {
        "/v1/admin/sales": {
            "post": admin(
                "adminCreateSale",
                "Create a sale in the ledger and load it into Redis",
                "sales:write",
                "201",
                "The sale's report (200: the same sale existed)",
                (*_BODY, "invalid-sale", "sale-exists"),
                body=_SALE_BODY,
            ),
            "get": admin(
                "adminListSales",
                "List sales by id",
                "sales:read",
                "200",
                "A page of sales and next_cursor",
                ("invalid-query",),
                parameters=page,
            ),
        },
        "/v1/admin/sales/{sale_id}": {
            "get": admin(
                "adminShowSale",
                "A sale's definition, live counters, outbox lag and ledger",
                "sales:read",
                "200",
                "The sale's report",
                ("sale-not-found",),
                parameters=[sale_id],
            ),
            "patch": admin(
                "adminAmendSale",
                "Change a sale's window or terms before it starts",
                "sales:write",
                "200",
                "The sale's report",
                (*_BODY, "invalid-sale", "sale-not-found", "sale-started"),
                body=_AMEND_BODY,
                parameters=[sale_id],
            ),
        },
        **{
            f"/v1/admin/sales/{{sale_id}}/{verb}": {
                "post": admin(
                    f"admin{verb.title()}Sale",
                    summary,
                    "sales:write",
                    "200",
                    "The new and previous status",
                    codes,
                    parameters=[sale_id],
                )
            }
            for verb, summary, codes in (
                ("pause", "Stop taking orders for now", status_change),
                ("resume", "Take orders again", status_change),
                # Closing a closed sale changes nothing and is no error.
                ("close", "End the sale for good", ("sale-not-found",)),
            )
        },
        "/v1/admin/sales/{sale_id}/restock": {
            "post": admin(
                "adminRestockSale",
                "Add units to an open or paused sale, at once and atomically",
                "sales:write",
                "200",
                "Units available and the sale's stock ever after it",
                (*_BODY, *status_change),
                body=_RESTOCK_BODY,
                parameters=[sale_id],
            )
        },
        "/v1/admin/sales/{sale_id}/reconcile": {
            "post": admin(
                "adminRunReconcile",
                "Compare Redis, the ledger and the gateway; keep the report",
                "reconcile:run",
                "200",
                "The report",
                ("invalid-query", "sale-not-found", "payment-unavailable"),
                parameters=[
                    sale_id,
                    query(
                        "full",
                        "Every order and intent (an audit; slow on a large sale) instead of "
                        "what changed since the sale's cursor (the default).",
                        flag,
                    ),
                    query("repair", "Repair what can be repaired (default false).", flag),
                ],
            ),
            "get": admin(
                "adminLastReconcile",
                "The last report of a run through this API (7 days)",
                "reconcile:run",
                "200",
                "The report",
                ("report-not-found",),
                parameters=[sale_id],
            ),
        },
        "/v1/admin/orders": {
            "get": admin(
                "adminSearchOrders",
                "Orders in the ledger by sale, shopper and state",
                "orders:read",
                "200",
                "A page of orders and next_cursor",
                ("invalid-query",),
                parameters=[
                    query("sale_id", "Only this sale's orders."),
                    query("user_id", "Only this shopper's orders."),
                    query("state", "Only orders in this state."),
                    *page,
                ],
            )
        },
        "/v1/admin/orders/{order_id}": {
            "get": admin(
                "adminShowOrder",
                "An order in the ledger and in Redis, with its events",
                "orders:read",
                "200",
                "The order",
                ("order-not-found",),
                parameters=[order_id],
            )
        },
        "/v1/admin/orders/{order_id}/cancel": {
            "post": admin(
                "adminCancelOrder",
                "Cancel a held order, whoever's (again: the same answer)",
                "orders:write",
                "200",
                "The order",
                ("order-not-found", "order-not-cancellable"),
                parameters=[order_id],
            )
        },
        "/v1/admin/orders/{order_id}/refund": {
            "post": admin(
                "refundOrder",
                "Refund a paid order; a worker pays it back",
                "refunds:write",
                "202",
                "Refund pending",
                ("order-not-found", "order-not-refundable", "invalid-query"),
                parameters=[order_id, restock],
            )
        },
        "/v1/admin/stripe-events": {
            "get": admin(
                "adminListStripeEvents",
                "Stored inbound Stripe events, newest first",
                "webhooks:read",
                "200",
                "A page of events and next_cursor",
                ("invalid-query",),
                parameters=[query("pending", "Only events not applied yet.", flag), *page],
            )
        },
        "/v1/admin/stripe-events/{event_id}/apply": {
            "post": admin(
                "adminApplyStripeEvent",
                "Apply a stored Stripe event again",
                "webhooks:write",
                "200",
                "The outcome",
                ("event-not-found",),
                parameters=[event_id],
            )
        },
    }
