"""The OpenAPI document held to the app: its route table, its problem codes, the limits its
handlers enforce, the headers it sends, and what the real app answers to bad requests."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
from redis.asyncio import Redis

from engine import inventory
from engine.apikeys import create_key
from engine.errors import CLI_ONLY_CODES, PROBLEM_MEDIA_TYPE, PROBLEM_TYPES, ProblemError
from engine.http.app import create_app
from engine.http.auth import mint_token
from engine.http.bodies import MAX_QUANTITY, quantity_of
from engine.http.openapi import openapi_document
from engine.http.webhooks import MAX_WEBHOOK_BYTES
from engine.ids import IDEMPOTENCY_KEY_PATTERN, is_idempotency_key
from engine.payments import signed_event
from engine.settings import Settings
from tests.conftest import SaleFactory

DOC = openapi_document()
EVERY = DOC["x-every-request"]
OPERATIONS: dict[tuple[str, str], dict[str, Any]] = {
    (method.upper(), path): op for path, item in DOC["paths"].items() for method, op in item.items()
}
ORDERS = ("POST", "/v1/sales/{sale_id}/orders")
SECRET = "whsec_openapi_tests"
ADMIN = "admin-" + "o" * 24
# Headers every answer carries, described by the content of the response rather than by name.
ENTITY_HEADERS = {"content-type", "content-length"}
# Nothing a request can do makes the app fail unexpectedly.
UNPROVOKABLE = {"internal-error"}
# Answered by the server's HTTP protocol before the app (tests/test_limits.py, a real server).
BY_THE_PROTOCOL = {"request-timeout", "headers-too-large"}
# Answered only when more orders wait for Redis at once than these requests, one at a time, make
# (tests/test_deadlines.py provokes it), or when a store is down (the next test).
NEEDS_A_CROWD_OR_AN_OUTAGE = {"not-ready", "server-busy"}


def refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        if "$ref" in node:
            yield node["$ref"]
        for value in node.values():
            yield from refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from refs(value)


def resolve(node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        found: Any = DOC
        for part in node["$ref"].removeprefix("#/").split("/"):
            found = found[part]
        node = found
    return node


def routes_of_the_app() -> set[tuple[str, str]]:
    app = create_app(Settings(environment="test", jwt_secret="t" * 32))
    routes = set()
    for route in app.routes:
        methods = set(getattr(route, "methods", None) or ())
        if "GET" in methods:
            methods.discard("HEAD")  # Starlette adds it to every GET: a GET without the body
        routes |= {(method, route.path) for method in methods}  # type: ignore[attr-defined]
    return routes


def test_the_document_has_the_shape_of_openapi_3_1():
    assert re.fullmatch(r"3\.1\.\d+", DOC["openapi"])
    assert DOC["info"]["title"] and isinstance(DOC["info"]["version"], str)
    assert orjson.loads(orjson.dumps(DOC)) == DOC  # JSON all through
    for ref in refs(DOC):
        assert ref.startswith("#/components/"), ref
        resolve({"$ref": ref})
    schemes = DOC["components"]["securitySchemes"]
    ids = [op["operationId"] for op in OPERATIONS.values()]
    assert len(ids) == len(set(ids))
    for (method, path), op in OPERATIONS.items():
        assert method in {"GET", "PUT", "POST", "DELETE", "PATCH"} and path.startswith("/")
        parameters = op.get("parameters", [])
        in_path = {p["name"] for p in parameters if p["in"] == "path"}
        assert in_path == set(re.findall(r"{(\w+)}", path)), path
        for parameter in parameters:
            assert parameter["in"] in {"path", "query", "header"} and "schema" in parameter
            assert parameter["in"] != "path" or parameter["required"] is True
            # OpenAPI ignores these as parameters: security and content describe them.
            assert parameter["name"].lower() not in {"authorization", "content-type", "accept"}
        for requirement in op.get("security", []):
            assert set(requirement) <= set(schemes)
    for responses in [op["responses"] for op in OPERATIONS.values()] + [EVERY["responses"]]:
        assert responses
        for status, response in responses.items():
            assert re.fullmatch(r"[1-5]\d\d", status) and resolve(response)["description"]
            for header in response.get("headers", {}).values():
                assert "schema" in header and header["description"]


def test_every_route_of_the_table_is_documented_and_nothing_else():
    assert set(OPERATIONS) == routes_of_the_app()


def test_every_problem_code_is_documented_with_its_status():
    listed = [
        *EVERY["x-problem-codes"],
        *(c for op in OPERATIONS.values() for c in op["x-problem-codes"]),
    ]
    assert set(listed) == set(PROBLEM_TYPES) - CLI_ONLY_CODES
    problem = DOC["components"]["schemas"]["Problem"]
    assert set(problem["properties"]["code"]["enum"]) == set(PROBLEM_TYPES) - CLI_ONLY_CODES
    for source in [*OPERATIONS.values(), EVERY]:
        codes = source["x-problem-codes"]
        assert {str(PROBLEM_TYPES[code]) for code in codes} <= set(source["responses"])
        for status, response in source["responses"].items():
            if int(status) < 400:
                continue
            narrowed = response["content"][PROBLEM_MEDIA_TYPE]["schema"]["allOf"][1]["properties"]
            assert narrowed["status"]["const"] == int(status)
            # Each error response names exactly the operation's codes of its status.
            assert narrowed["code"]["enum"] == [c for c in codes if PROBLEM_TYPES[c] == int(status)]


def test_the_order_body_and_key_limits_are_the_ones_the_route_enforces():
    place = OPERATIONS[ORDERS]
    body = place["requestBody"]["content"]["application/json"]["schema"]
    quantity = body["properties"]["quantity"]
    assert (quantity["minimum"], quantity["maximum"]) == (1, MAX_QUANTITY)
    assert quantity_of(b'{"quantity": %d}' % MAX_QUANTITY) == MAX_QUANTITY
    for refused in (quantity["minimum"] - 1, quantity["maximum"] + 1):
        with pytest.raises(ProblemError, match="quantity"):
            quantity_of(b'{"quantity": %d}' % refused)
    assert body["additionalProperties"] is False and body["required"] == ["quantity"]
    with pytest.raises(ProblemError, match="unknown fields"):
        quantity_of(b'{"quantity": 1, "coupon": "x"}')

    (key,) = [p for p in place["parameters"] if p["name"] == "Idempotency-Key"]
    assert key["required"] and key["schema"]["pattern"] == f"^{IDEMPOTENCY_KEY_PATTERN}$"
    documented = re.compile(key["schema"]["pattern"])
    for sample in ["k", "a.b:c_d-e", "x" * 128, "x" * 129, "", "has space", "{tag}", "é", "a/b"]:
        assert bool(documented.search(sample)) == is_idempotency_key(sample), sample


def test_headers_are_documented_where_the_app_sends_them():
    replayed = OPERATIONS[ORDERS]["responses"]["201"]["headers"]["Idempotent-Replayed"]
    assert replayed["schema"] == {"const": "true"}
    required = {401: "WWW-Authenticate", 405: "Allow", 503: "Retry-After"}
    for source in [*OPERATIONS.values(), EVERY]:
        for status, response in source["responses"].items():
            if int(status) in required:
                assert response["headers"][required[int(status)]]["required"] is True
    assert "405" in EVERY["responses"]
    for op in OPERATIONS.values():
        # A route that reads a bearer token refuses a bad one.
        assert not op.get("security") or "invalid-token" in op["x-problem-codes"]


def assert_documented(key: tuple[str, str], response: httpx.Response) -> str | None:
    """Fail unless the document describes this answer for ``key`` (any operation's problems
    apply to every request); return its problem code, if it is a problem."""
    op = OPERATIONS.get(key, {"x-problem-codes": [], "responses": {}})
    status = response.status_code
    code = None
    if status < 400:
        described = op["responses"].get(str(status))
        assert described is not None, f"{key} answered an undocumented {status}"
    else:
        assert response.headers["content-type"] == PROBLEM_MEDIA_TYPE
        body = response.json()
        code = body["code"]
        owner = op if code in op["x-problem-codes"] else EVERY
        assert code in owner["x-problem-codes"], f"{key} answered an undocumented {code}"
        assert PROBLEM_TYPES[code] == body["status"] == status
        described = owner["responses"][str(status)]
        members = DOC["components"]["schemas"]["Problem"]["properties"]
        assert set(body) <= set(members), f"undocumented members {set(body) - set(members)}"
    media = response.headers["content-type"].split(";")[0]
    assert media in described["content"], f"{key} {status} answered {media}"
    headers = {name.lower(): header for name, header in described.get("headers", {}).items()}
    sent = set(response.headers) - ENTITY_HEADERS
    assert sent <= set(headers), f"{key} {status} sent undocumented {sent - set(headers)}"
    assert {name for name, header in headers.items() if header.get("required")} <= sent
    return code


class Driver:
    """Sends requests to the app and keeps the problem codes each operation answered."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client
        self.answered: dict[tuple[str, str], set[str]] = {}

    async def __call__(
        self, method: str, template: str, url: str, status: int, **kwargs: Any
    ) -> httpx.Response:
        response = await self.client.request(method, url, **kwargs)
        assert response.status_code == status, (method, url, response.text)
        code = assert_documented((method, template), response)
        if code is not None:
            key = (method, template) if (method, template) in OPERATIONS else ("", "")
            self.answered.setdefault(key, set()).add(code)
        return response


