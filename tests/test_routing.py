"""One route table, one request hook: every route of the app passes the hook, the order route
(answered in front of Starlette) included, and a hook can refuse a request before it runs."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis
from starlette.routing import Route
from starlette.types import Scope

from engine.errors import ProblemError
from engine.http.app import create_app
from engine.http.routing import BareRoute, FrontDoor, RequestHook
from engine.keys import sale_keys
from engine.settings import Settings
from tests.conftest import SaleFactory
from tests.test_app import auth, place


@dataclass
class Recorder(RequestHook):
    entered: list[str] = field(default_factory=list)
    left: list[tuple[str, str, int, str | None]] = field(default_factory=list)
    refuse: bool = False

    def enter(self, scope: Scope) -> None:
        self.entered.append(scope["path"])
        if self.refuse:
            raise ProblemError(
                "rate-limited", "slow down", status=429, headers={"Retry-After": "1"}
            )

    def leave(
        self, scope: Scope, route: str, status: int, code: str | None, seconds: float
    ) -> None:
        assert seconds >= 0
        self.left.append((scope["method"], route, status, code))


@pytest.fixture
async def hooked(settings: Settings, redis: Redis) -> AsyncIterator[tuple[Recorder, Any]]:
    recorder = Recorder()
    app = create_app(settings, redis, hook=recorder)
    transport = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            yield recorder, c


def _templates(app: FrontDoor) -> set[tuple[str, str]]:
    found = set()
    for route in app.routes:
        assert isinstance(route, Route | BareRoute), route
        methods = route.methods or set()
        found |= {(method, route.path) for method in methods if method != "HEAD"}
    return found


async def test_every_route_in_the_table_passes_the_hook(
    hooked: tuple[Recorder, httpx.AsyncClient], settings: Settings, redis_sale: SaleFactory
) -> None:
    recorder, client = hooked
    sale = await redis_sale()
    placed = await place(client, settings, sale)
    assert placed.status_code == 201
    order = placed.json()["id"]
    app = create_app(settings)
    # Every other route of the table, once, whatever it answers (most refuse these requests).
    ids = {"sale_id": sale.id, "order_id": order, "event_id": "evt_1", "subscription_id": "sub_1"}
    for method, template in sorted(_templates(app)):
        if (method, template) != ("POST", "/v1/sales/{sale_id}/orders"):
            await client.request(method, template.format(**ids), headers=auth(settings))
    seen = {(method, route) for method, route, _, _ in recorder.left}
    assert _templates(app) <= seen
    assert len(recorder.entered) == len(recorder.left)
    # What the hook hears is what the client got: status and problem code.
    assert ("POST", "/v1/sales/{sale_id}/orders", 201, None) in recorder.left
    assert ("POST", "/v1/webhooks/stripe", 400, "invalid-signature") in recorder.left
    assert (
        "POST",
        "/v1/admin/orders/{order_id}/refund",
        403,
        "admin-role-required",
    ) in recorder.left


async def test_the_hook_hears_failures_and_unmatched_paths_by_template(
    hooked: tuple[Recorder, httpx.AsyncClient], settings: Settings, redis_sale: SaleFactory
) -> None:
    recorder, client = hooked
    sale = await redis_sale()
    await client.get(f"/v1/sales/{sale.id}/orders")
    await client.post(f"/v1/sales/{sale.id}/orders", content=b"{}")
    await client.get("/no/such/page/123")
    await client.get("/v1/sales/nope")
    assert recorder.left == [
        ("GET", "/v1/sales/{sale_id}/orders", 405, "method-not-allowed"),
        ("POST", "/v1/sales/{sale_id}/orders", 401, "invalid-token"),
        ("GET", "unmatched", 404, "not-found"),
        ("GET", "/v1/sales/{sale_id}", 404, "sale-not-found"),
    ]


async def test_a_hook_refuses_before_the_route_runs_and_nothing_is_written(
    hooked: tuple[Recorder, httpx.AsyncClient],
    settings: Settings,
    redis: Redis,
    redis_sale: SaleFactory,
) -> None:
    recorder, client = hooked
    sale = await redis_sale()
    stock = sale_keys(sale.id).stock
    before = await redis.get(stock)
    recorder.refuse = True
    for refused in (await place(client, settings, sale), await client.get(f"/v1/sales/{sale.id}")):
        assert refused.status_code == 429
        assert refused.headers["content-type"] == "application/problem+json"
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["code"] == "rate-limited"
    assert await redis.get(stock) == before
    assert [status for _, _, status, _ in recorder.left] == [429, 429]


async def test_the_hook_hears_a_request_whose_handler_raised_and_url_paths_still_resolve() -> None:
    """Every enter has its leave, also when a bare handler fails before answering; and a bare
    route in the table does not break reversing the other routes' names."""

    async def broken(scope: Scope, receive: Any, send: Any, param: str) -> int:
        raise RuntimeError("the handler failed before answering")

    async def ok(request: Any) -> Any:
        raise AssertionError("not called")

    recorder = Recorder()
    app = FrontDoor(
        routes=[BareRoute("/things/{id}/do", broken, ["POST"]), Route("/ok", ok, name="ok")],
        hook=recorder,
    )
    scope = {"type": "http", "method": "POST", "path": "/things/1/do", "headers": []}
    with pytest.raises(RuntimeError):
        await app(scope, None, None)  # type: ignore[arg-type]
    assert recorder.left == [("POST", "/things/{id}/do", 499, None)]
    assert app.url_path_for("ok") == "/ok"
