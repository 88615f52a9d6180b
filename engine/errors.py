"""Every error a client can see, each with a stable kebab-case code and an HTTP status.

They render as RFC 9457 ``application/problem+json``; ``type`` is a stable URI built from the
code, so documentation can link to it, and ``title`` is the reason phrase of the status::

    ProblemError (500)              internal-error
    ├── BadRequest (400)            missing-idempotency-key, invalid-idempotency-key,
    │                               invalid-signature, invalid-payload
    ├── Unauthorized (401)          invalid-token
    ├── Forbidden (403)             insufficient-scope, admin-role-required
    ├── NotFound (404)              sale-not-found, order-not-found, not-found,
    │                               event-not-found, report-not-found, api-key-not-found*,
    │                               subscription-not-found
    ├── MethodNotAllowed (405)      method-not-allowed
    ├── RequestTimeout (408)        request-timeout
    ├── SaleClosed                  sale-not-started (425), sale-paused (403), sale-ended (410)
    ├── Conflict (409)              sold-out, limit-exceeded, order-not-cancellable,
    │                               order-not-payable, order-not-refundable,
    │                               invalid-status, sale-exists, sale-started
    ├── PayloadTooLarge (413)       body-too-large
    ├── UnsupportedMediaType (415)  unsupported-media-type
    ├── Unprocessable (422)         invalid-body, invalid-quantity, quantity-exceeds-maximum,
    │                               idempotency-key-reused, invalid-sale, invalid-query,
    │                               invalid-api-key*,
    │                               invalid-subscription, invalid-parameter
    ├── RequestHeadersTooLarge (431) headers-too-large
    └── Unavailable (503)           not-ready, server-busy, payment-unavailable

    * only the operator's CLI meets these: no HTTP route manages API keys.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any, ClassVar

import orjson
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.requests import Request
from starlette.responses import Response

from engine.logs import Outage

__all__ = [
    "CLI_ONLY_CODES",
    "PROBLEM_MEDIA_TYPE",
    "PROBLEM_SCOPE_KEY",
    "PROBLEM_TYPES",
    "STORE_UNREACHABLE",
    "BadRequest",
    "Conflict",
    "Forbidden",
    "MethodNotAllowed",
    "NotFound",
    "PayloadTooLarge",
    "ProblemError",
    "RequestHeadersTooLarge",
    "RequestTimeout",
    "SaleClosed",
    "Unauthorized",
    "Unavailable",
    "Unprocessable",
    "UnsupportedMediaType",
    "problem_response",
    "unexpected",
]

log = logging.getLogger("flashsale.app")

PROBLEM_BASE = "https://flashsale.dev/problems/"
PROBLEM_MEDIA_TYPE = "application/problem+json"
# Where an answered problem leaves its code in the ASGI scope, for the front door's request hook.
PROBLEM_SCOPE_KEY = "flashsale.problem"

# A title per status, not per class: one class answers several statuses (SaleClosed), and a
# problem raised with an explicit status must not keep its class's title.
_TITLES = {status.value: status.phrase for status in HTTPStatus}


class ProblemError(Exception):
    status: ClassVar[int] = 500

    def __init__(
        self,
        code: str,
        detail: str,
        *,
        status: int | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.status_code = status or self.status
        self.headers = headers or {}
        self.extra = extra

    @property
    def title(self) -> str:
        return _TITLES.get(self.status_code, "Error")

    def body(self, instance: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "type": PROBLEM_BASE + self.code,
            "title": self.title,
            "status": self.status_code,
            "code": self.code,
            "detail": self.detail,
        }
        if instance is not None:
            body["instance"] = instance
        body.update(self.extra)
        return body


class BadRequest(ProblemError):
    status = 400


class Unauthorized(ProblemError):
    status = 401

    def __init__(self, detail: str) -> None:
        super().__init__(
            "invalid-token", detail, headers={"WWW-Authenticate": 'Bearer error="invalid_token"'}
        )


class Forbidden(ProblemError):
    """Who is asking is known, and may not do this."""

    status = 403


class NotFound(ProblemError):
    status = 404


class MethodNotAllowed(ProblemError):
    status = 405

    def __init__(self, allow: str) -> None:
        """``allow``: the path's methods, as the ``Allow`` header lists them."""
        super().__init__(
            "method-not-allowed", f"this resource answers {allow} only", headers={"Allow": allow}
        )


