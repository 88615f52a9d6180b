"""The OpenAPI 3.1 document served at ``/openapi.json`` and browsed at ``/docs``.

It is declared here rather than generated, but nothing in it is free to drift: each operation
lists the problem codes it can answer (``x-problem-codes``), and its error responses are made
from them, one per status (``PROBLEM_TYPES``), each enumerating its codes and the headers that
status carries. Limits come from the code that enforces them (``MAX_QUANTITY``, the
Idempotency-Key pattern). ``x-every-request`` holds the problems no operation owns: an unknown
path, a method the path does not have, a fault. ``tests/test_openapi.py`` holds the document to
the route table and to the real app's answers.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from engine import __version__
from engine.errors import PROBLEM_MEDIA_TYPE, PROBLEM_TYPES
from engine.http.adminopenapi import admin_paths
from engine.http.bodies import MAX_QUANTITY
from engine.http.schemas import component_schemas
from engine.http.subscriptiondocs import subscription_operations, subscription_schemas
from engine.http.webhooks import MAX_WEBHOOK_BYTES
from engine.ids import IDEMPOTENCY_KEY_PATTERN

__all__ = ["openapi_document"]

# Problems any request may meet, whatever its operation (answered by the front door itself).
# The last two come from the server's HTTP protocol (engine.http.protocol), before any route.
_EVERY_REQUEST_CODES = (
    "not-found",
    "method-not-allowed",
    "internal-error",
    "request-timeout",
    "headers-too-large",
)

# Headers every problem of a status carries (set by its class in engine.errors).
_PROBLEM_HEADERS: dict[int, dict[str, Any]] = {
    401: {
        "WWW-Authenticate": {
            "description": "The scheme to authenticate with: Bearer.",
            "schema": {"type": "string"},
            "required": True,
        }
    },
    405: {
        "Allow": {
            "description": "The methods this path answers.",
            "schema": {"type": "string"},
            "required": True,
        }
    },
    503: {
        "Retry-After": {
            "description": "Seconds to wait before retrying (with the same Idempotency-Key).",
            "schema": {"type": "integer", "minimum": 1},
            "required": True,
        }
    },
}

_SHOPPER: list[dict[str, list[str]]] = [{"shopper": []}]


def _ref(kind: str, name: str) -> dict[str, str]:
    return {"$ref": f"#/components/{kind}/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _problem_responses(codes: tuple[str, ...]) -> dict[str, Any]:
    """The error responses of ``codes``: one per status, its schema enumerating its codes."""
    by_status: dict[int, list[str]] = {}
    for code in codes:
        by_status.setdefault(PROBLEM_TYPES[code], []).append(code)
    responses = {}
    for status, its_codes in sorted(by_status.items()):
        schema = {
            "allOf": [
                _ref("schemas", "Problem"),
                {"properties": {"status": {"const": status}, "code": {"enum": its_codes}}},
            ]
        }
        response: dict[str, Any] = {
            "description": ", ".join(its_codes),
            "content": {PROBLEM_MEDIA_TYPE: {"schema": schema}},
        }
        if status in _PROBLEM_HEADERS:
            response["headers"] = _PROBLEM_HEADERS[status]
        responses[str(status)] = response
    return responses


def _operation(
    operation_id: str,
    tag: str,
    summary: str,
    answers: dict[str, Any],
    codes: tuple[str, ...],
    **extra: Any,
) -> dict[str, Any]:
    return {
        "operationId": operation_id,
        "tags": [tag],
        "summary": summary,
        **extra,
        "x-problem-codes": list(codes),
        "responses": {**answers, **_problem_responses(codes)},
    }


def _parameter(
    name: str, where: str, schema: dict[str, Any], description: str, *, required: bool = True
) -> dict[str, Any]:
    return {
        "name": name,
        "in": where,
        "required": required,
        "schema": schema,
        "description": description,
    }


_STRING = {"type": "string"}
_SALE_ID = _parameter(
    "sale_id", "path", _STRING, "A sale id; one that cannot be a sale id answers sale-not-found."
)
_ORDER_ID = _parameter(
    "order_id", "path", _STRING, "An order id; one that cannot be one answers order-not-found."
)
_IDEMPOTENCY_KEY = _parameter(
    "Idempotency-Key",
    "header",
    {"type": "string", "pattern": f"^{IDEMPOTENCY_KEY_PATTERN}$"},
    "The same key and body again answer the first answer (Idempotent-Replayed: true); the "
    "same key with another body is idempotency-key-reused.",
)
_STRIPE_SIGNATURE = _parameter(
    "Stripe-Signature", "header", _STRING, "Stripe's signature of the body, with its time."
)
_RESTOCK = _parameter(
    "restock",
    "query",
    {"type": "boolean", "default": False},
    "Put the units back on sale (only the value true does).",
    required=False,
)
_ORDER_BODY = {
    "type": "object",
    "required": ["quantity"],
    "additionalProperties": False,
    "properties": {
        "quantity": {
            "type": "integer",
            "minimum": 1,
            "maximum": MAX_QUANTITY,
            "description": "Units to hold; the sale's per_order_max (often lower) applies too.",
        }
    },
}
_REPLAYED = {
    "Idempotent-Replayed": {
        "description": "Present, and true, when this answers a replay of an earlier request.",
        "schema": {"const": "true"},
    }
}


def _static(operation_id: str, summary: str, media: str = "text/html") -> dict[str, Any]:
    """A file the app ships, answered to anyone: the dashboard's page and script hold no data."""
    page = {"description": summary, "content": {media: {"schema": {"type": "string"}}}}
    return _operation(operation_id, "admin", summary, {"200": page}, ())


