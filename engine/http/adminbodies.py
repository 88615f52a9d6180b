"""What the admin routes read: JSON object bodies, times, integers and cursor pages.

Every malformed input is a 422 (``invalid-body`` for a body, ``invalid-query`` for the query
string) or a 413, before anything changes.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import orjson
from starlette.requests import Request

from engine.errors import PayloadTooLarge, Unprocessable
from engine.http.context import services

__all__ = ["MAX_PAGE", "json_object", "page_limit", "positive_int", "time_ms"]

# Rows one page of a list answers at most; the default is a screenful.
MAX_PAGE = 500
DEFAULT_PAGE = 50


async def json_object(request: Request, allowed: set[str]) -> dict[str, Any]:
    """The body as a JSON object whose fields are all in ``allowed``."""
    limit = services(request).settings.max_body_bytes
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise PayloadTooLarge("body-too-large", f"the body is over {limit} bytes")
    try:
        parsed = orjson.loads(body or b"{}")
    except orjson.JSONDecodeError:
        raise Unprocessable("invalid-body", "the body is not valid JSON") from None
    if not isinstance(parsed, dict):
        raise Unprocessable("invalid-body", "the body must be a JSON object")
    unknown = set(parsed) - allowed
    if unknown:
        raise Unprocessable("invalid-body", f"unknown fields: {', '.join(sorted(unknown))}")
    return parsed


def positive_int(body: dict[str, Any], name: str, *, minimum: int = 1) -> int:
    value = body.get(name)
    # bool is an int in Python; true must not mean 1.
    if type(value) is not int or value < minimum:
        raise Unprocessable("invalid-body", f"{name} must be an integer >= {minimum}")
    return value


def time_ms(body: dict[str, Any], name: str) -> int:
    """An ISO 8601 time with a zone, as epoch ms (the unit sales keep times in)."""
    value = body.get(name)
    try:
        moment = datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        moment = None
    if moment is None or moment.tzinfo is None:
        raise Unprocessable(
            "invalid-body", f"{name} must be an ISO 8601 time with a zone, e.g. 2030-01-01T12:00Z"
        )
    return int(moment.timestamp() * 1000)


def page_limit(request: Request) -> int:
    raw = request.query_params.get("limit")
    if raw is None:
        return DEFAULT_PAGE
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_PAGE:
        raise Unprocessable("invalid-query", f"limit must be an integer from 1 to {MAX_PAGE}")
    return int(raw)
