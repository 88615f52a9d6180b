"""The HTTP front door: each shopper action is one Lua call in Redis, nothing else.

The order path (``POST /v1/sales/{id}/orders``, ``engine.orderpath``) makes exactly one Redis
round trip and never touches Postgres: the token is verified locally (and cached), the body is
parsed with orjson, and ``inventory.reserve`` runs one EVALSHA on the process's pipelined Redis
connection. It is answered before Starlette's middleware; every other route goes through it.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from engine import checkout, inventory, webhooks
from engine.auth import TokenVerifier
from engine.db import connect_redis
from engine.errors import (
    Conflict,
    NotFound,
    PayloadTooLarge,
    ProblemError,
    Unauthorized,
    Unavailable,
    problem_response,
    unexpected,
)
from engine.ids import is_sale_id, sale_of_order
from engine.openapi import openapi_document
from engine.orderpath import FrontDoor, OrderRoute, iso_ms, order_body
from engine.payments import make_gateway
from engine.scripts import Code, load_scripts
from engine.settings import Settings

__all__ = ["create_app"]

log = logging.getLogger("flashsale.app")


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def _order_body(order: dict[str, str], sale_id: str) -> dict[str, Any]:
    return order_body(
        order["id"],
        sale_id,
        int(order["qty"]),
        order["state"],
        int(order["version"]),
        int(order["created_ms"]),
        int(order["expires_ms"]),
    )


def create_app(settings: Settings, redis: Redis | None = None) -> Starlette:
    verifier = TokenVerifier(settings)
    order_route = OrderRoute(settings, verifier)
    state: dict[str, Any] = {}
    webhook_secret = settings.webhook_secret or ""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        client = redis or connect_redis(settings)
        state["redis"] = client
        state["gateway"] = make_gateway(settings, client)
        # Webhooks and payments only: the order path never takes a Postgres connection.
        state["db"] = await asyncpg.create_pool(settings.database_url, min_size=0, max_size=8)
        await load_scripts(client)
        try:
            yield
        finally:
            await order_route.aclose()
            await state["gateway"].aclose()
            await state["db"].close()
            if redis is None:
                await client.aclose()

    def _sale_id(request: Request) -> str:
        sale_id: str = request.path_params["sale_id"]
        if not is_sale_id(sale_id):
            raise NotFound("sale-not-found", f"there is no sale {sale_id!r}")
        return sale_id

    def _order_ids(request: Request) -> tuple[str, str]:
        order_id: str = request.path_params["order_id"]
        sale_id = sale_of_order(order_id)
        if sale_id is None:
            raise NotFound("order-not-found", f"there is no order {order_id!r}")
        return sale_id, order_id

    async def get_sale(request: Request) -> Response:
        sale_id = _sale_id(request)
        sale = await inventory.read_sale(state["redis"], sale_id)
        if sale is None:
            raise NotFound("sale-not-found", f"there is no sale {sale_id!r}")
        return JSONResponse(
            {
                "id": sale_id,
                "name": sale.get("name", sale_id),
                "status": sale["status"],
                "starts_at": iso_ms(int(sale["start_ms"])),
                "ends_at": iso_ms(int(sale["end_ms"])),
                "price": int(sale["price"]),
                "currency": sale["currency"],
                "per_user_limit": int(sale["per_user_limit"]),
                "per_order_max": int(sale["per_order_max"]),
                "hold_seconds": int(sale["hold_ms"]) // 1000,
                "units_left": int(sale["stock"]),
            }
        )

    async def get_order(request: Request) -> Response:
        user = verifier.user_of(request.headers.get("authorization"))
        sale_id, order_id = _order_ids(request)
        order = await inventory.read_order(state["redis"], sale_id, order_id)
        # Someone else's order answers exactly like a missing one: ids are not secrets, but
        # who bought what is.
        if order is None or order["user"] != user:
            raise NotFound("order-not-found", f"there is no order {order_id!r}")
        return JSONResponse(_order_body(order, sale_id))

    async def cancel_order(request: Request) -> Response:
        user = verifier.user_of(request.headers.get("authorization"))
        sale_id, order_id = _order_ids(request)
        result = await inventory.release(state["redis"], sale_id, order_id, "cancelled", user)
        if result.code is Code.ALREADY_FINAL and result.state != "cancelled":
            raise Conflict(
                "order-not-cancellable",
                f"the order is {result.state} and can no longer be cancelled",
                state=result.state,
            )
        order = await inventory.read_order(state["redis"], sale_id, order_id)
        assert order is not None  # orders are never deleted while their sale is live
        return JSONResponse(_order_body(order, sale_id))

    async def pay_order(request: Request) -> Response:
        user = verifier.user_of(request.headers.get("authorization"))
        sale_id, order_id = _order_ids(request)
        payment = await checkout.payment_for(
            state["redis"], state["gateway"], sale_id, order_id, user
        )
        return JSONResponse(payment)

    async def stripe_webhook(request: Request) -> Response:
        body = await request.body()
        if len(body) > 256 * 1024:
            raise PayloadTooLarge("body-too-large", "a webhook body may be at most 256 KiB")
        event = webhooks.verify(
            body,
            request.headers.get("stripe-signature"),
            webhook_secret,
            settings.webhook_tolerance_s,
        )
        outcome = await webhooks.receive(state["db"], state["redis"], state["gateway"], event)
        return JSONResponse({"received": True, "outcome": outcome})

    async def admin_refund(request: Request) -> Response:
        token = request.headers.get("authorization", "")
        if not settings.admin_token or not hmac.compare_digest(
            token.encode(), f"Bearer {settings.admin_token}".encode()
        ):
            raise Unauthorized("an admin bearer token is required")
        sale_id, order_id = _order_ids(request)
        restock = request.query_params.get("restock", "false") == "true"
        result = await inventory.refund(state["redis"], sale_id, order_id, "request", restock)
        # The refund at Stripe is made by a worker (or `flashsale order refund`); 202 says so.
        return JSONResponse({"id": order_id, "state": result.state}, status_code=202)

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(request: Request) -> Response:
        problems = {}
        try:
            await state["redis"].ping()
        except (RedisError, OSError) as exc:
            problems["redis"] = str(exc)
        try:
            # The front door keeps no Postgres pool (the order path never uses one); a probe
            # every few seconds can afford its own short connection.
            conn = await asyncpg.connect(settings.database_url, timeout=2)
            await conn.close()
        except (TimeoutError, asyncpg.PostgresError, OSError) as exc:
            problems["postgres"] = str(exc)
        if problems:
            raise Unavailable("not-ready", "a backing service is unreachable", checks=problems)
        return JSONResponse({"status": "ready", "checks": {"redis": "ok", "postgres": "ok"}})

    async def openapi(request: Request) -> Response:
        return JSONResponse(openapi_document())

    async def on_problem(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ProblemError)
        return problem_response(exc, request)

    async def on_http(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        code = {404: "not-found", 405: "method-not-allowed"}.get(exc.status_code, "bad-request")
        problem = ProblemError(code, str(exc.detail), status=exc.status_code)
        return problem_response(problem, request)

    async def on_error(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem_response(unexpected(exc), request)

    routes = [
        Route("/v1/sales/{sale_id}", get_sale, methods=["GET"]),
        Route("/v1/orders/{order_id}", get_order, methods=["GET"]),
        Route("/v1/orders/{order_id}/cancel", cancel_order, methods=["POST"]),
        Route("/v1/orders/{order_id}/pay", pay_order, methods=["POST"]),
        Route("/v1/webhooks/stripe", stripe_webhook, methods=["POST"]),
        Route("/v1/admin/orders/{order_id}/refund", admin_refund, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/ready", ready, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
    ]
    # POST /v1/sales/{sale_id}/orders is answered by order_route, in front of all this.
    return FrontDoor(
        order_route,
        routes=routes,
        lifespan=lifespan,
        exception_handlers={
            ProblemError: on_problem,
            HTTPException: on_http,
            Exception: on_error,
        },
    )
