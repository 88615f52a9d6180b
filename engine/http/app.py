"""The HTTP front door: the app, and the one table of every route it answers.

Each shopper action is one Lua call in Redis. The order route (``POST
/v1/sales/{sale_id}/orders``) makes exactly one Redis round trip and never touches Postgres: it
is a bare ASGI handler answered before Starlette's middleware (``BareRoute``), but it is listed
here with the others and passes the same request hook (``engine.http.routing``).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from engine.db import connect_postgres, connect_redis
from engine.errors import MethodNotAllowed, NotFound, ProblemError, problem_response, unexpected
from engine.http import (
    admin,
    adminops,
    adminorders,
    adminsales,
    dashboard,
    orders,
    probes,
    sales,
    subscriptions,
    webhooks,
)
from engine.http.auth import TokenVerifier
from engine.http.context import Services
from engine.http.metrics import metrics_route
from engine.http.orderroute import OrderRoute
from engine.http.routing import BareRoute, FrontDoor, RequestHook
from engine.logs import Outage
from engine.payments import make_gateway
from engine.scripts import load_scripts
from engine.settings import Settings

__all__ = ["create_app", "route_table"]

log = logging.getLogger("flashsale.app")

# The longest a webhook's Postgres connection attempt or statement may take: Stripe retries a
# webhook that failed, so a 503 beats a request held by a stalled ledger.
POSTGRES_DEADLINE_S = 5.0


_SUBSCRIPTIONS = subscriptions.PATH
_SUBSCRIPTION = _SUBSCRIPTIONS + "/{subscription_id}"


def route_table(order_route: OrderRoute) -> list[BaseRoute]:
    """Every route of the API, in one place."""
    return [
        BareRoute("/v1/sales/{sale_id}/orders", order_route, methods=["POST"]),
        Route("/v1/sales/{sale_id}", sales.get_sale, methods=["GET"]),
        Route("/v1/orders/{order_id}", orders.get_order, methods=["GET"]),
        Route("/v1/orders/{order_id}/cancel", orders.cancel_order, methods=["POST"]),
        Route("/v1/orders/{order_id}/pay", orders.pay_order, methods=["POST"]),
        Route("/v1/webhooks/stripe", webhooks.stripe_webhook, methods=["POST"]),
        Route("/v1/admin/sales", adminsales.create_sale, methods=["POST"]),
        Route("/v1/admin/sales", adminsales.list_sales, methods=["GET"]),
        Route("/v1/admin/sales/{sale_id}", adminsales.show_sale, methods=["GET"]),
        Route("/v1/admin/sales/{sale_id}", adminsales.amend_sale, methods=["PATCH"]),
        Route("/v1/admin/sales/{sale_id}/pause", adminsales.pause_sale, methods=["POST"]),
        Route("/v1/admin/sales/{sale_id}/resume", adminsales.resume_sale, methods=["POST"]),
        Route("/v1/admin/sales/{sale_id}/close", adminsales.close_sale, methods=["POST"]),
        Route("/v1/admin/sales/{sale_id}/restock", adminsales.restock_sale, methods=["POST"]),
        Route("/v1/admin/sales/{sale_id}/reconcile", adminops.run_reconcile, methods=["POST"]),
        Route("/v1/admin/sales/{sale_id}/reconcile", adminops.last_reconcile, methods=["GET"]),
        Route("/v1/admin/orders", adminorders.search_orders, methods=["GET"]),
        Route("/v1/admin/orders/{order_id}", adminorders.show_order, methods=["GET"]),
        Route("/v1/admin/orders/{order_id}/cancel", adminorders.cancel_order, methods=["POST"]),
        Route("/v1/admin/orders/{order_id}/refund", admin.refund_order, methods=["POST"]),
        Route("/v1/admin/stripe-events", adminops.list_stripe_events, methods=["GET"]),
        Route(
            "/v1/admin/stripe-events/{event_id}/apply",
            adminops.apply_stripe_event,
            methods=["POST"],
        ),
        Route("/metrics", metrics_route, methods=["GET"]),
        Route("/v1/admin/dashboard", dashboard.dashboard, methods=["GET"]),
        Route("/admin", dashboard.page, methods=["GET"]),
        Route("/admin/dashboard.js", dashboard.script, methods=["GET"]),
        Route(_SUBSCRIPTIONS, subscriptions.create_subscription, methods=["POST"]),
        Route(_SUBSCRIPTIONS, subscriptions.list_subscriptions, methods=["GET"]),
        Route(_SUBSCRIPTION, subscriptions.get_subscription, methods=["GET"]),
        Route(_SUBSCRIPTION, subscriptions.update_subscription, methods=["PATCH"]),
        Route(_SUBSCRIPTION, subscriptions.delete_subscription, methods=["DELETE"]),
        Route(_SUBSCRIPTION + "/rotate-secret", subscriptions.rotate_secret, methods=["POST"]),
        Route(_SUBSCRIPTION + "/deliveries", subscriptions.list_deliveries, methods=["GET"]),
        Route("/health", probes.health, methods=["GET"]),
        Route("/ready", probes.ready, methods=["GET"]),
        Route("/openapi.json", probes.openapi, methods=["GET"]),
        Route("/docs", probes.docs, methods=["GET"]),
    ]


async def _on_problem(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ProblemError)
    return problem_response(exc, request)


async def _on_http(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    # Starlette raises these two itself: no route has the path, or the path's route has
    # another method. No handler raises HTTPException, so anything else is a fault.
    if exc.status_code == 404:
        problem: ProblemError = NotFound("not-found", f"nothing is at {request.url.path}")
    elif exc.status_code == 405:
        problem = MethodNotAllowed(dict(exc.headers or {}).get("Allow", ""))
    else:
        return await _on_error(request, exc)
    return problem_response(problem, request)


async def _on_error(request: Request, exc: Exception) -> Response:
    where = f"{request.method} {request.url.path}"
    return problem_response(unexpected(exc, request.app.state.outage, where), request)


def create_app(
    settings: Settings, redis: Redis | None = None, hook: RequestHook | None = None
) -> FrontDoor:
    """The engine's ASGI app. ``redis``: a client to use instead of one made from the settings
    (the caller closes it); ``hook``: called around every request (``RequestHook``)."""
    request_hook = hook or RequestHook()
    verifier = TokenVerifier(settings)
    outage = Outage("redis", logging.getLogger("flashsale.redis"))
    order_route = OrderRoute(settings, verifier, outage)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # A request's Redis calls share the order path's deadline: a stalled Redis answers
        # 503 within it instead of holding the request.
        client = redis or connect_redis(settings, deadline_s=settings.redis_deadline_ms / 1000)
        found = Services(
            settings,
            verifier,
            client,
            make_gateway(settings, client),
            # Webhooks and payments only: the order path never takes a Postgres connection.
            await connect_postgres(settings, 0, 8, deadline_s=POSTGRES_DEADLINE_S),
        )
        app.state.services = found
        await load_scripts(client)
        try:
            async with request_hook.running():
                yield
        finally:
            await order_route.aclose()
            await found.payments.aclose()
            await found.ledger.close()
            if redis is None:
                await client.aclose()

    app = FrontDoor(
        routes=route_table(order_route),
        hook=request_hook,
        lifespan=lifespan,
        exception_handlers={
            ProblemError: _on_problem,
            HTTPException: _on_http,
            Exception: _on_error,
        },
    )
    app.state.order_route = order_route
    app.state.outage = outage
    return app