@pytest.fixture
async def drive(
    settings: Settings, redis: Redis, db: asyncpg.Pool
) -> AsyncIterator[tuple[Driver, Settings]]:
    # A payment gateway nothing listens at: paying answers payment-unavailable.
    configured = replace(
        settings,
        webhook_secret=SECRET,
        admin_token=ADMIN,
        stripe_api_key="sk_test_openapi",
        stripe_api_base="http://127.0.0.1:1",
    )
    app = create_app(configured, redis)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            yield Driver(client), configured


def shopper(settings: Settings, user: str = "alice", **headers: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {mint_token(settings, user)}", **headers}


def signed(event: dict[str, Any]) -> dict[str, Any]:
    body, header = signed_event(event, SECRET)
    return {"content": body, "headers": {"Stripe-Signature": header}}


def an_event(kind: str = "customer.created") -> dict[str, Any]:
    created = int(time.time())
    return {"id": f"evt_{created}", "type": kind, "created": created, "data": {"object": {}}}


async def admin_routes(
    send: Driver, settings: Settings, db: asyncpg.Pool, sale_id: str, failed: str, event: str
) -> None:
    """Every admin route's problems: each auth refusal on every route, then each route's own."""
    admin = {"Authorization": f"Bearer {ADMIN}"}
    keys = {}
    for scope in ("sales:read", "webhooks:read"):
        keys[scope] = {"Authorization": f"Bearer {(await create_key(db, scope, [scope]))[1]}"}
    ids = {"{sale_id}": sale_id, "{order_id}": failed, "{event_id}": event}
    for (method, template), op in OPERATIONS.items():
        if not template.startswith("/v1/admin/"):
            continue
        url = template
        for name, value in ids.items():
            url = url.replace(name, value)
        await send(method, template, url, 401)
        await send(method, template, url, 403, headers=shopper(settings))
        lacking = "webhooks:read" if op["x-scope"] == "sales:read" else "sales:read"
        await send(method, template, url, 403, headers=keys[lacking])

    now = time.time()
    later = {"starts_at": iso(now + 3600), "ends_at": iso(now + 7200)}
    new_sale = {"id": "s-admin", "stock": 5, "price": 100, "per_user_limit": 1, **later}
    sales, one = "/v1/admin/sales", "/v1/admin/sales/{sale_id}"
    big = {"content": b" " * 10_000, "headers": admin}
    await send("POST", sales, sales, 201, json=new_sale, headers=admin)
    await send("POST", sales, sales, 413, **big)
    await send("POST", sales, sales, 422, json={"id": 5}, headers=admin)
    await send("POST", sales, sales, 422, json={**new_sale, "id": "NO"}, headers=admin)
    await send("POST", sales, sales, 409, json={**new_sale, "stock": 6}, headers=admin)
    await send("GET", sales, sales + "?limit=0", 422, headers=admin)
    await send("GET", one, "/v1/admin/sales/s-admin", 200, headers=admin)
    await send("GET", one, "/v1/admin/sales/NO", 404, headers=admin)
    await send("PATCH", one, "/v1/admin/sales/s-admin", 200, json={"price": 9}, headers=admin)
    await send("PATCH", one, "/v1/admin/sales/s-admin", 413, **big)
    await send("PATCH", one, "/v1/admin/sales/s-admin", 422, json={"stock": 1}, headers=admin)
    # What Postgres could not hold is refused before anything changes, Redis included.
    for bad in (
        {"per_user_limit": 2**31},
        {"ends_at": "9999-12-31T23:59:59-14:00"},
        {"name": "nul\u0000"},
    ):
        await send("PATCH", one, "/v1/admin/sales/s-admin", 422, json=bad, headers=admin)
    await send("POST", sales, sales, 422, json={**new_sale, "stock": 2**31}, headers=admin)
    await send("POST", sales, sales, 422, json={**new_sale, "currency": 5}, headers=admin)
    null_currency = {**new_sale, "id": "s-null-currency", "currency": None}
    await send("POST", sales, sales, 201, json=null_currency, headers=admin)  # the default
    await send("GET", sales, sales + "?cursor=%00", 422, headers=admin)
    await send("GET", sales, sales + "?limit=%C2%B2", 422, headers=admin)
    await send("GET", sales, sales + "?limit=" + "0" * 5000 + "1", 422, headers=admin)
    bad_window = {"ends_at": iso(now - 7200)}
    await send("PATCH", one, "/v1/admin/sales/s-admin", 422, json=bad_window, headers=admin)
    await send("PATCH", one, "/v1/admin/sales/s-gone", 404, json={"price": 1}, headers=admin)
    started = {**new_sale, "id": "s-started", "starts_at": iso(now - 60)}
    await send("POST", sales, sales, 201, json=started, headers=admin)
    await send("PATCH", one, "/v1/admin/sales/s-started", 409, json={"price": 1}, headers=admin)
    restock = one + "/restock"
    url = "/v1/admin/sales/s-started/restock"
    await send("POST", restock, url, 200, json={"units": 2}, headers=admin)
    await send("POST", restock, url, 413, **big)
    await send("POST", restock, url, 422, json={"units": 0}, headers=admin)
    await send(
        "POST", restock, "/v1/admin/sales/s-gone/restock", 404, json={"units": 1}, headers=admin
    )
    for verb in ("pause", "resume", "close"):
        template = f"{one}/{verb}"
        await send("POST", template, f"/v1/admin/sales/s-started/{verb}", 200, headers=admin)
        await send("POST", template, f"/v1/admin/sales/s-gone/{verb}", 404, headers=admin)
    for verb in ("pause", "resume"):
        template = f"{one}/{verb}"
        await send("POST", template, f"/v1/admin/sales/s-started/{verb}", 409, headers=admin)
    await send("POST", restock, url, 409, json={"units": 1}, headers=admin)
    reconcile = one + "/reconcile"
    await send("POST", reconcile, "/v1/admin/sales/s-admin/reconcile", 503, headers=admin)
    url = "/v1/admin/sales/s-admin/reconcile?full=maybe"
    await send("POST", reconcile, url, 422, headers=admin)
    await send("POST", reconcile, "/v1/admin/sales/s-gone/reconcile", 404, headers=admin)
    await send("GET", reconcile, "/v1/admin/sales/s-admin/reconcile", 404, headers=admin)

    orders, order = "/v1/admin/orders", "/v1/admin/orders/{order_id}"
    await send("GET", orders, orders + f"?sale_id={sale_id}", 200, headers=admin)
    await send("GET", orders, orders + "?state=lost", 422, headers=admin)
    await send("GET", order, f"/v1/admin/orders/{failed}", 200, headers=admin)
    await send("GET", order, "/v1/admin/orders/nope", 404, headers=admin)
    for verb in ("cancel", "refund"):
        await send("POST", f"{order}/{verb}", f"/v1/admin/orders/nope/{verb}", 404, headers=admin)
        url = f"/v1/admin/orders/{failed}/{verb}"
        await send("POST", f"{order}/{verb}", url, 409, headers=admin)
    refund_url = f"/v1/admin/orders/{failed}/refund?restock=yes"
    await send("POST", f"{order}/refund", refund_url, 422, headers=admin)  # not a silent false
    events = "/v1/admin/stripe-events"
    await send("GET", events, events, 200, headers=admin)
    await send("GET", events, events + "?pending=maybe", 422, headers=admin)
    apply = events + "/{event_id}/apply"
    await send("POST", apply, f"{events}/{event}/apply", 200, headers=admin)
    await send("POST", apply, f"{events}/evt_none/apply", 404, headers=admin)


def iso(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, tz=UTC).isoformat()


async def test_the_real_app_answers_only_what_is_documented(
    drive: tuple[Driver, Settings], redis: Redis, db: asyncpg.Pool, redis_sale: SaleFactory
):
    send, settings = drive
    sale = await redis_sale(stock=10, per_user_limit=2, per_order_max=2)
    sale_path, orders = f"/v1/sales/{sale.id}", f"/v1/sales/{sale.id}/orders"
    now_ms = int(time.time() * 1000)
    closed = {
        "sold-out": await redis_sale(stock=0),
        "sale-not-started": await redis_sale(start_ms=now_ms + 10**8, end_ms=now_ms + 10**9),
        "sale-ended": await redis_sale(start_ms=1, end_ms=2),
        "sale-paused": await redis_sale(),
    }
    await inventory.set_status(redis, closed["sale-paused"].id, "paused")

    await send("GET", "/v1/sales/{sale_id}", sale_path, 200)
    await send("GET", "/v1/sales/{sale_id}", "/v1/sales/missing", 404)

    def order(key: str | None, quantity: int = 1, **headers: str) -> dict[str, Any]:
        keyed = {"Idempotency-Key": key} if key is not None else {}
        return {"json": {"quantity": quantity}, "headers": shopper(settings, **keyed, **headers)}

    place = ORDERS[1]
    held = (await send("POST", place, orders, 201, **order("k1"))).json()
    replay = await send("POST", place, orders, 201, **order("k1"))
    assert replay.headers["idempotent-replayed"] == "true"
    await send("POST", place, orders, 401, json={"quantity": 1}, headers={"Idempotency-Key": "k"})
    await send("POST", place, orders, 400, **order(None))
    await send("POST", place, orders, 400, **order("has space"))
    await send("POST", place, orders, 422, **order("k1", 2))  # same key, another body
    await send("POST", place, orders, 422, **order("k2", 3))  # over the sale's per_order_max
    await send("POST", place, orders, 409, **order("k3", 2))  # over the shopper's limit
    await send("POST", place, orders, 422, **order("k4", MAX_QUANTITY + 1))
    for content_type, content, status in [
        ("text/plain", b'{"quantity": 1}', 415),
        ("application/json", b"{not json", 422),
        ("application/json", b" " * 10_000, 413),
    ]:
        headers = shopper(settings, **{"Idempotency-Key": "k5", "Content-Type": content_type})
        await send("POST", place, orders, status, content=content, headers=headers)
    await send("POST", place, "/v1/sales/NOT_A_SALE/orders", 404, **order("k6"))
    for code, refused in closed.items():
        url = f"/v1/sales/{refused.id}/orders"
        await send("POST", place, url, PROBLEM_TYPES[code], **order("k7"))

    own, other = shopper(settings), shopper(settings, "mallory")
    for method, template, ok in [
        ("GET", "/v1/orders/{order_id}", 200),
        ("POST", "/v1/orders/{order_id}/pay", 503),  # the gateway is down
        ("POST", "/v1/orders/{order_id}/cancel", 200),
    ]:
        url = template.replace("{order_id}", held["id"])
        await send(method, template, url, 401)
        await send(method, template, url, 404, headers=other)
        await send(method, template, template.replace("{order_id}", "nope"), 404, headers=own)
        await send(method, template, url, ok, headers=own)
    await send(
        "POST", "/v1/orders/{order_id}/pay", f"/v1/orders/{held['id']}/pay", 409, headers=own
    )
    failed = (await send("POST", place, orders, 201, **order("k8"))).json()["id"]
    await inventory.release(redis, sale.id, failed, "failed")
    cancel = "/v1/orders/{order_id}/cancel"
    await send("POST", cancel, f"/v1/orders/{failed}/cancel", 409, headers=own)

    admin = {"Authorization": f"Bearer {ADMIN}"}
    dashboard = "/v1/admin/dashboard"
    await send("GET", dashboard, dashboard, 200, headers=admin)
    await send("GET", dashboard, dashboard, 403, headers=own)  # a shopper's token
    await send("GET", dashboard, dashboard, 401)
    for path in ("/admin", "/admin/dashboard.js"):
        await send("GET", path, path, 200)

    await answer_subscription_routes(send, admin, own)

    hook = "/v1/webhooks/stripe"
    stored = an_event()
    await send("POST", hook, hook, 200, **signed(stored))
    await send("POST", hook, hook, 400, content=orjson.dumps(an_event()))
    await send("POST", hook, hook, 400, **signed({"hello": "world"}))
    await send("POST", hook, hook, 413, content=b" " * (MAX_WEBHOOK_BYTES + 1))

    await admin_routes(send, settings, db, sale.id, failed, stored["id"])

    for path in ("/health", "/ready", "/openapi.json", "/docs"):
        await send("GET", path, path, 200)
    await send("GET", "/nowhere", "/nowhere", 404)
    await send("DELETE", "/health", "/health", 405)
    await send("GET", place, orders, 405)

    # Every code the document lists was answered (the stores' 503 in the next test).
    for key, op in OPERATIONS.items():
        answered = send.answered.get(key, set())
        missing = set(op["x-problem-codes"]) - answered - NEEDS_A_CROWD_OR_AN_OUTAGE
        assert not missing, f"{key} lists {missing} but never answered them here"
    unanswered = set(EVERY["x-problem-codes"]) - send.answered[("", "")]
    assert unanswered == UNPROVOKABLE | BY_THE_PROTOCOL


async def answer_subscription_routes(
    send: Driver, admin: dict[str, str], shopper_headers: dict[str, str]
) -> None:
    """Every webhook subscription route, with each of its answers."""
    base = "/v1/admin/webhooks/subscriptions"
    one, rotate, deliveries = (
        base + "/{subscription_id}",
        one_path("/rotate-secret"),
        one_path("/deliveries"),
    )
    good = {"url": "http://127.0.0.1:9/hook", "event_types": ["order.paid"]}
    created = (await send("POST", base, base, 201, json=good, headers=admin)).json()
    await send("POST", base, base, 403, json=good, headers=shopper_headers)
    await send("POST", base, base, 422, json={**good, "url": "nope"}, headers=admin)
    await send("POST", base, base, 422, json={**good, "url": "http://["}, headers=admin)
    await send("POST", base, base, 422, content=b"{", headers=admin)
    await send("POST", base, base, 413, content=b" " * 9000, headers=admin)
    await send("GET", base, base, 200, headers=admin)
    await send("GET", base, base, 401)
    url = one.replace("{subscription_id}", created["id"])
    missing = one.replace("{subscription_id}", "sub_" + "0" * 24)
    for method, template, ok, kwargs in [
        ("GET", one, 200, {}),
        ("PATCH", one, 200, {"json": {"enabled": True}}),
        ("POST", rotate, 200, {}),
        ("GET", deliveries, 200, {}),
    ]:
        path = template.replace("{subscription_id}", created["id"])
        await send(method, template, path, ok, headers=admin, **kwargs)
        await send(method, template, path, 401, **kwargs)
        await send(method, template, template.replace(one, missing), 404, headers=admin, **kwargs)
    await send("PATCH", one, url, 422, json={"enabled": "yes"}, headers=admin)
    await send("PATCH", one, url, 422, content=b"[]", headers=admin)
    await send("PATCH", one, url, 413, content=b" " * 9000, headers=admin)
    listing = deliveries.replace("{subscription_id}", created["id"])
    await send("GET", deliveries, listing + "?limit=x", 422, headers=admin)
    await send("DELETE", one, url, 401)
    await send("DELETE", one, url, 200, headers=admin)
    await send("DELETE", one, url, 404, headers=admin)


def one_path(tail: str) -> str:
    return "/v1/admin/webhooks/subscriptions/{subscription_id}" + tail


async def test_with_its_stores_down_the_app_answers_what_is_documented(
    settings: Settings, redis: Redis, db: asyncpg.Pool
):
    down = replace(
        settings,
        redis_url="redis://127.0.0.1:1/0",
        database_url="postgresql://postgres@127.0.0.1:1/flashsale",
        webhook_secret=SECRET,
        admin_token=ADMIN,
    )
    app = create_app(down, redis)
    dead = Redis.from_url(down.redis_url)
    order = "s-down.0123456789abcdef"
    requests: dict[tuple[str, str], dict[str, Any]] = {
        ("GET", "/v1/sales/{sale_id}"): {},
        ORDERS: {"json": {"quantity": 1}, "headers": shopper(settings, **{"Idempotency-Key": "k"})},
        ("GET", "/v1/orders/{order_id}"): {"headers": shopper(settings)},
        ("POST", "/v1/orders/{order_id}/cancel"): {"headers": shopper(settings)},
        ("POST", "/v1/orders/{order_id}/pay"): {"headers": shopper(settings)},
        ("POST", "/v1/webhooks/stripe"): signed(an_event("payment_intent.succeeded")),
        **{
            (method, template): {"headers": {"Authorization": f"Bearer {ADMIN}"}}
            for method, template in OPERATIONS
            if template.startswith("/v1/admin/")
        },
        ("POST", "/v1/admin/sales"): {
            "headers": {"Authorization": f"Bearer {ADMIN}"},
            "json": {
                "id": "s-down",
                "stock": 1,
                "price": 1,
                "per_user_limit": 1,
                "starts_at": "2030-01-01T00:00Z",
                "ends_at": "2030-01-02T00:00Z",
            },
        },
        ("PATCH", "/v1/admin/sales/{sale_id}"): {
            "headers": {"Authorization": f"Bearer {ADMIN}"},
            "json": {"price": 1},
        },
        ("POST", "/v1/admin/sales/{sale_id}/restock"): {
            "headers": {"Authorization": f"Bearer {ADMIN}"},
            "json": {"units": 1},
        },
        ("GET", "/metrics"): {},
        ("GET", "/v1/admin/dashboard"): {"headers": {"Authorization": f"Bearer {ADMIN}"}},
        ("GET", "/admin"): {},
        ("GET", "/admin/dashboard.js"): {},
        **{
            (method, template): {
                "headers": {"Authorization": f"Bearer {ADMIN}"},
                "json": {"url": "http://127.0.0.1:9/", "event_types": ["order.paid"]}
                if method == "POST" and template.endswith("subscriptions")
                else ({"enabled": True} if method == "PATCH" else None),
            }
            for (method, template) in OPERATIONS
            if template.startswith("/v1/admin/webhooks/")
        },
        ("GET", "/health"): {},
        ("GET", "/ready"): {},
        ("GET", "/openapi.json"): {},
        ("GET", "/docs"): {},
    }
    assert set(requests) == set(OPERATIONS)
    async with app.router.lifespan_context(app):
        app.state.services.store = dead  # the shared client loses its Redis after start-up
        # An error Starlette's routes did not expect is re-raised after its answer was sent.
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            for (method, template), kwargs in requests.items():
                url = template.replace("{sale_id}", "s-down").replace("{order_id}", order)
                url = url.replace("{event_id}", "evt_down")
                url = url.replace("{subscription_id}", "sub_" + "0" * 24)
                response = await client.request(method, url, **kwargs)
                code = assert_documented((method, template), response)
                lists = "not-ready" in OPERATIONS[method, template]["x-problem-codes"]
                assert code == ("not-ready" if lists else None), (template, response.text)
    await dead.aclose()


async def test_the_docs_page_is_html_that_reads_the_document(settings: Settings, redis: Redis):
    app = create_app(settings, redis)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            response = await client.get("/docs")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    page = response.text
    assert page.lstrip().lower().startswith("<!doctype html>") and '"/openapi.json"' in page
    # Self-contained: nothing is loaded from anywhere but this server.
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert not re.search(r"@import|<link\b", page)
    # It reads the parts of the document this project adds to OpenAPI.
    assert "x-problem-codes" in page and "x-every-request" in page
