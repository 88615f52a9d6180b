"""The OpenAPI 3.1 document served at ``/openapi.json``."""

from __future__ import annotations

from functools import cache
from typing import Any

from engine import __version__
from engine.errors import PROBLEM_TYPES

__all__ = ["openapi_document"]

_PROBLEM = {"$ref": "#/components/responses/Problem"}


def _problems(*statuses: int) -> dict[str, Any]:
    return {str(status): _PROBLEM for status in statuses}


def _op(summary: str, ok: int, schema: str, *errors: int, **extra: Any) -> dict[str, Any]:
    responses: dict[str, Any] = {
        str(ok): {
            "description": summary,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}},
        }
    }
    responses.update(_problems(*errors))
    return {"summary": summary, "responses": responses, **extra}


_SALE_ID = {"name": "sale_id", "in": "path", "required": True, "schema": {"type": "string"}}
_ORDER_ID = {"name": "order_id", "in": "path", "required": True, "schema": {"type": "string"}}
_BEARER: list[dict[str, list[str]]] = [{"bearer": []}]


@cache
def openapi_document() -> dict[str, Any]:
    order = {
        "type": "object",
        "required": ["id", "sale_id", "quantity", "state", "version", "hold_expires_at"],
        "properties": {
            "id": {"type": "string"},
            "sale_id": {"type": "string"},
            "quantity": {"type": "integer", "minimum": 1},
            "state": {
                "enum": [
                    "reserved",
                    "paid",
                    "expired",
                    "cancelled",
                    "failed",
                    "refund_pending",
                    "refunded",
                ]
            },
            "version": {"type": "integer", "minimum": 1},
            "created_at": {"type": "string", "format": "date-time"},
            "hold_expires_at": {"type": "string", "format": "date-time"},
        },
    }
    sale = {
        "type": "object",
        "properties": {
            "id": {"type": "string"},
            "name": {"type": "string"},
            "status": {"enum": ["open", "paused", "closed"]},
            "starts_at": {"type": "string", "format": "date-time"},
            "ends_at": {"type": "string", "format": "date-time"},
            "price": {"type": "integer", "description": "minor units"},
            "currency": {"type": "string"},
            "per_user_limit": {"type": "integer"},
            "per_order_max": {"type": "integer"},
            "hold_seconds": {"type": "integer"},
            "units_left": {"type": "integer"},
        },
    }
    problem = {
        "type": "object",
        "required": ["type", "title", "status", "code"],
        "properties": {
            "type": {"type": "string", "format": "uri"},
            "title": {"type": "string"},
            "status": {"type": "integer"},
            "code": {"enum": sorted(PROBLEM_TYPES)},
            "detail": {"type": "string"},
            "instance": {"type": "string"},
        },
    }
    idempotency = {
        "name": "Idempotency-Key",
        "in": "header",
        "required": True,
        "schema": {"type": "string", "pattern": "^[A-Za-z0-9_.:-]{1,128}$"},
        "description": "A replay returns the first answer; reuse with another body is a 422.",
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "flashsale", "version": __version__},
        "paths": {
            "/v1/sales/{sale_id}": {
                "get": _op("Read a sale", 200, "Sale", 404, parameters=[_SALE_ID]),
            },
            "/v1/sales/{sale_id}/orders": {
                "post": _op(
                    "Place an order (a hold on stock)",
                    201,
                    "Order",
                    400,
                    401,
                    403,
                    404,
                    409,
                    410,
                    413,
                    415,
                    422,
                    425,
                    parameters=[_SALE_ID, idempotency],
                    security=_BEARER,
                    requestBody={
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "required": ["quantity"],
                                    "properties": {"quantity": {"type": "integer", "minimum": 1}},
                                    "additionalProperties": False,
                                }
                            }
                        },
                    },
                ),
            },
            "/v1/orders/{order_id}": {
                "get": _op(
                    "Read your order",
                    200,
                    "Order",
                    401,
                    404,
                    parameters=[_ORDER_ID],
                    security=_BEARER,
                ),
            },
            "/v1/orders/{order_id}/pay": {
                "post": _op(
                    "Payment details for your order (creates its PaymentIntent once)",
                    200,
                    "Payment",
                    401,
                    404,
                    409,
                    503,
                    parameters=[_ORDER_ID],
                    security=_BEARER,
                ),
            },
            "/v1/webhooks/stripe": {
                "post": {
                    "summary": "Stripe webhook (signed; duplicates acknowledged and ignored)",
                    "parameters": [
                        {
                            "name": "Stripe-Signature",
                            "in": "header",
                            "required": True,
                            "schema": {"type": "string"},
                        }
                    ],
                    "responses": {"200": {"description": "received"}, **_problems(400, 413)},
                },
            },
            "/v1/admin/orders/{order_id}/refund": {
                "post": {
                    "summary": "Refund a paid order (admin token); a worker pays it back",
                    "parameters": [
                        _ORDER_ID,
                        {"name": "restock", "in": "query", "schema": {"type": "boolean"}},
                    ],
                    "responses": {
                        "202": {"description": "refund_pending"},
                        **_problems(401, 404, 409),
                    },
                },
            },
            "/v1/orders/{order_id}/cancel": {
                "post": _op(
                    "Cancel your held order",
                    200,
                    "Order",
                    401,
                    404,
                    409,
                    parameters=[_ORDER_ID],
                    security=_BEARER,
                ),
            },
            "/health": {
                "get": {"summary": "Liveness", "responses": {"200": {"description": "up"}}}
            },
            "/ready": {
                "get": {
                    "summary": "Redis and Postgres reachable",
                    "responses": {"200": {"description": "ready"}, **_problems(503)},
                }
            },
        },
        "components": {
            "schemas": {
                "Order": order,
                "Sale": sale,
                "Problem": problem,
                "Payment": {
                    "type": "object",
                    "properties": {
                        "order_id": {"type": "string"},
                        "state": {"type": "string"},
                        "payment_intent_id": {"type": "string"},
                        "client_secret": {"type": "string"},
                        "amount": {"type": "integer"},
                        "currency": {"type": "string"},
                    },
                },
            },
            "responses": {
                "Problem": {
                    "description": "RFC 9457 problem details with a stable code",
                    "content": {
                        "application/problem+json": {
                            "schema": {"$ref": "#/components/schemas/Problem"}
                        }
                    },
                }
            },
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
            },
        },
    }