def _subscription_paths() -> dict[str, Any]:
    return {
        path: {
            method: _operation(
                op.operation_id,
                "webhooks",
                op.summary,
                op.answers,
                op.codes,
                **op.extra,
                security=[{"admin": []}],
                **{"x-scope": "webhooks:read" if method == "get" else "webhooks:write"},
            )
            for method, op in methods.items()
        }
        for path, methods in subscription_operations().items()
    }


def _paths() -> dict[str, Any]:
    order = _json(_ref("schemas", "Order"), "The order")
    return {
        **_subscription_paths(),
        "/v1/sales/{sale_id}": {
            "get": _operation(
                "getSale",
                "sales",
                "Read a sale",
                {"200": _json(_ref("schemas", "Sale"), "The sale, with the units left now")},
                ("sale-not-found", "not-ready"),
                parameters=[_SALE_ID],
            ),
        },
        "/v1/sales/{sale_id}/orders": {
            "post": _operation(
                "placeOrder",
                "sales",
                "Place an order: a hold on stock until hold_expires_at",
                {
                    "201": {
                        **_json(_ref("schemas", "Order"), "The held order"),
                        "headers": _REPLAYED,
                    }
                },
                (
                    "invalid-token",
                    "missing-idempotency-key",
                    "invalid-idempotency-key",
                    "unsupported-media-type",
                    "body-too-large",
                    "invalid-body",
                    "invalid-quantity",
                    "sale-not-found",
                    "sold-out",
                    "limit-exceeded",
                    "quantity-exceeds-maximum",
                    "idempotency-key-reused",
                    "sale-not-started",
                    "sale-ended",
                    "sale-paused",
                    "not-ready",
                    "server-busy",
                ),
                parameters=[_SALE_ID, _IDEMPOTENCY_KEY],
                security=_SHOPPER,
                requestBody={
                    "required": True,
                    "description": "At most FLASHSALE_MAX_BODY_BYTES bytes.",
                    "content": {"application/json": {"schema": _ORDER_BODY}},
                },
            ),
        },
        "/v1/orders/{order_id}": {
            "get": _operation(
                "getOrder",
                "orders",
                "Read your order (someone else's is order-not-found)",
                {"200": order},
                ("invalid-token", "order-not-found", "not-ready"),
                parameters=[_ORDER_ID],
                security=_SHOPPER,
            ),
        },
        "/v1/orders/{order_id}/cancel": {
            "post": _operation(
                "cancelOrder",
                "orders",
                "Cancel your held order (again: the same answer)",
                {"200": order},
                ("invalid-token", "order-not-found", "order-not-cancellable", "not-ready"),
                parameters=[_ORDER_ID],
                security=_SHOPPER,
            ),
        },
        "/v1/orders/{order_id}/pay": {
            "post": _operation(
                "payOrder",
                "orders",
                "Payment details for your order (creates its PaymentIntent once)",
                {"200": _json(_ref("schemas", "Payment"), "What the browser pays with")},
                (
                    "invalid-token",
                    "order-not-found",
                    "order-not-payable",
                    "payment-unavailable",
                    "not-ready",
                ),
                parameters=[_ORDER_ID],
                security=_SHOPPER,
            ),
        },
        "/v1/webhooks/stripe": {
            "post": _operation(
                "stripeWebhook",
                "webhooks",
                "Stripe's signed events (duplicates acknowledged and ignored)",
                {"200": _json(_ref("schemas", "Received"), "Stored, and applied when it can be")},
                ("body-too-large", "invalid-signature", "invalid-payload", "not-ready"),
                parameters=[_STRIPE_SIGNATURE],
                requestBody={
                    "required": True,
                    "description": f"A Stripe event, at most {MAX_WEBHOOK_BYTES} bytes.",
                    "content": {"application/json": {"schema": {"type": "object"}}},
                },
            ),
        },
        **admin_paths(_operation, _parameter, _SALE_ID, _ORDER_ID, _RESTOCK),
        "/metrics": {
            "get": _operation(
                "metrics",
                "service",
                "Prometheus metrics of every server and worker process of the machine",
                {
                    "200": {
                        "description": "Prometheus text exposition format 0.0.4",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
                (),
            )
        },
        "/v1/admin/dashboard": {
            "get": _operation(
                "dashboard",
                "admin",
                "Every live sale's figures now, for the dashboard page (scope sales:read)",
                {"200": _json(_ref("schemas", "Dashboard"), "The live sales, by id")},
                ("invalid-token", "admin-role-required", "insufficient-scope", "not-ready"),
                security=[{"admin": []}],
                **{"x-scope": "sales:read"},
            ),
        },
        "/admin": {"get": _static("dashboardPage", "The live dashboard (asks for the token)")},
        "/admin/dashboard.js": {
            "get": _static("dashboardScript", "The dashboard's script", "text/javascript")
        },
        "/health": {
            "get": _operation(
                "health",
                "service",
                "Liveness",
                {"200": _json(_ref("schemas", "Status"), "Up")},
                (),
            )
        },
        "/ready": {
            "get": _operation(
                "ready",
                "service",
                "Redis and Postgres reachable (a 503 names the one that is not in checks)",
                {"200": _json(_ref("schemas", "Status"), "Ready")},
                ("not-ready",),
            )
        },
        "/openapi.json": {
            "get": _operation(
                "openapi",
                "service",
                "This document",
                {"200": _json({"type": "object"}, "OpenAPI 3.1")},
                (),
            )
        },
        "/docs": {
            "get": _operation(
                "docs",
                "service",
                "This document as a page to read",
                {
                    "200": {
                        "description": "HTML that reads /openapi.json",
                        "content": {"text/html": {"schema": {"type": "string"}}},
                    }
                },
                (),
            )
        },
    }


@cache
def openapi_document() -> dict[str, Any]:
    """The document; built once, never changed after."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "flashsale",
            "version": __version__,
            "description": "Flash-sale orders: holds in Redis, a ledger in Postgres. Every "
            "error is application/problem+json with a stable code.",
        },
        "paths": _paths(),
        "x-every-request": {
            "description": "Problems any request may meet, whatever its operation.",
            "x-problem-codes": list(_EVERY_REQUEST_CODES),
            "responses": _problem_responses(_EVERY_REQUEST_CODES),
        },
        "components": {
            "schemas": {**component_schemas(), **subscription_schemas()},
            "securitySchemes": {
                "shopper": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
                "admin": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An API key (fsk_...) with the operation's x-scope, a JWT "
                    "whose roles claim holds admin, or the bootstrap FLASHSALE_ADMIN_TOKEN.",
                },
            },
        },
    }
