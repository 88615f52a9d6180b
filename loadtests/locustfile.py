"""Locust scenarios: shoppers in a flash sale, and Stripe delivering webhooks to it.

Headless, against a running server (README.md, "Load testing" shows the whole set-up)::

    flashsale token --count 5000 --out tokens.tsv
    FLASHSALE_LOCUST_TOKENS=tokens.tsv FLASHSALE_LOCUST_SALE=drop-1 \\
        locust -f loadtests/locustfile.py --headless -u 500 -r 100 -t 2m \\
        --host http://127.0.0.1:8000

Options (flag, or the environment variable beside it):

- ``--tokens`` / ``FLASHSALE_LOCUST_TOKENS``: file of ``user<TAB>token`` lines, as written by
  ``flashsale token --count N --out FILE``; each simulated shopper takes the next one.
- ``--sale`` / ``FLASHSALE_LOCUST_SALE``: the id of the sale to storm.
- ``--webhook-secret`` / ``FLASHSALE_WEBHOOK_SECRET``: the server's webhook signing secret.
  With it, one ``StripeWebhooks`` user signs and delivers ``payment_intent.succeeded`` for the
  orders shoppers paid, with duplicates and out-of-order stale events; without it that user
  stops at once and shoppers still pay (the server's mock gateway makes the intents).

Sold out and over the per-shopper limit are answers a flash sale gives most shoppers, so they
count as outcomes (rows ``outcome sold-out`` / ``outcome limit-exceeded``), not failures; so
does a pay call over the deployment's gateway rate (``outcome payment-unavailable``: 503 with
Retry-After, answered at once).
Anything else unexpected (a 5xx, a wrong replay, a malformed body) is a failure, and locust
exits 1 when there was any.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import random
import time
import uuid
from collections import deque
from typing import Any

from locust import FastHttpUser, between, events, task
from locust.exception import StopUser

# Orders shoppers paid for, waiting for "Stripe" to confirm: (order id, intent id, amount, cur).
PAID: deque[tuple[str, str, int, str]] = deque(maxlen=100_000)
# Events already delivered once, replayed later as Stripe does (at least once, in any order).
DELIVERED: deque[tuple[str, bytes]] = deque(maxlen=1_000)

_tokens: itertools.cycle[tuple[str, str]] | None = None


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    parser.add_argument(
        "--tokens",
        env_var="FLASHSALE_LOCUST_TOKENS",
        default="",
        help="file of user<TAB>token lines (flashsale token --out)",
    )
    parser.add_argument(
        "--sale", env_var="FLASHSALE_LOCUST_SALE", default="", help="id of the sale to storm"
    )
    parser.add_argument(
        "--webhook-secret",
        env_var="FLASHSALE_WEBHOOK_SECRET",
        default="",
        help="webhook signing secret; enables the StripeWebhooks user",
    )


@events.test_start.add_listener
def _load_tokens(environment: Any, **kwargs: Any) -> None:
    global _tokens
    options = environment.parsed_options
    if options is None:
        return
    if not options.tokens or not options.sale:
        raise SystemExit("set --tokens/FLASHSALE_LOCUST_TOKENS and --sale/FLASHSALE_LOCUST_SALE")
    with open(options.tokens) as lines:
        pairs = [tuple(line.rstrip("\n").split("\t", 1)) for line in lines if "\t" in line]
    if not pairs:
        raise SystemExit(f"no user<TAB>token lines in {options.tokens}")
    _tokens = itertools.cycle(pairs)  # type: ignore[arg-type]


def _outcome(environment: Any, name: str) -> None:
    """Count an expected refusal in its own stats row, as a success."""
    environment.events.request.fire(
        request_type="outcome",
        name=name,
        response_time=0,
        response_length=0,
        exception=None,
        context={},
    )


def _problem_code(response: Any) -> str:
    try:
        return str(response.json().get("code", "?"))
    except (ValueError, AttributeError):
        return "?"


class Shopper(FastHttpUser):
    """Reads the sale, orders (sometimes retrying the same key), polls the order, then pays,
    cancels or walks away."""

    weight = 50
    wait_time = between(0.1, 1.0)

    def on_start(self) -> None:
        assert _tokens is not None, "the test_start listener loads the tokens"
        self.user_id, token = next(_tokens)
        self.auth = {"Authorization": f"Bearer {token}"}
        self.sale = self.environment.parsed_options.sale

    def _order(
        self, key: str, quantity: int, first: dict[str, Any] | None
    ) -> dict[str, Any] | None:
        """POST an order; returns the 201 body, None for an expected refusal."""
        headers = {**self.auth, "Idempotency-Key": key}
        with self.client.post(
            f"/v1/sales/{self.sale}/orders",
            json={"quantity": quantity},
            headers=headers,
            name="POST /v1/sales/[id]/orders" + (" (retry)" if first is not None else ""),
            catch_response=True,
        ) as response:
            if response.status_code == 201:
                body: dict[str, Any] = response.json()
                replayed = response.headers.get("Idempotent-Replayed") == "true"
                if first and (not replayed or body.get("id") != first.get("id")):
                    response.failure(f"retry of {key} was not a replay of {first.get('id')}")
                    return None
                response.success()
                return body
            code = _problem_code(response)
            if response.status_code == 409 and code in ("sold-out", "limit-exceeded"):
                response.success()
                _outcome(self.environment, code)
                return None
            response.failure(f"{response.status_code} {code}")
            return None

    @task
    def shop(self) -> None:
        if random.random() < 0.5:
            self.client.get(f"/v1/sales/{self.sale}", name="GET /v1/sales/[id]")
        key = uuid.uuid4().hex
        quantity = random.choice((1, 1, 1, 2))
        order = self._order(key, quantity, None)
        if random.random() < 0.2:  # a double click, or a retry after a timeout: same key, body
            again = self._order(key, quantity, order or {})
            order = order or again
        if order is None:
            return
        order_id = order["id"]
        for _ in range(random.randint(1, 2)):
            self.client.get(f"/v1/orders/{order_id}", headers=self.auth, name="GET /v1/orders/[id]")
        roll = random.random()
        if roll < 0.6:
            self._pay(order_id)
        elif roll < 0.7:
            self.client.post(
                f"/v1/orders/{order_id}/cancel",
                headers=self.auth,
                name="POST /v1/orders/[id]/cancel",
            )
        # else: walks away; the hold expires on its own

    def _pay(self, order_id: str) -> None:
        # -- payments -----------------------------------------------------------------
        # The shopper asks for the order's PaymentIntent; "Stripe" (StripeWebhooks below)
        # later reports it succeeded. With the mock gateway the intent is made by the server.
        with self.client.post(
            f"/v1/orders/{order_id}/pay",
            headers=self.auth,
            name="POST /v1/orders/[id]/pay",
            catch_response=True,
        ) as response:
            if response.status_code == 200:
                body = response.json()
                PAID.append(
                    (
                        order_id,
                        body["payment_intent_id"],
                        int(body.get("amount") or 0),
                        body.get("currency") or "usd",
                    )
                )
                response.success()
            elif response.status_code == 409 and _problem_code(response) == "order-not-payable":
                response.success()  # it expired or was cancelled meanwhile: an outcome
                _outcome(self.environment, "order-not-payable")
            elif response.status_code == 503 and _problem_code(response) == "payment-unavailable":
                # More shoppers paying than the gateway rate lets through: answered at once
                # with Retry-After, by design; an outcome the report counts.
                response.success()
                _outcome(self.environment, "payment-unavailable")
            else:
                response.failure(f"{response.status_code} {_problem_code(response)}")


def _event(
    kind: str, order_id: str, intent_id: str, amount: int, currency: str, created: int
) -> bytes:
    status = "succeeded" if kind == "payment_intent.succeeded" else "requires_payment_method"
    return json.dumps(
        {
            "id": f"evt_{uuid.uuid4().hex[:24]}",
            "object": "event",
            "type": kind,
            "created": created,
            "data": {
                "object": {
                    "id": intent_id,
                    "object": "payment_intent",
                    "status": status,
                    "amount": amount,
                    "currency": currency,
                    "metadata": {"order_id": order_id},
                }
            },
        }
    ).encode()


def _signature(body: bytes, secret: str) -> str:
    """Stripe's scheme: ``t=<unix time>,v1=<hex HMAC-SHA256 of "t.body" under the secret>``."""
    stamp = int(time.time())
    digest = hmac.new(secret.encode(), f"{stamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={stamp},v1={digest}"


class StripeWebhooks(FastHttpUser):
    """Stripe: confirms paid orders by signed webhook, delivers some events twice, and some
    stale ones (an older failure arriving after the success), as Stripe may."""

    fixed_count = 1
    wait_time = between(0.01, 0.05)

    def on_start(self) -> None:
        self.secret = self.environment.parsed_options.webhook_secret
        if not self.secret:
            raise StopUser()

    def _deliver(self, body: bytes, name: str) -> None:
        headers = {
            "Stripe-Signature": _signature(body, self.secret),
            "Content-Type": "application/json",
        }
        with self.client.post(
            "/v1/webhooks/stripe", data=body, headers=headers, name=name, catch_response=True
        ) as response:
            if response.status_code == 200:
                response.success()
            else:
                response.failure(f"{response.status_code} {_problem_code(response)}")

    @task
    def deliver(self) -> None:
        if DELIVERED and random.random() < 0.2:
            _, body = random.choice(DELIVERED)
            self._deliver(body, "POST /v1/webhooks/stripe (duplicate)")
            return
        if not PAID:
            return
        order_id, intent_id, amount, currency = PAID.popleft()
        now = int(time.time())
        body = _event("payment_intent.succeeded", order_id, intent_id, amount, currency, now)
        self._deliver(body, "POST /v1/webhooks/stripe")
        DELIVERED.append((order_id, body))
        if random.random() < 0.2:
            stale = _event(
                "payment_intent.payment_failed", order_id, intent_id, amount, currency, now - 30
            )
            self._deliver(stale, "POST /v1/webhooks/stripe (stale)")
