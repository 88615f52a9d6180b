"""The JSON shapes of the API, as OpenAPI 3.1 schemas (``engine.http.openapi``)."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from engine.errors import CLI_ONLY_CODES, PROBLEM_TYPES
from engine.http.bodies import MAX_QUANTITY
from engine.inventory import ORDER_STATES
from engine.salestats import SaleStats

__all__ = ["component_schemas"]


def _problem_schema() -> dict[str, Any]:
    def member(kind: str, description: str) -> dict[str, str]:
        return {"type": kind, "description": description}

    return {
        "type": "object",
        "description": "RFC 9457 problem details; code is stable, detail is for people.",
        "required": ["type", "title", "status", "code", "detail"],
        "properties": {
            "type": {"type": "string", "format": "uri", "description": "Built from code."},
            "title": member("string", "The reason phrase of the status."),
            "status": member("integer", "The HTTP status."),
            "code": {"enum": sorted(set(PROBLEM_TYPES) - CLI_ONLY_CODES)},
            "detail": member("string", "What went wrong this time."),
            "instance": member("string", "The path asked for."),
            "available": member("integer", "sold-out: units left."),
            "limit": member("integer", "limit-exceeded: units a shopper may hold in this sale."),
            "already_held": member("integer", "limit-exceeded: units this shopper holds."),
            "scope": member("string", "insufficient-scope: the scope the API key lacks."),
            "errors": {
                "type": "array",
                "items": {"type": "string"},
                "description": "invalid-sale: every problem of the definition.",
            },
            "maximum": member("integer", "quantity-exceeds-maximum: units per order."),
            "starts_at_ms": member("integer", "sale-not-started: Unix milliseconds."),
            "ended_at_ms": member("integer", "sale-ended: Unix milliseconds."),
            "state": member("string", "order-not-*: the order's state."),
            "checks": member("object", "not-ready from /ready: why each store is unreachable."),
        },
    }


def _sale_stats_schema() -> dict[str, Any]:
    # From the dataclass itself, so the document lists exactly the fields the route sends.
    kinds = {"int": "integer", "str": "string"}
    names = [f.name for f in fields(SaleStats)]
    return {
        "type": "object",
        "description": "A live sale now, read from Redis (engine.salestats).",
        "required": names,
        "properties": {f.name: {"type": kinds[str(f.type)]} for f in fields(SaleStats)},
    }


def component_schemas() -> dict[str, Any]:
    """``components.schemas``: what the API answers, by name."""

    def strings(*names: str) -> dict[str, Any]:
        return {name: {"type": "string"} for name in names}

    when = {"type": "string", "format": "date-time"}
    return {
        "Problem": _problem_schema(),
        "Order": {
            "type": "object",
            "required": ["id", "sale_id", "quantity", "state", "version", "hold_expires_at"],
            "properties": {
                **strings("id", "sale_id"),
                "quantity": {"type": "integer", "minimum": 1, "maximum": MAX_QUANTITY},
                "state": {"enum": list(ORDER_STATES)},
                "version": {"type": "integer", "minimum": 1},
                "created_at": when,
                "hold_expires_at": when,
            },
        },
        "Sale": {
            "type": "object",
            "properties": {
                **strings("id", "name", "currency"),
                "status": {"enum": ["open", "paused", "closed"]},
                "starts_at": when,
                "ends_at": when,
                "price": {"type": "integer", "description": "Minor units of currency."},
                "per_user_limit": {"type": "integer"},
                "per_order_max": {"type": "integer"},
                "hold_seconds": {"type": "integer"},
                "units_left": {"type": "integer"},
            },
        },
        "Payment": {
            "type": "object",
            "properties": {
                **strings("order_id", "state", "payment_intent_id", "client_secret", "currency"),
                "amount": {"type": "integer", "description": "Minor units of currency."},
            },
        },
        "Received": {
            "type": "object",
            "properties": {"received": {"const": True}, **strings("outcome")},
        },
        "Refund": {
            "type": "object",
            "properties": {**strings("id"), "state": {"const": "refund_pending"}},
        },
        "Status": {
            "type": "object",
            "properties": {**strings("status"), "checks": {"type": "object"}},
        },
        "SaleStats": _sale_stats_schema(),
        "Dashboard": {
            "type": "object",
            "required": ["server_time_ms", "sales"],
            "properties": {
                "server_time_ms": {"type": "integer", "description": "Redis's clock."},
                "sales": {"type": "array", "items": {"$ref": "#/components/schemas/SaleStats"}},
            },
        },
    }
