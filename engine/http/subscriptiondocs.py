"""The OpenAPI description of the webhook subscription routes (``engine.http.subscriptions``)
and of the events they deliver; ``engine.http.openapi`` makes each into an operation."""

from __future__ import annotations

from typing import Any, NamedTuple

from engine.events import EVENT_TYPES
from engine.http.subscriptions import MAX_DELIVERIES_PAGE, MAX_SUBSCRIPTION_BYTES, PATH
from engine.subscriptions import DELIVERY_STATES

__all__ = ["Described", "subscription_operations", "subscription_schemas"]


class Described(NamedTuple):
    operation_id: str
    summary: str
    answers: dict[str, Any]
    codes: tuple[str, ...]
    extra: dict[str, Any]


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_ID = {
    "name": "subscription_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string"},
    "description": "A subscription id (sub_…); one that cannot be one answers "
    "subscription-not-found.",
}
_BODY_LIMIT = f"At most {MAX_SUBSCRIPTION_BYTES} bytes."
# Every route reads or writes the ledger, so a Postgres away answers not-ready.
_ALWAYS = ("invalid-token", "admin-role-required", "insufficient-scope", "not-ready")
_ONE = (*_ALWAYS, "subscription-not-found")
_WRITING = ("body-too-large", "invalid-body", "invalid-subscription")


def _request(schema: str) -> dict[str, Any]:
    return {
        "required": True,
        "description": _BODY_LIMIT,
        "content": {"application/json": {"schema": _ref(schema)}},
    }


def subscription_operations() -> dict[str, dict[str, Described]]:
    """path -> method -> what ``engine.http.openapi`` needs to make the operation."""
    base = PATH
    one = base + "/{subscription_id}"
    subscription = _json(_ref("Subscription"), "The subscription")
    by_id = {"parameters": [_ID]}
    return {
        base: {
            "post": Described(
                "createSubscription",
                "Subscribe a URL to event types; the answer shows the secret, once",
                {"201": _json(_ref("SubscriptionWithSecret"), "Created")},
                (*_ALWAYS, *_WRITING),
                {"requestBody": _request("NewSubscription")},
            ),
            "get": Described(
                "listSubscriptions",
                "Every subscription",
                {"200": _json(_ref("Subscriptions"), "The subscriptions")},
                _ALWAYS,
                {},
            ),
        },
        one: {
            "get": Described(
                "getSubscription", "One subscription", {"200": subscription}, _ONE, by_id
            ),
            "patch": Described(
                "updateSubscription",
                "Change url, event_types, description or enabled (true forgets past failures)",
                {"200": subscription},
                (*_ONE, *_WRITING),
                {**by_id, "requestBody": _request("SubscriptionChange")},
            ),
            "delete": Described(
                "deleteSubscription",
                "Delete a subscription and its deliveries",
                {"200": _json(_ref("Deleted"), "Deleted")},
                _ONE,
                by_id,
            ),
        },
        one + "/rotate-secret": {
            "post": Described(
                "rotateSubscriptionSecret",
                "A new secret; the previous one signs beside it until previous_expires_at",
                {"200": _json(_ref("RotatedSecret"), "The new secret, shown once")},
                _ONE,
                by_id,
            ),
        },
        one + "/deliveries": {
            "get": Described(
                "listSubscriptionDeliveries",
                "The subscription's newest deliveries, each with its attempts",
                {"200": _json(_ref("Deliveries"), "Deliveries, newest first")},
                (*_ONE, "invalid-parameter"),
                {
                    "parameters": [
                        _ID,
                        {
                            "name": "state",
                            "in": "query",
                            "required": False,
                            "schema": {"enum": list(DELIVERY_STATES)},
                            "description": "Only deliveries in this state.",
                        },
                        {
                            "name": "limit",
                            "in": "query",
                            "required": False,
                            "schema": {
                                "type": "integer",
                                "minimum": 1,
                                "maximum": MAX_DELIVERIES_PAGE,
                                "default": 50,
                            },
                            "description": "At most this many.",
                        },
                    ]
                },
            ),
        },
    }


def subscription_schemas() -> dict[str, Any]:
    """``components.schemas`` of the subscription routes and of an event's payload."""
    when = {"type": "string", "format": "date-time"}
    nullable_when = {"type": ["string", "null"], "format": "date-time"}
    types = {"type": "array", "minItems": 1, "items": {"enum": list(EVENT_TYPES)}}
    url = {"type": "string", "format": "uri", "maxLength": 2048}
    secret = {"type": "string", "pattern": "^whsec_", "description": "Keep it: shown once."}
    subscription = {
        "type": "object",
        "properties": {
            "id": {"type": "string"},
            "url": url,
            "event_types": types,
            "description": {"type": "string"},
            "enabled": {"type": "boolean"},
            "disabled_reason": {"type": ["string", "null"]},
            "failing_since": nullable_when,
            "previous_expires_at": nullable_when,
            "created_at": when,
            "updated_at": when,
        },
    }
    return {
        "Subscription": subscription,
        "SubscriptionWithSecret": {
            "allOf": [subscription, {"properties": {"secret": secret}}],
        },
        "Subscriptions": {
            "type": "object",
            "properties": {"subscriptions": {"type": "array", "items": subscription}},
        },
        "NewSubscription": {
            "type": "object",
            "required": ["url", "event_types"],
            "additionalProperties": False,
            "properties": {"url": url, "event_types": types, "description": {"type": "string"}},
        },
        "SubscriptionChange": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "url": url,
                "event_types": types,
                "description": {"type": "string", "maxLength": 500},
                "enabled": {"type": "boolean"},
            },
        },
        "RotatedSecret": {
            "type": "object",
            "properties": {"id": {"type": "string"}, "secret": secret, "previous_expires_at": when},
        },
        "Deliveries": {
            "type": "object",
            "properties": {
                "deliveries": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "event_id": {"type": "string"},
                            "type": {"enum": list(EVENT_TYPES)},
                            "state": {"enum": list(DELIVERY_STATES)},
                            "attempts": {"type": "integer"},
                            "next_attempt_at": when,
                            "last_status": {"type": ["integer", "null"]},
                            "last_error": {"type": ["string", "null"]},
                            "attempt_log": {"type": "array", "items": {"type": "object"}},
                        },
                    },
                }
            },
        },
        "Deleted": {
            "type": "object",
            "properties": {"id": {"type": "string"}, "deleted": {"const": True}},
        },
        "Event": {
            "type": "object",
            "description": "The body of a webhook to a subscriber (Standard Webhooks), signed "
            "in webhook-id, webhook-timestamp and webhook-signature.",
            "required": ["type", "timestamp", "data"],
            "properties": {
                "type": {"enum": list(EVENT_TYPES)},
                "timestamp": when,
                "data": {"type": "object", "description": "Ids, state and amounts."},
            },
        },
    }
