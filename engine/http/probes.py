"""Routes about the service itself: liveness, readiness, and its API description (as JSON, and as
a page that reads that JSON)."""

from __future__ import annotations

from functools import cache
from importlib.resources import files

import asyncpg
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from engine.errors import Unavailable
from engine.http.bodies import JSONResponse
from engine.http.context import services
from engine.http.openapi import openapi_document

__all__ = ["docs", "health", "openapi", "ready"]


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def ready(request: Request) -> Response:
    found = services(request)
    problems = {}
    try:
        await found.store.ping()
    except (RedisError, OSError) as exc:
        problems["redis"] = str(exc)
    else:
        # The other routes' failures count into the Redis outage too, but only the order path's
        # connection sees Redis answer again: without orders, the readiness probe says so.
        request.app.state.outage.recovered()
    try:
        # The front door keeps no Postgres pool for the order path (it never uses one); a probe
        # every few seconds can afford its own short connection.
        conn = await asyncpg.connect(found.settings.database_url, timeout=2)
        await conn.close()
    except (TimeoutError, asyncpg.PostgresError, OSError) as exc:
        problems["postgres"] = str(exc)
    if problems:
        raise Unavailable("not-ready", "a backing service is unreachable", checks=problems)
    return JSONResponse({"status": "ready", "checks": {"redis": "ok", "postgres": "ok"}})


async def openapi(request: Request) -> Response:
    return JSONResponse(openapi_document())


@cache
def _docs_page() -> bytes:
    # Shipped in the package (pyproject's package-data): no CDN, nothing fetched but the JSON.
    return files("engine.http").joinpath("static/docs.html").read_bytes()


async def docs(request: Request) -> Response:
    return HTMLResponse(_docs_page())
