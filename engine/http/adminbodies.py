"""What the admin routes read: JSON object bodies, times, integers and cursor pages.

Every malformed input is a 422 (``invalid-body`` for a body, ``invalid-query`` for the query
string) or a 413, before anything changes.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
from starlette.requests import Request

from engine.errors import Unprocessable
from engine.http.bodies import read_body
from engine.http.context import services

__all__ = [
    "MAX_PAGE",
    "json_object",
    "page_cursor",
    "page_limit",
    "positive_int",
    "query_flag",
    "time_ms",
]

# Rows one page of a list answers at most; the default is a screenful.
MAX_PAGE = 500
MAX_CURSOR = 200
MAX_INT = 2**31 - 1
DEFAULT_PAGE = 50


async def json_object(
    request: Request, allowed: set[str] | None, limit: int | None = None
) -> dict[str, Any]:
    """The body as a JSON object whose fields are all in ``allowed`` (None: the caller checks
    them), of at most ``limit`` bytes (default ``FLASHSALE_MAX_BODY_BYTES``)."""
    if limit is None:
        limit = services(request).settings.max_body_bytes
    body = await read_body(request, limit)
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise Unprocessable("invalid-body", "the body is not valid JSON") from None
    if not isinstance(parsed, dict):
        raise Unprocessable("invalid-body", "the body must be a JSON object")
    unknown = set(parsed) - allowed if allowed is not None else set()
    if unknown:
        raise Unprocessable("invalid-body", f"unknown fields: {', '.join(sorted(unknown))}")
    if has_nul(parsed):
        raise Unprocessable("invalid-body", "text may not contain NUL characters")
    return parsed


def has_nul(value: Any) -> bool:
    """Whether any string in ``value`` holds a NUL: Postgres text cannot, and would refuse it
    after Redis had been changed."""
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(has_nul(k) or has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(has_nul(v) for v in value)
    return False


def query_flag(request: Request, name: str, default: bool) -> bool:
    """A true/false query parameter; anything else is 422 rather than a silent false."""
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if raw not in ("true", "false"):
        raise Unprocessable("invalid-query", f"{name} must be true or false")
    return raw == "true"


def page_cursor(request: Request) -> str:
    """The ``cursor`` query parameter (the last id of the page before), '' for the first page."""
    cursor = request.query_params.get("cursor", "")
    if len(cursor) > MAX_CURSOR or "\x00" in cursor:
        raise Unprocessable("invalid-query", f"cursor must be an id of at most {MAX_CURSOR} chars")
    return cursor


def positive_int(body: dict[str, Any], name: str, *, minimum: int = 1) -> int:
    value = body.get(name)
    # bool is an int in Python; true must not mean 1. The ledger keeps these as int4.
    if type(value) is not int or not minimum <= value <= MAX_INT:
        raise Unprocessable(
            "invalid-body", f"{name} must be an integer from {minimum} to {MAX_INT}"
        )
    return value


def time_ms(body: dict[str, Any], name: str) -> int:
    """An ISO 8601 time with a zone, as epoch ms (the unit sales keep times in)."""
    value = body.get(name)
    try:
        moment = datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        moment = None
    if moment is not None and moment.tzinfo is not None:
        try:
            # Within what Python and Postgres both hold once moved to UTC (9999-12-31T23:00-14:00
            # is in year 10000 there).
            in_utc = moment.astimezone(UTC)
        except OverflowError:
            in_utc = None
        if in_utc is not None and 1970 <= in_utc.year <= 9998:
            return int(moment.timestamp() * 1000)
    raise Unprocessable(
        "invalid-body",
        f"{name} must be an ISO 8601 time with a zone from 1970 to 9998, e.g. 2030-01-01T12:00Z",
    )


def page_limit(request: Request) -> int:
    raw = request.query_params.get("limit")
    if raw is None:
        return DEFAULT_PAGE
    # isdecimal alone takes '²' and 5,000 digits (int() then raises): ASCII, a few digits.
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 4) or not 1 <= int(raw) <= MAX_PAGE:
        raise Unprocessable("invalid-query", f"limit must be an integer from 1 to {MAX_PAGE}")
    return int(raw)
