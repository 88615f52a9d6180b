"""Every HTTP route and error code, through the real app and a real Redis."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from http import HTTPStatus

import httpx
import pytest
from redis.asyncio import Redis

from engine import inventory
from engine.errors import PROBLEM_TYPES
from engine.http.app import create_app
from engine.http.auth import mint_token
from engine.inventory import SaleDefinition, set_status
from engine.settings import Settings
from tests.conftest import SaleFactory
from tests.test_scripts import snapshot


def auth(settings: Settings, user: str = "alice", **headers: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {mint_token(settings, user)}", **headers}


async def place(
    client: httpx.AsyncClient,
    settings: Settings,
    sale: SaleDefinition,
    quantity: int = 1,
    key: str = "k1",
    user: str = "alice",
) -> httpx.Response:
    return await client.post(
        f"/v1/sales/{sale.id}/orders",
        json={"quantity": quantity},
        headers=auth(settings, user, **{"Idempotency-Key": key}),
    )


def assert_problem(response: httpx.Response, status: int, code: str) -> dict[str, object]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["code"] == code and body["status"] == status
    assert body["type"].endswith("/" + code) and body["detail"]
    assert body["title"] == HTTPStatus(status).phrase
    assert PROBLEM_TYPES[code] == status
    return body  # type: ignore[no-any-return]


async def test_read_sale(client: httpx.AsyncClient, redis_sale: SaleFactory):
    sale = await redis_sale(stock=7, price=2500)
    response = await client.get(f"/v1/sales/{sale.id}")
    assert response.status_code == 200
    body = response.json()
    assert body["units_left"] == 7 and body["price"] == 2500 and body["status"] == "open"
    assert body["starts_at"].endswith("+00:00")
    assert_problem(await client.get("/v1/sales/missing"), 404, "sale-not-found")
    assert_problem(await client.get("/v1/sales/BAD{id}"), 404, "sale-not-found")


async def test_place_read_and_cancel_an_order(
    client: httpx.AsyncClient, settings: Settings, redis_sale: SaleFactory
):
    sale = await redis_sale(stock=5, hold_seconds=600)
    response = await place(client, settings, sale, quantity=2)
    assert response.status_code == 201
    order = response.json()
    assert order["state"] == "reserved" and order["quantity"] == 2
    assert "hold_expires_at" in order and "idempotent-replayed" not in response.headers

    # Readable at once, before any worker ran: it comes from Redis.
    read = await client.get(f"/v1/orders/{order['id']}", headers=auth(settings))
    assert read.status_code == 200 and read.json()["id"] == order["id"]
    assert (await client.get(f"/v1/sales/{sale.id}")).json()["units_left"] == 3

    replay = await place(client, settings, sale, quantity=2)
    assert replay.status_code == 201 and replay.json()["id"] == order["id"]
    assert replay.headers["idempotent-replayed"] == "true"

    cancel = await client.post(f"/v1/orders/{order['id']}/cancel", headers=auth(settings))
    assert cancel.status_code == 200 and cancel.json()["state"] == "cancelled"
    again = await client.post(f"/v1/orders/{order['id']}/cancel", headers=auth(settings))
    assert again.status_code == 200 and again.json()["state"] == "cancelled"
    assert (await client.get(f"/v1/sales/{sale.id}")).json()["units_left"] == 5


async def test_someone_elses_order_is_not_found(
    client: httpx.AsyncClient, settings: Settings, redis_sale: SaleFactory
):
    sale = await redis_sale()
    order = (await place(client, settings, sale)).json()
    other = auth(settings, "mallory")
    assert_problem(
        await client.get(f"/v1/orders/{order['id']}", headers=other), 404, "order-not-found"
    )
    cancel = await client.post(f"/v1/orders/{order['id']}/cancel", headers=other)
    assert_problem(cancel, 404, "order-not-found")
    assert_problem(
        await client.get("/v1/orders/not-an-order", headers=other), 404, "order-not-found"
    )


async def test_expired_order_is_not_cancellable(
    client: httpx.AsyncClient, settings: Settings, redis: Redis, redis_sale: SaleFactory
):
    sale = await redis_sale(hold_seconds=1)
    order = (await place(client, settings, sale)).json()
    await asyncio.sleep(1.05)
    await inventory.release(redis, sale.id, order["id"], "expired")
    response = await client.post(f"/v1/orders/{order['id']}/cancel", headers=auth(settings))
    body = assert_problem(response, 409, "order-not-cancellable")
    assert body["state"] == "expired"


@pytest.mark.parametrize(
    ("setup", "status", "code"),
    [
        ("sold-out", 409, "sold-out"),
        ("limit", 409, "limit-exceeded"),
        ("not-started", 425, "sale-not-started"),
        ("ended", 410, "sale-ended"),
        ("paused", 403, "sale-paused"),
        ("reused", 422, "idempotency-key-reused"),
        ("too-many", 422, "quantity-exceeds-maximum"),
    ],
)
async def test_order_refusals(
    client: httpx.AsyncClient,
    settings: Settings,
    redis: Redis,
    redis_sale: SaleFactory,
    setup: str,
    status: int,
    code: str,
):
    overrides: dict[str, int] = {"stock": 10, "per_user_limit": 2, "per_order_max": 2}
    if setup == "sold-out":
        overrides["stock"] = 0
    if setup == "not-started":
        overrides.update(start_ms=10**13, end_ms=10**13 + 1)
    if setup == "ended":
        overrides.update(start_ms=1, end_ms=2)
    sale = await redis_sale(**overrides)
    quantity = 1
    if setup == "paused":
        await set_status(redis, sale.id, "paused")
    if setup == "limit":
        assert (await place(client, settings, sale, 2, "first")).status_code == 201
    if setup == "reused":
        assert (await place(client, settings, sale, 1, "k1")).status_code == 201
        quantity = 2
    if setup == "too-many":
        quantity = 3
    before = await snapshot(redis)
    assert_problem(await place(client, settings, sale, quantity, "k1"), status, code)
    assert await snapshot(redis) == before


async def test_bad_tokens(client: httpx.AsyncClient, settings: Settings, redis_sale: SaleFactory):
    sale = await redis_sale()
    url = f"/v1/sales/{sale.id}/orders"
    wrong_key = Settings(environment="test", jwt_secret="not-the-secret-" + "x" * 32)
    expired = mint_token(settings, "alice", ttl_s=1)

    cases = [
        {},
        {"Authorization": "Basic abc"},
        {"Authorization": "Bearer garbage"},
        {"Authorization": f"Bearer {mint_token(wrong_key, 'alice')}"},
    ]
    for headers in cases:
        response = await client.post(
            url, json={"quantity": 1}, headers={**headers, "Idempotency-Key": "k"}
        )
        assert_problem(response, 401, "invalid-token")
        assert response.headers["www-authenticate"].startswith("Bearer")
    await asyncio.sleep(2.1)
    response = await client.post(
        url,
        json={"quantity": 1},
        headers={"Authorization": f"Bearer {expired}", "Idempotency-Key": "k"},
    )
    assert_problem(response, 401, "invalid-token")


async def test_idempotency_key_is_required_and_checked(
    client: httpx.AsyncClient, settings: Settings, redis_sale: SaleFactory
):
    sale = await redis_sale()
    url = f"/v1/sales/{sale.id}/orders"
    response = await client.post(url, json={"quantity": 1}, headers=auth(settings))
    assert_problem(response, 400, "missing-idempotency-key")
    response = await client.post(
        url, json={"quantity": 1}, headers=auth(settings, **{"Idempotency-Key": "has space"})
    )
    assert_problem(response, 400, "invalid-idempotency-key")


@pytest.mark.parametrize(
    ("content", "content_type", "status", "code"),
    [
        (b"{not json", "application/json", 422, "invalid-body"),
        (b"[1, 2]", "application/json", 422, "invalid-body"),
        (b'{"quantity": 1, "price": 0}', "application/json", 422, "invalid-body"),
        (b"{}", "application/json", 422, "invalid-quantity"),
        (b'{"quantity": "1"}', "application/json", 422, "invalid-quantity"),
        (b'{"quantity": true}', "application/json", 422, "invalid-quantity"),
        (b'{"quantity": 0}', "application/json", 422, "invalid-quantity"),
        (b'{"quantity": -3}', "application/json", 422, "invalid-quantity"),
        (b'{"quantity": 1.5}', "application/json", 422, "invalid-quantity"),
        (b'{"quantity": 100000000000}', "application/json", 422, "invalid-quantity"),
        (b'{"quantity": 1}', "text/plain", 415, "unsupported-media-type"),
        (
            b'{"quantity": 1, "pad": "' + b"x" * 5000 + b'"}',
            "application/json",
            413,
            "body-too-large",
        ),
    ],
)
async def test_malformed_bodies_change_nothing(
    client: httpx.AsyncClient,
    settings: Settings,
    redis: Redis,
    redis_sale: SaleFactory,
    content: bytes,
    content_type: str,
    status: int,
    code: str,
):
    sale = await redis_sale()
    before = await snapshot(redis)
    response = await client.post(
        f"/v1/sales/{sale.id}/orders",
        content=content,
        headers=auth(settings, **{"Idempotency-Key": "k1", "Content-Type": content_type}),
    )
    assert_problem(response, status, code)
    assert await snapshot(redis) == before


async def test_health_ready_and_openapi(client: httpx.AsyncClient):
    assert (await client.get("/health")).json() == {"status": "ok"}
    ready = await client.get("/ready")
    assert ready.status_code == 200, ready.text
    spec = (await client.get("/openapi.json")).json()
    assert spec["openapi"].startswith("3.") and "/v1/sales/{sale_id}/orders" in spec["paths"]


async def test_unknown_urls_and_methods_are_problems_titled_by_their_status(
    client: httpx.AsyncClient, settings: Settings, redis: Redis, redis_sale: SaleFactory
):
    sale = await redis_sale()
    body = assert_problem(await client.get("/nowhere"), 404, "not-found")
    assert body["title"] == "Not Found" and body["instance"] == "/nowhere"
    orders = f"/v1/sales/{sale.id}/orders"
    wrong = [
        ("DELETE", "/health", {"GET", "HEAD"}),
        ("POST", f"/v1/sales/{sale.id}", {"GET", "HEAD"}),
        # The order route is answered in front of Starlette; its 405 must read the same.
        ("GET", orders, {"POST"}),
        ("PUT", orders, {"POST"}),
    ]
    before = await snapshot(redis)
    for method, url, allow in wrong:
        response = await client.request(method, url, json={"quantity": 1}, headers=auth(settings))
        body = assert_problem(response, 405, "method-not-allowed")
        assert body["title"] == "Method Not Allowed"
        assert set(response.headers["allow"].split(", ")) == allow
    assert await snapshot(redis) == before


async def test_ready_reports_an_unreachable_postgres(redis: Redis, settings: Settings):
    broken = replace(settings, database_url="postgresql://postgres@127.0.0.1:1/flashsale")
    app = create_app(broken, redis)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            body = assert_problem(await c.get("/ready"), 503, "not-ready")
    assert "postgres" in body["checks"]  # type: ignore[operator]


async def test_unreachable_store_is_a_503_problem_not_a_500(
    settings: Settings, redis: Redis, redis_sale: SaleFactory
):
    sale = await redis_sale()
    # The order path's own connection points at a port nothing listens on.
    app = create_app(replace(settings, redis_url="redis://127.0.0.1:1/0"), redis)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            response = await place(c, settings, sale)
    body = assert_problem(response, 503, "not-ready")
    assert "unreachable" in str(body["detail"])


async def test_a_huge_body_without_a_length_is_refused_without_reading_it_all(
    client: httpx.AsyncClient,
):
    """Chunked (no Content-Length): the webhook and admin routes stop reading at their limit
    instead of taking the whole body into memory."""
    sent = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal sent
        while sent < 64 * 1024 * 1024:  # far more than any limit here
            sent += 64 * 1024
            yield b" " * (64 * 1024)

    answer = await client.post("/v1/webhooks/stripe", content=endless())
    assert answer.status_code == 413 and answer.json()["code"] == "body-too-large"
    assert sent < 1024 * 1024  # stopped at the 256 KiB limit, give or take a chunk or two