class SaleClosed(ProblemError):
    """The status says why: not started (425), paused (403), ended (410)."""


class Conflict(ProblemError):
    status = 409


class RequestTimeout(ProblemError):
    status = 408


class PayloadTooLarge(ProblemError):
    status = 413


class UnsupportedMediaType(ProblemError):
    status = 415


class Unprocessable(ProblemError):
    status = 422


class RequestHeadersTooLarge(ProblemError):
    status = 431


class Unavailable(ProblemError):
    """Worth retrying, and every one says when (``Retry-After``, seconds): a store restarting or
    failing over is back within seconds, and a storm of shoppers retrying at once only adds load."""

    status = 503

    def __init__(self, code: str, detail: str, *, retry_after_s: int = 1, **extra: Any) -> None:
        super().__init__(code, detail, headers={"Retry-After": str(retry_after_s)}, **extra)


# Every code a client can meet, with its status; the OpenAPI document and the tests read this.
PROBLEM_TYPES: dict[str, int] = {
    "missing-idempotency-key": 400,
    "invalid-idempotency-key": 400,
    "invalid-signature": 400,
    "invalid-payload": 400,
    "invalid-token": 401,
    "sale-paused": 403,
    "insufficient-scope": 403,
    "admin-role-required": 403,
    "sale-not-found": 404,
    "order-not-found": 404,
    "not-found": 404,
    "event-not-found": 404,
    "report-not-found": 404,
    "api-key-not-found": 404,
    "subscription-not-found": 404,
    "method-not-allowed": 405,
    "request-timeout": 408,
    "sold-out": 409,
    "limit-exceeded": 409,
    "order-not-cancellable": 409,
    "order-not-payable": 409,
    "order-not-refundable": 409,
    "invalid-status": 409,
    "sale-exists": 409,
    "sale-started": 409,
    "sale-ended": 410,
    "body-too-large": 413,
    "unsupported-media-type": 415,
    "invalid-body": 422,
    "invalid-quantity": 422,
    "quantity-exceeds-maximum": 422,
    "idempotency-key-reused": 422,
    "invalid-sale": 422,
    "invalid-query": 422,
    "invalid-api-key": 422,
    "invalid-subscription": 422,
    "invalid-parameter": 422,
    "sale-not-started": 425,
    "headers-too-large": 431,
    "internal-error": 500,
    "not-ready": 503,
    "server-busy": 503,
    "payment-unavailable": 503,
}

# The codes of PROBLEM_TYPES only the operator's CLI meets (managing API keys); no HTTP route
# answers them.
CLI_ONLY_CODES = frozenset({"invalid-api-key", "api-key-not-found"})


# A store that cannot be reached or did not answer in time: an outage, not a fault of the code.
# Redis's error replies (a broken script, READONLY, OOM) are RedisErrors outside this set.
STORE_UNREACHABLE = (RedisConnectionError, RedisTimeoutError, OSError)


def unexpected(exc: Exception, outage: Outage, where: str) -> ProblemError:
    """The problem to answer for an exception nothing else handled, never a bare 500 page, and
    logged once: an unreachable store counts into ``outage`` (its start and end are logged, not
    a traceback per request), anything else is logged with its traceback, naming ``where``.
    Every Redis failure is a 503 worth retrying (with the same Idempotency-Key the retry is
    safe whether or not the first attempt ran)."""
    if isinstance(exc, STORE_UNREACHABLE):
        outage.failed(exc)
    else:
        log.error("unhandled error on %s", where, exc_info=exc)
    if isinstance(exc, RedisError | OSError):
        return Unavailable(
            "not-ready",
            "the inventory store is unreachable or stalled; retry with the same Idempotency-Key",
        )
    return ProblemError(
        "internal-error", "the server failed unexpectedly; retry with the same Idempotency-Key"
    )


def problem_response(error: ProblemError, request: Request | None = None) -> Response:
    instance = None
    if request is not None:
        instance = request.url.path
        request.scope[PROBLEM_SCOPE_KEY] = error.code
    return Response(
        orjson.dumps(error.body(instance)),
        status_code=error.status_code,
        media_type=PROBLEM_MEDIA_TYPE,
        headers=error.headers,
    )
