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

import contextlib
import time
from collections.abc import AsyncIterator, MutableMapping, Sequence
from typing import Any, Protocol

import orjson
from starlette.applications import Starlette
from starlette.datastructures import URLPath
from starlette.routing import BaseRoute, Match, NoMatchFound
from starlette.types import Receive, Scope, Send

from engine.errors import PROBLEM_MEDIA_TYPE, PROBLEM_SCOPE_KEY, MethodNotAllowed, ProblemError

__all__ = [
    "REPLAYED_SCOPE_KEY",
    "BareHandler",
    "BareRoute",
    "FrontDoor",
    "RequestHook",
    "send_problem",
]

# Set in the scope by the order route when its answer replays an earlier order (a hook counting
# outcomes tells a replay from a new order by it; both are 201).
REPLAYED_SCOPE_KEY = "flashsale.replayed"
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

    def flush(self) -> None:
        """Make what the hook gathered visible now (a scrape of /metrics asks)."""

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Around the app's life (its lifespan): where a hook runs background work."""
        yield


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
        # FrontDoor answers every path of this route before Starlette's router sees a request.
        return Match.NONE, {}

    def url_path_for(self, name: str, /, **path_params: Any) -> URLPath:
        raise NoMatchFound(name, path_params)


async def send_problem(scope: Scope, send: Send, error: ProblemError) -> None:
    """Send ``error`` as problem+json with bare ASGI messages, its code left in the scope for
    the request hook."""
    scope[PROBLEM_SCOPE_KEY] = error.code
    body = orjson.dumps(error.body(scope["path"]))
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
        path: str = scope["path"]
        template = UNMATCHED
        # What the hook hears when the answer never went out (the handler raised, the client
        # left): 499, as proxies log a request the client abandoned.
        status = 499
        try:
            for route in self.bare_routes:
                param = route.param_of(path)
                if param is None:
                    continue
                template = route.path
                self.hook.enter(scope)
                if scope["method"] not in route.methods:
                    raise MethodNotAllowed(route.allow)
                status = await route.handler(scope, receive, send, param)
                return
            self.hook.enter(scope)

            async def sent(message: MutableMapping[str, Any]) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                await send(message)

            await super().__call__(scope, receive, sent)
        except ProblemError as refused:  # the hook refused, or a bare route's method
            await send_problem(scope, send, refused)
            status = refused.status_code
        finally:
            if template is UNMATCHED:  # a Starlette route: its router left it in the scope
                template = getattr(scope.get("route"), "path", UNMATCHED)
            seconds = time.perf_counter() - started
            self.hook.leave(scope, template, status, scope.get(PROBLEM_SCOPE_KEY), seconds)
