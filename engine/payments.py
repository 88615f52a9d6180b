"""Payment gateways: the interface, and Stripe's (the official SDK, configurable API base); the
offline mock is ``engine.mockgateway``.

Both create one PaymentIntent per order, keyed for idempotency by the order id, so two
``POST /v1/orders/{id}/pay`` calls racing each other still make one. ``make_gateway`` returns
the deployment's gateway with every call passing one shared rate limit
(``engine.gatewaylimit``). Errors::

    GatewayUnavailable   worth a retry later (network, 5xx): the job tries again next tick
    └── GatewayBusy      over a rate limit, ours or the gateway's 429; ``retry_after_s``
        └── OverRate     over the deployment's own limit: nothing was sent, nothing failed
    GatewayRefused       no for this object (unknown intent, bad state): retrying won't help
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
import stripe
from redis.asyncio import Redis

from engine.settings import Settings

__all__ = [
    "EVENT_PAGE",
    "INTENT_KEY",
    "REFUND_KEY",
    "EventPage",
    "GatewayBusy",
    "GatewayRefused",
    "GatewayUnavailable",
    "Intent",
    "OverRate",
    "PaymentGateway",
    "StripeGateway",
    "events_since",
    "intent_event",
    "intent_of",
    "make_gateway",
    "signed_event",
]

# Seconds one try of a Stripe call may take (the SDK's own default is 80).
GATEWAY_TIMEOUT_S = 10.0

# Stripe keeps idempotency keys for 24 h; an order's hold is far shorter, so one key per order
# cannot collide with a later, different request.
INTENT_KEY = "pi-{order_id}"
REFUND_KEY = "refund-{order_id}"
# Events per listing call: Stripe's largest page.
EVENT_PAGE = 100


class GatewayUnavailable(Exception):
    """The gateway could not answer now; the job retries later."""


class GatewayBusy(GatewayUnavailable):
    """Over a rate limit (the deployment's, or the gateway answered 429): retry after
    ``retry_after_s`` seconds."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class OverRate(GatewayBusy):
    """The deployment's own shared rate (``engine.gatewaylimit``) has no slot soon enough: the
    call was not sent. Not a failure of the gateway (workers do not count it as an outage)."""


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


@dataclass(frozen=True, slots=True)
class EventPage:
    events: list[dict[str, Any]]  # Stripe-shaped events, newest first
    has_more: bool


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

    async def event_page(self, since: int, starting_after: str | None) -> EventPage:
        """Up to ``EVENT_PAGE`` events created at or after ``since`` (unix seconds), newest
        first, after the event ``starting_after`` (None: from the newest): what changed at the
        gateway, for reconciliation."""
        ...

    async def aclose(self) -> None: ...


def intent_of(obj: Any) -> Intent:
    """An ``Intent`` from Stripe's payment intent object (the SDK's, or an event's dict)."""
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


log = logging.getLogger("flashsale.payments")

# Stripe's answers worth a retry later: no answer, 429, 5xx.
_RETRYABLE = (stripe.APIConnectionError, stripe.RateLimitError, stripe.APIError)


def _unavailable(exc: stripe.StripeError) -> GatewayUnavailable:
    """The retryable error for ``exc``; a 429 carries how much later (Retry-After when Stripe
    sends one, else a second: its limits are per second)."""
    if not isinstance(exc, stripe.RateLimitError):
        return GatewayUnavailable(str(exc))
    headers = {name.lower(): value for name, value in (exc.headers or {}).items()}
    try:
        retry_after_s = max(1.0, float(headers.get("retry-after", "1")))
    except ValueError:
        retry_after_s = 1.0
    return GatewayBusy(str(exc), retry_after_s=retry_after_s)


class StripeGateway:
    def __init__(self, api_key: str, api_base: str | None = None) -> None:
        # The SDK waits 80 s per try by default, with our two retries four minutes for one call;
        # Stripe answers in well under a second.
        self._http = stripe.HTTPXClient(timeout=GATEWAY_TIMEOUT_S)
        self._client = stripe.StripeClient(
            api_key,
            base_addresses={"api": api_base} if api_base else {},
            http_client=self._http,
            max_network_retries=2,
        )

    async def aclose(self) -> None:
        await self._http.close_async()  # type: ignore[no-untyped-call]

    async def event_page(self, since: int, starting_after: str | None) -> EventPage:
        params: dict[str, Any] = {"created": {"gte": since}, "limit": EVENT_PAGE}
        if starting_after is not None:
            params["starting_after"] = starting_after
        try:
            page = await self._client.v1.events.list_async(params)  # type: ignore[arg-type]
        except _RETRYABLE as exc:
            raise _unavailable(exc) from exc
        return EventPage([event.to_dict() for event in page.data], bool(page.has_more))

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
        except _RETRYABLE as exc:
            raise _unavailable(exc) from exc
        return intent_of(obj)

    async def retrieve_intent(self, intent_id: str) -> Intent:
        try:
            return intent_of(await self._client.v1.payment_intents.retrieve_async(intent_id))
        except _RETRYABLE as exc:
            raise _unavailable(exc) from exc
        except stripe.StripeError as exc:  # e.g. no such intent (another account or mode)
            raise GatewayRefused(str(exc)) from exc

    async def cancel_intent(self, intent_id: str) -> Intent:
        try:
            return intent_of(await self._client.v1.payment_intents.cancel_async(intent_id))
        except stripe.InvalidRequestError:
            # Stripe refuses to cancel an intent that succeeded (or is already canceled):
            # what it is now decides what the caller does.
            return await self.retrieve_intent(intent_id)
        except _RETRYABLE as exc:
            raise _unavailable(exc) from exc

    async def refund(self, intent_id: str, order_id: str) -> str:
        try:
            refund = await self._client.v1.refunds.create_async(
                {"payment_intent": intent_id, "metadata": {"order_id": order_id}},
                {"idempotency_key": REFUND_KEY.format(order_id=order_id)},
            )
        except _RETRYABLE as exc:
            raise _unavailable(exc) from exc
        except stripe.InvalidRequestError as exc:
            # Refunded already (from the dashboard, or by us before a crash): that refund is
            # the answer. Anything else is a refusal the operator must see.
            existing = await self._client.v1.refunds.list_async({"payment_intent": intent_id})
            if existing.data:
                return str(existing.data[0].id)
            raise GatewayRefused(str(exc)) from exc
        return str(refund.id)


async def events_since(gateway: PaymentGateway, since: int) -> AsyncIterator[list[dict[str, Any]]]:
    """The gateway's events created at or after ``since`` (unix seconds), a page at a time
    (one gateway call each), newest first."""
    after: str | None = None
    while True:
        page = await gateway.event_page(since, after)
        if page.events:
            yield page.events
        if not page.has_more or not page.events:
            return
        after = page.events[-1]["id"]


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


def make_gateway(
    settings: Settings, redis: Redis, max_wait_s: float | None = None
) -> PaymentGateway:
    """The deployment's gateway (Stripe with a key, else the mock), every call passing the
    rate limit shared through ``redis``. ``max_wait_s``: the longest a call waits for its
    slot before ``GatewayBusy`` (default: what a shopper's pay call waits)."""
    # Imported here: both build on this module's interface.
    from engine.gatewaylimit import PAY_MAX_WAIT_S, GatewayLimiter, RateLimitedGateway
    from engine.mockgateway import MockGateway

    inner: PaymentGateway
    if settings.stripe_api_key:
        inner = StripeGateway(settings.stripe_api_key, settings.stripe_api_base)
    else:
        if settings.environment == "production":
            log.warning(
                "FLASHSALE_STRIPE_API_KEY is not set: payments go to the offline mock gateway "
                "and no money moves"
            )
        inner = MockGateway(redis)
    limiter = GatewayLimiter(redis, settings.gateway_rate_per_s)
    return RateLimitedGateway(inner, limiter, PAY_MAX_WAIT_S if max_wait_s is None else max_wait_s)
