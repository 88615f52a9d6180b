"""The live dashboard: its JSON (``GET /v1/admin/dashboard``, behind the ``sales:read`` scope)
and the page that polls it (``GET /admin``, with its script).

The page and script need no credential: they hold no data. The page asks the operator for the
admin token and sends it with every request it makes, so the JSON is the only thing guarded.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from engine.http.admin import require_scope
from engine.http.bodies import JSONResponse
from engine.http.context import services
from engine.salestats import all_sale_stats

__all__ = ["dashboard", "page", "script"]


async def dashboard(request: Request) -> Response:
    # Checked, not audited: the page reads this every second while it is open; it changes
    # nothing, and a row per poll would bury the actions the audit is for.
    await require_scope(request, "sales:read")
    now_ms, stats = await all_sale_stats(services(request).store)
    return JSONResponse({"server_time_ms": now_ms, "sales": [s.as_json() for s in stats]})


@cache
def _static(name: str) -> bytes:
    # Shipped in the package (pyproject's package-data): nothing is fetched from elsewhere.
    return files("engine.http").joinpath("static", name).read_bytes()


async def page(request: Request) -> Response:
    return HTMLResponse(_static("dashboard.html"))


async def script(request: Request) -> Response:
    return Response(_static("dashboard.js"), media_type="text/javascript")
