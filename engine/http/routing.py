"""The front door's routing: one route table for every route, and one hook every request passes.

Two kinds of route share the table. Most are Starlette ``Route``s and run behind Starlette's
middleware and exception handlers. The order route is a ``BareRoute``: a bare ASGI handler that
``FrontDoor`` answers before any of that, because it carries the storm (a Starlette route was
measured at ~0.65x of the bare handler's orders/s; figures in ``engine.http.orderroute``).

``RequestHook`` is where work that must see every request plugs in (metrics, request ids, rate
limits). ``enter`` runs before the route and may refuse the request by raising a
``ProblemError``; ``leave`` runs after the answer was sent, with the route's template (never the
raw path, so label sets stay bounded), the status, the problem code if any, and the seconds the
request took. The base class does nothing.
"""

from __future__ import annotations

import time
from collections.abc import MutableMapping, Sequence
from typing import Any, Protocol

import orjson
from starlette.applications import Starlette
from starlette.routing import BaseRoute, Match
from starlette.types import Receive, Scope, Send

from engine.errors import PROBLEM_MEDIA_TYPE, PROBLEM_SCOPE_KEY, MethodNotAllowed, ProblemError

__all__ = [
    "BareHandler",
    "BareRoute",
    "FrontDoor",
    "RequestHook",
    "send_problem",
]

# The template reported for a request no route matched (a 404 or a bad method on no route).
UNMATCHED = "unmatched"


class RequestHook:
    """Called around every request the front door answers. Subclass and pass to ``FrontDoor``."""

    def enter(self, scope: Scope) -> None:
        """Before the route runs. Raise a ``ProblemError`` to answer it instead of the route."""

    def leave(
        self, scope: Scope, route: str, status: int, code: str | None, seconds: float
    ) -> None:
        """After the answer was sent (or the client went away: status 499)."""


class BareHandler(Protocol):
    async def __call__(self, scope: Scope, receive: Receive, send: Send, param: str, /) -> int:
        """Answer the request; return the status sent (499 when the client left first)."""
        ...


class BareRoute(BaseRoute):
    """A route of the shape ``PREFIX{param}SUFFIX`` whose handler is bare ASGI. It is matched with
    two string tests, not a regex: every request of the server is tested against it (the regex's
    fullmatch was 3.4 % of the server's CPU under the bench, py-spy)."""

    def __init__(self, path: str, handler: BareHandler, methods: Sequence[str]) -> None:
        head, _, rest = path.partition("{")
        name, _, tail = rest.partition("}")
        if not (head and name and tail):
            raise ValueError(f"a bare route needs one path parameter in its middle: {path!r}")
        self.path = path
        self.param = name
        self.methods = frozenset(methods)
        self.allow = ", ".join(sorted(self.methods))  # the Allow header of its 405s
        self.handler = handler
        self._head = head
        self._tail = tail

    def param_of(self, path: str) -> str | None:
        """The path parameter when ``path`` is this route's, else None."""
        if not (path.startswith(self._head) and path.endswith(self._tail)):
            return None
        value = path[len(self._head) : -len(self._tail)]
        return value if value and "/" not in value else None

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        if scope["type"] == "http" and self.param_of(scope["path"]) is not None:
            return Match.FULL, {"route": self}
        return Match.NONE, {}

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        # FrontDoor answers these before Starlette; this serves a router used on its own.
        param = self.param_of(scope["path"])
        assert param is not None
        if scope["method"] not in self.methods:
            await send_problem(send, MethodNotAllowed(self.allow), scope["path"])
            return
        await self.handler(scope, receive, send, param)


async def send_problem(send: Send, error: ProblemError, instance: str) -> None:
    """Send ``error`` as problem+json with bare ASGI messages."""
    body = orjson.dumps(error.body(instance))
    headers = [
        (b"content-type", PROBLEM_MEDIA_TYPE.encode()),
        (b"content-length", str(len(body)).encode()),
        *((k.lower().encode(), v.encode()) for k, v in error.headers.items()),
    ]
    await send({"type": "http.response.start", "status": error.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class FrontDoor(Starlette):
    """Starlette, with every route in one table, bare routes answered before its middleware (a
    method their table entry does not list is a 405, as on Starlette's routes), and one
    ``RequestHook`` around every HTTP request."""

    def __init__(
        self, *, routes: Sequence[BaseRoute], hook: RequestHook | None = None, **kwargs: Any
    ) -> None:
        super().__init__(routes=list(routes), **kwargs)
        self.bare_routes = [route for route in routes if isinstance(route, BareRoute)]
        self.hook = hook or RequestHook()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        started = time.perf_counter()
        hook = self.hook
        path: str = scope["path"]
        for route in self.bare_routes:
            param = route.param_of(path)
            if param is None:
                continue
            try:
                hook.enter(scope)
                if scope["method"] not in route.methods:
                    raise MethodNotAllowed(route.allow)
            except ProblemError as refused:
                await send_problem(send, refused, path)
                hook.leave(scope, route.path, refused.status_code, refused.code, 0.0)
                return
            status = await route.handler(scope, receive, send, param)
            code = scope.get(PROBLEM_SCOPE_KEY)
            hook.leave(scope, route.path, status, code, time.perf_counter() - started)
            return
        await self._starlette(scope, receive, send, started)

    async def _starlette(self, scope: Scope, receive: Receive, send: Send, started: float) -> None:
        hook = self.hook
        try:
            hook.enter(scope)
        except ProblemError as refused:
            await send_problem(send, refused, scope["path"])
            hook.leave(scope, UNMATCHED, refused.status_code, refused.code, 0.0)
            return
        status = 499

        async def sent(message: MutableMapping[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await super().__call__(scope, receive, sent)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", UNMATCHED)
            seconds = time.perf_counter() - started
            hook.leave(scope, template, status, scope.get(PROBLEM_SCOPE_KEY), seconds)
