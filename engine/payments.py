"""Payment gateways: Stripe (the official SDK, configurable API base) and an offline mock.

Both create one PaymentIntent per order, keyed for idempotency by the order id, so the worker
and ``POST /v1/orders/{id}/pay`` racing each other still make one. Errors that are worth a retry
(network, 5xx, rate limits) surface as ``GatewayUnavailable``.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
import stripe
from redis.asyncio import Redis

from engine.keys import mock_events, mock_idempotency, mock_intent
from engine.settings import Settings

__all__ = [
    "GatewayRefused",
    "GatewayUnavailable",
    "Intent",
    "MockGateway",
    "PaymentGateway",
    "StripeGateway",
    "make_gateway",
    "signed_event",
]

# Stripe keeps idempotency keys for 24 h; an order's hold is far shorter, so one key per order
# cannot collide with a later, different request.
INTENT_KEY = "pi-{order_id}"
REFUND_KEY = "refund-{order_id}"


class GatewayUnavailable(Exception):
    """The gateway could not answer now; the job retries later."""


class GatewayRefused(Exception):
    """The gateway answered no for this object (unknown intent, bad state); retrying the same
    call will not help, but other orders must not wait behind it."""


@dataclass(frozen=True, slots=True)
class Intent:
    id: str
    client_secret: str
    status: str  # Stripe's: requires_payment_method, processing, succeeded, canceled, ...
    amount: int
    currency: str
    order_id: str


class PaymentGateway(Protocol):
    async def create_intent(
        self, order_id: str, sale_id: str, amount: int, currency: str
    ) -> Intent: ...

    async def retrieve_intent(self, intent_id: str) -> Intent: ...

    async def cancel_intent(self, intent_id: str) -> Intent:
        """Cancel unless it already succeeded; returns the intent as it now stands."""
        ...

    async def refund(self, intent_id: str, order_id: str) -> str:
        """Refund the whole payment (idempotent per order); returns the refund id."""
        ...

    async def recent_events(self, since: int) -> list[dict[str, Any]]:
        """Events created since ``since`` (unix seconds), newest first: what reconciliation
        compares with the webhooks that actually arrived."""
        ...

    async def aclose(self) -> None: ...


def _intent(obj: Any) -> Intent:
    if hasattr(obj, "to_dict"):  # the SDK's objects are not dicts
        obj = obj.to_dict()
    metadata = obj.get("metadata") or {}
    return Intent(
        id=obj["id"],
        client_secret=obj.get("client_secret") or "",
        status=obj["status"],
        amount=int(obj["amount"]),
        currency=obj["currency"],
        order_id=metadata.get("order_id", ""),
    )


class StripeGateway:
    def __init__(self, api_key: str, api_base: str | None = None) -> None:
        self._http = stripe.HTTPXClient()
        self._client = stripe.StripeClient(
            api_key,
            base_addresses={"api": api_base} if api_base else {},
            http_client=self._http,
            max_network_retries=2,
        )

    async def aclose(self) -> None:
        await self._http.close_async()  # type: ignore[no-untyped-call]

    async def recent_events(self, since: int) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        params: dict[str, Any] = {"created": {"gte": since}, "limit": 100}
        try:
            # Pages of 100, newest first; a flash sale's events fit in a handful of pages.
            while True:
                page = await self._client.v1.events.list_async(params)  # type: ignore[arg-type]
                events += [event.to_dict() for event in page.data]
                if not page.has_more or not page.data:
                    return events
                params["starting_after"] = page.data[-1].id
        except (stripe.APIConnectionError, stripe.RateLimitError, stripe.APIError) as exc:
            raise GatewayUnavailable(str(exc)) from exc

    async def create_intent(
        self, order_id: str, sale_id: str, amount: int, currency: str
    ) -> Intent:
        try:
            obj = await self._client.v1.payment_intents.create_async(
                {
                    "amount": amount,
                    "currency": currency,
                    "metadata": {"order_id": order_id, "sale_id": sale_id},
                },
                {"idempotency_key": INTENT_KEY.format(order_id=order_id)},
            )
        except (stripe.APIConnectionError, stripe.RateLimitError, stripe.APIError) as exc:
            raise GatewayUnavailable(str(exc)) from exc
        return _intent(obj)

    async def retrieve_intent(self, intent_id: str) -> Intent:
        try:
            return _intent(await self._client.v1.payment_intents.retrieve_async(intent_id))
        except (stripe.APIConnectionError, stripe.RateLimitError, stripe.APIError) as exc:
            raise GatewayUnavailable(str(exc)) from exc
        except stripe.StripeError as exc:  # e.g. no such intent (another account or mode)
            raise GatewayRefused(str(exc)) from exc

    async def cancel_intent(self, intent_id: str) -> Intent:
        try:
            return _intent(await self._client.v1.payment_intents.cancel_async(intent_id))
        except stripe.InvalidRequestError:
            # Stripe refuses to cancel an intent that succeeded (or is already canceled):
            # what it is now decides what the caller does.
            return await self.retrieve_intent(intent_id)
        except (stripe.APIConnectionError, stripe.RateLimitError, stripe.APIError) as exc:
            raise GatewayUnavailable(str(exc)) from exc

    async def refund(self, intent_id: str, order_id: str) -> str:
        try:
            refund = await self._client.v1.refunds.create_async(
                {"payment_intent": intent_id, "metadata": {"order_id": order_id}},
                {"idempotency_key": REFUND_KEY.format(order_id=order_id)},
            )
        except (stripe.APIConnectionError, stripe.RateLimitError, stripe.APIError) as exc:
            raise GatewayUnavailable(str(exc)) from exc
        except stripe.InvalidRequestError as exc:
            # Refunded already (from the dashboard, or by us before a crash): that refund is
            # the answer. Anything else is a refusal the operator must see.
            existing = await self._client.v1.refunds.list_async({"payment_intent": intent_id})
            if existing.data:
                return str(existing.data[0].id)
            raise GatewayRefused(str(exc)) from exc
        return str(refund.id)


class MockGateway:
    """Offline stand-in with ids ``mock_…``; its state lives in Redis so the API and the
    workers see the same intents. ``succeed``/``fail`` play the shopper's card."""

    def __init__(self, redis: Redis) -> None:
        self._redis = redis

    async def aclose(self) -> None:
        """Nothing to close: the Redis client belongs to the caller."""

    async def recent_events(self, since: int) -> list[dict[str, Any]]:
        raw = await self._redis.lrange(mock_events(), 0, -1)
        events = [orjson.loads(item) for item in raw]
        return [event for event in events if event["created"] >= since]

    async def _read(self, intent_id: str) -> Intent:
        fields = await self._redis.hgetall(mock_intent(intent_id))
        if not fields:
            raise GatewayRefused(f"no such payment intent: {intent_id}")
        return Intent(
            id=intent_id,
            client_secret=fields["client_secret"],
            status=fields["status"],
            amount=int(fields["amount"]),
            currency=fields["currency"],
            order_id=fields["order_id"],
        )

    async def create_intent(
        self, order_id: str, sale_id: str, amount: int, currency: str
    ) -> Intent:
        intent_id = "mock_pi_" + secrets.token_hex(8)
        # The intent first, then the idempotency key that names it: whatever stops this between
        # the two writes (a Redis killed, a worker killed, a lost connection), no key ever names
        # an intent that does not exist. Key first, such a key made every later try for the
        # order "no such payment intent" for the key's 24 h.
        await self._redis.hset(
            mock_intent(intent_id),
            mapping={
                "client_secret": f"{intent_id}_secret_{secrets.token_hex(8)}",
                "status": "requires_payment_method",
                "amount": amount,
                "currency": currency,
                "order_id": order_id,
                "sale_id": sale_id,
            },
        )
        # SET NX is the idempotency key: whoever comes second gets the first one's intent, and
        # its own, never handed out, goes.
        key = mock_idempotency(INTENT_KEY.format(order_id=order_id))
        if not await self._redis.set(key, intent_id, nx=True, ex=86_400):
            await self._redis.delete(mock_intent(intent_id))
            return await self._read(await self._redis.get(key))
        return await self._read(intent_id)

    async def retrieve_intent(self, intent_id: str) -> Intent:
        return await self._read(intent_id)

    async def cancel_intent(self, intent_id: str) -> Intent:
        intent = await self._read(intent_id)
        if intent.status not in ("succeeded", "canceled"):
            await self._redis.hset(mock_intent(intent_id), "status", "canceled")
        return await self._read(intent_id)

    async def refund(self, intent_id: str, order_id: str) -> str:
        key = mock_idempotency(REFUND_KEY.format(order_id=order_id))
        refund_id = "mock_re_" + secrets.token_hex(8)
        await self._redis.set(key, refund_id, nx=True, ex=86_400)
        return str(await self._redis.get(key))

    async def settle(self, intent_id: str, succeeded: bool) -> dict[str, Any]:
        """The shopper's card answered: update the intent and return the event Stripe would
        send (``payment_intent.succeeded`` or ``payment_intent.payment_failed``)."""
        status = "succeeded" if succeeded else "requires_payment_method"
        await self._redis.hset(mock_intent(intent_id), "status", status)
        intent = await self._read(intent_id)
        kind = "payment_intent.succeeded" if succeeded else "payment_intent.payment_failed"
        event = intent_event(kind, intent)
        # Kept like Stripe keeps its events, so reconciliation can find a lost webhook.
        await self._redis.lpush(mock_events(), orjson.dumps(event))
        await self._redis.ltrim(mock_events(), 0, 9_999)
        return event


def intent_event(kind: str, intent: Intent, created: int | None = None) -> dict[str, Any]:
    """A Stripe-shaped event about a payment intent."""
    return {
        "id": "evt_" + secrets.token_hex(12),
        "object": "event",
        "type": kind,
        "created": created if created is not None else int(time.time()),
        "data": {
            "object": {
                "id": intent.id,
                "object": "payment_intent",
                "status": intent.status,
                "amount": intent.amount,
                "currency": intent.currency,
                "metadata": {"order_id": intent.order_id},
            }
        },
    }


def signed_event(
    event: dict[str, Any], secret: str, timestamp: int | None = None
) -> tuple[bytes, str]:
    """Body and ``Stripe-Signature`` header, signed with the SDK's own helper."""
    body = orjson.dumps(event)
    header = stripe.WebhookSignature.generate_signature_header(body.decode(), secret, timestamp)
    return body, header


def make_gateway(settings: Settings, redis: Redis) -> PaymentGateway:
    if settings.stripe_api_key:
        return StripeGateway(settings.stripe_api_key, settings.stripe_api_base)
    return MockGateway(redis)
