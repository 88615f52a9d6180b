"""The two yardsticks ``flashsale bench`` holds the engine against, served exactly like it
(``flashsale serve --app ceiling|baseline``: same uvicorn, loop, parser and worker count).

- **ceiling**: a bare Starlette POST endpoint on the order route that verifies the same bearer
  token (``TokenVerifier``, cache included), checks the Idempotency-Key, parses the same body,
  and answers an order-shaped 201 without storing anything. No server can place an order faster
  than it can do this much, so it bounds what the engine could reach.
- **baseline**: the same endpoint deciding stock in Postgres the way most shops do, with
  ``UPDATE sales_baseline SET stock = stock - $1 WHERE id = $2 AND stock >= $1`` and an order
  INSERT in one transaction on a pooled asyncpg connection.

The baseline's two tables belong to the benchmark, not to the ledger, so they are created here
(``prepare_baseline``) rather than by a migration that would put them in every deployment.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from engine.errors import BadRequest, Conflict, ProblemError, problem_response
from engine.http.asgi import settled
from engine.http.auth import TokenVerifier
from engine.http.bodies import order_body, quantity_of
from engine.ids import is_idempotency_key, new_order_id
from engine.settings import Settings

__all__ = [
    "BASELINE_POOL_SIZE",
    "baseline",
    "baseline_counts",
    "ceiling",
    "create_baseline",
    "create_ceiling",
    "prepare_baseline",
]

# Connections the baseline server keeps to Postgres: its best measured size, so the comparison
# flatters the baseline rather than the engine. Every order updates the same row, and more
# connections only queue on its lock. Measured here (4 s, 64 wrk connections, orders/s): pool 1
# 2,006; 2 3,100-3,314; 4 3,049-3,442; 8 2,642-2,802; 16 1,720-1,953; 32 1,189-1,405;
# 64 1,015-1,037 (asyncpg's default of 10 sits between 8 and 16).
BASELINE_POOL_SIZE = 4

_TABLES = """
CREATE TABLE IF NOT EXISTS sales_baseline (
    id            text PRIMARY KEY,
    stock         integer NOT NULL CHECK (stock >= 0),
    initial_stock integer NOT NULL
);
CREATE TABLE IF NOT EXISTS orders_baseline (
    id              text PRIMARY KEY,
    sale_id         text NOT NULL REFERENCES sales_baseline (id),
    user_id         text NOT NULL,
    quantity        integer NOT NULL CHECK (quantity > 0),
    idempotency_key text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (user_id, idempotency_key)
);
"""


async def prepare_baseline(db: asyncpg.Pool, sale_id: str, stock: int) -> None:
    """Create the baseline's tables if needed and (re)stock one sale in them."""
    await db.execute(_TABLES)
    await db.execute(
        "INSERT INTO sales_baseline (id, stock, initial_stock) VALUES ($1, $2, $2)"
        " ON CONFLICT (id) DO UPDATE SET stock = $2, initial_stock = $2",
        sale_id,
        stock,
    )


async def baseline_counts(db: asyncpg.Pool, sale_id: str) -> dict[str, int]:
    """Stock left, units ordered and the initial stock of a baseline sale."""
    row = await db.fetchrow(
        "SELECT s.stock, s.initial_stock,"
        " (SELECT coalesce(sum(quantity), 0) FROM orders_baseline WHERE sale_id = s.id) AS ordered,"
        " (SELECT count(*) FROM orders_baseline WHERE sale_id = s.id) AS orders"
        " FROM sales_baseline s WHERE s.id = $1",
        sale_id,
    )
    assert row is not None
    return {k: int(v) for k, v in dict(row).items()}


def _order(sale_id: str, quantity: int) -> tuple[str, bytes]:
    """A new order id and the engine's 201 body for it, so every server answers the same
    shape and size (a 10-minute hold, as the bench's sales have)."""
    order_id = new_order_id(sale_id)
    now_ms = int(time.time() * 1000)
    body = orjson.dumps(
        order_body(order_id, sale_id, quantity, "reserved", 1, now_ms, now_ms + 600_000)
    )
    return order_id, body


def _app(settings: Settings, endpoint: Any, lifespan: Any = None) -> Starlette:
    async def on_problem(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ProblemError)
        return problem_response(exc, request)

    async def health(request: Request) -> Response:
        return Response(b'{"status":"ready"}', media_type="application/json")

    return Starlette(
        routes=[
            Route("/v1/sales/{sale_id}/orders", endpoint, methods=["POST"]),
            Route("/ready", health, methods=["GET"]),
        ],
        lifespan=lifespan,
        exception_handlers={ProblemError: on_problem},
    )


def _checked(verifier: TokenVerifier, request: Request) -> str:
    user = verifier.user_of(request.headers.get("authorization"))
    key = request.headers.get("idempotency-key")
    if key is None or not is_idempotency_key(key):
        raise BadRequest("invalid-idempotency-key", "an Idempotency-Key header is required")
    return user


def create_ceiling() -> Starlette:
    settings = Settings.from_env()
    verifier = TokenVerifier(settings)

    async def place_order(request: Request) -> Response:
        _checked(verifier, request)
        quantity = quantity_of(await request.body())
        _, body = _order(request.path_params["sale_id"], quantity)
        return Response(body, status_code=201, media_type="application/json")

    return _app(settings, place_order)


def create_baseline() -> Starlette:
    settings = Settings.from_env()
    verifier = TokenVerifier(settings)
    state: dict[str, asyncpg.Pool] = {}

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        pool = await asyncpg.create_pool(
            settings.database_url, min_size=BASELINE_POOL_SIZE, max_size=BASELINE_POOL_SIZE
        )
        assert pool is not None
        state["db"] = pool
        try:
            yield
        finally:
            await pool.close()

    async def place_order(request: Request) -> Response:
        user = _checked(verifier, request)
        quantity = quantity_of(await request.body())
        sale_id = request.path_params["sale_id"]
        order_id, body = _order(sale_id, quantity)
        async with state["db"].acquire() as conn, conn.transaction():
            left = await conn.fetchval(
                "UPDATE sales_baseline SET stock = stock - $1 WHERE id = $2 AND stock >= $1"
                " RETURNING stock",
                quantity,
                sale_id,
            )
            if left is None:
                raise Conflict("sold-out", "not enough stock left for this quantity")
            await conn.execute(
                "INSERT INTO orders_baseline (id, sale_id, user_id, quantity, idempotency_key)"
                " VALUES ($1, $2, $3, $4, $5)",
                order_id,
                sale_id,
                user,
                quantity,
                request.headers["idempotency-key"],
            )
        return Response(body, status_code=201, media_type="application/json")

    return _app(settings, place_order, lifespan)


def ceiling() -> Starlette:
    """The ceiling's ASGI factory, for uvicorn (settled like the engine's)."""
    return settled(create_ceiling())


def baseline() -> Starlette:
    """The baseline's ASGI factory, for uvicorn (settled like the engine's)."""
    return settled(create_baseline())
