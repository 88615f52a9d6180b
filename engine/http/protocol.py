"""The HTTP/1.1 protocol ``flashsale serve`` runs: uvicorn's httptools protocol with limits on
what a client may send and how slowly it may send it, enforced before any app is called.

- **Header limits.** More than ``max_headers`` header lines, or more than ``max_header_bytes`` of
  names plus values, is answered ``431`` (``headers-too-large``) and the connection is closed;
  the app never sees the request. Both are counted exactly when the head ends, and while it is
  still arriving the lines parsed so far are counted after every chunk read. The parser keeps
  a header it has not finished in memory, so an unfinished head of more than
  ``HEAD_BYTES_PER_LIMIT`` times the byte limit (request line included) is refused the same way
  without reading on.
- **Read deadline.** A request's head and body must arrive within ``request_read_timeout_s`` of
  its first byte (of the connection, for the first request): otherwise ``408``
  (``request-timeout``) and the connection is closed. A connection that sends nothing in that
  time is closed without an answer. One timer per connection looks at a single timestamp about
  once a second, so a request pays for one clock read and no timer of its own. The wait between
  two requests on a keep-alive connection is uvicorn's keep-alive timeout's business.

Both answers are ``application/problem+json`` with ``connection: close``. A refusal is only
written when no other response is on the wire: one that would cut into a pipelined answer
closes the connection instead.

The limits are read from the environment once per process (``Settings.from_env``), so the class
can be handed to uvicorn by reference and also works in the processes ``workers > 1`` spawns.

What it costs a request, from ``python -m loadtests.protocolcost`` (uvicorn's plain httptools
protocol against this one, alternating rounds, every request carrying an order's headers; two
cores shared with other work, so single rounds swing by a fifth):

- served, the default (wrk -t1 -c64 -d5s on ``GET /health``, one uvicorn process each, 3
  rounds): medians 8,316 req/s at 85.2 µs of server CPU per request plain, 7,875 req/s at
  88.3 µs limited; rounds ranged 7,714 to 9,140 req/s, so the two are not told apart.
- ``--in-process --rounds 7`` (the protocol alone, no app work): 20.56 against 20.61 µs CPU per
  request.
- counted in instructions, which machine noise does not move (``valgrind --tool=callgrind``
  around ``--measure plain|limited --requests 20001``, less the same with ``--requests 1``):
  113.2k against 124.0k per request, so the checks add about 11k instructions (some 1.5 µs,
  2% of a served health check). A third of that is the three overridden callbacks being
  Python calls at all; the rest is the header sum, the clock read and the head check.
"""

from __future__ import annotations

import asyncio
import functools
from asyncio import TimerHandle
from typing import Any

import orjson
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from engine.errors import (
    PROBLEM_MEDIA_TYPE,
    ProblemError,
    RequestHeadersTooLarge,
    RequestTimeout,
)
from engine.settings import Settings

__all__ = ["LimitedHttpToolsProtocol"]

# Bytes of an unfinished head the server buffers, as a multiple of max_header_bytes: room for the
# request line and the ": " and CRLF of every header, so only a head far past the limit is cut
# off before its headers can be counted exactly.
HEAD_BYTES_PER_LIMIT = 4

# How long a refused connection stays half-open, dropping what the client still sends, before it
# is closed for good (sooner when the client closes first): see LimitedHttpToolsProtocol._refuse.
LINGER_S = 2.0

# The deadline is checked this often (seconds), so a late client is cut off up to this much
# after its deadline; shorter only when the timeout itself is shorter.
_CHECK_EVERY_S = 1.0


@functools.cache
def _settings() -> Settings:
    return Settings.from_env()


def problem_bytes(error: ProblemError, default_headers: list[tuple[bytes, bytes]]) -> bytes:
    """A whole HTTP/1.1 response carrying ``error`` as problem+json, ending the connection."""
    body = orjson.dumps(error.body())
    lines = [f"HTTP/1.1 {error.status_code} {error.title}".encode()]
    lines += [name + b": " + value for name, value in default_headers]
    lines += [
        b"content-type: " + PROBLEM_MEDIA_TYPE.encode(),
        b"content-length: " + str(len(body)).encode(),
        b"connection: close",
    ]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


class _Refused(Exception):
    """Raised inside a parser callback to stop parsing; the problem is kept on the protocol."""


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """Where a request stands is read off uvicorn's own state rather than tracked in callbacks of
    our own, since each callback a request passes through costs it a Python call: while a head
    is being received, ``self.scope`` is the new request's and ``self.cycle`` (if any) still the
    previous one's; from the end of the head, ``self.cycle.scope is self.scope``, and
    ``cycle.more_body`` stays true until the body is complete."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        settings = _settings()
        self._max_header_bytes = settings.max_header_bytes
        self._max_headers = settings.max_headers
        self._max_head_bytes = HEAD_BYTES_PER_LIMIT * settings.max_header_bytes
        self._read_timeout_s = float(settings.request_read_timeout_s)
        self._check_every_s = min(_CHECK_EVERY_S, self._read_timeout_s / 2)
        # When the client's current request began (loop.time()): its first byte, or for the
        # first request the connection, so waiting before the first byte buys no extra time.
        self._read_since = 0.0
        # Bytes received since the chunk in which the current head began: never more than the
        # head's own bytes while it is unfinished, and what the memory guard counts.
        self._head_bytes = 0
        self._refusal: ProblemError | None = None
        self._discarding = False
        # The connection's one timer: the deadline check, or the end of a refused connection.
        self._timer: TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._read_since = self.loop.time()
        self._timer = self.loop.call_later(self._check_every_s, self._check_deadline)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_timer()
        super().connection_lost(exc)

    def handle_websocket_upgrade(self) -> None:
        # The connection now belongs to the websocket protocol and its own timeouts.
        self._stop_timer()
        super().handle_websocket_upgrade()

    def data_received(self, data: bytes) -> None:
        if self._discarding:
            return
        self._head_bytes += len(data)
        super().data_received(data)
        cycle = self.cycle
        if (cycle is None or cycle.scope is not self.scope) and not self.transport.is_closing():
            # A head is unfinished: what the parser holds of it must not grow without bound.
            if self._head_bytes > self._max_head_bytes:
                detail = f"the request head passed {self._max_head_bytes} bytes before it ended"
                self._refuse(RequestHeadersTooLarge("headers-too-large", detail))
            elif len(self.headers or ()) > self._max_headers:
                self._refuse(self._too_many_headers())

    def on_message_begin(self) -> None:
        if self.scope is not None:
            self._read_since = self.loop.time()
        self._head_bytes = 0
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        headers = self.headers
        if len(headers) > self._max_headers:
            self._refusal = self._too_many_headers()
            raise _Refused
        # A plain loop: the cheapest of the sums tried (a generator, map over chain), and every
        # request pays it.
        total = 0
        for name, value in headers:
            total += len(name) + len(value)
        if total > self._max_header_bytes:
            detail = f"header names and values may total {self._max_header_bytes} bytes"
            self._refusal = RequestHeadersTooLarge("headers-too-large", detail)
            raise _Refused
        super().on_headers_complete()

    def send_400_response(self, msg: str) -> None:
        # uvicorn answers every error raised while parsing with a 400; a limit raised in
        # on_headers_complete is answered with its own problem.
        refusal, self._refusal = self._refusal, None
        if refusal is None:
            super().send_400_response(msg)
        else:
            self._refuse(refusal)

    def _too_many_headers(self) -> ProblemError:
        detail = f"a request may carry {self._max_headers} headers"
        return RequestHeadersTooLarge("headers-too-large", detail)

    def _receiving(self) -> bool:
        """Whether the server is waiting for (the rest of) a request from the client."""
        cycle = self.cycle
        if cycle is None or cycle.scope is not self.scope:
            return True  # nothing yet, or an unfinished head
        # An app that answered before the body ended stops waiting for it.
        return cycle.more_body and not cycle.response_complete

    def _check_deadline(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        now = self.loop.time()
        if self.flow.read_paused:
            # The server stopped reading (a pipelined request waits its turn, or the app has
            # not taken the body so far): the client is not late, and its time starts again.
            self._read_since = now
        elif now - self._read_since >= self._read_timeout_s and self._receiving():
            if self.scope is None:
                # Not one byte of a request arrived: there is no request to answer.
                self.transport.close()
            else:
                detail = f"the request did not arrive within {self._read_timeout_s:g} s"
                self._refuse(RequestTimeout("request-timeout", detail))
            return
        self._timer = self.loop.call_later(self._check_every_s, self._check_deadline)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _may_answer(self) -> bool:
        """Whether a response written now would not cut into another one."""
        cycle = self.cycle
        if cycle is None:
            return True
        if cycle.scope is self.scope:
            # The cycle is this request's: the app may be waiting for the rest of the body.
            return not cycle.response_started
        return cycle.response_complete

    def _refuse(self, error: ProblemError) -> None:
        self._stop_timer()
        if not self._may_answer() or not self.transport.can_write_eof():
            self.transport.close()
            return
        self.transport.write(problem_bytes(error, self.server_state.default_headers))
        # Closing a socket with unread bytes from the client (the rest of a 16 MiB head, say)
        # resets the connection, and the client's kernel then drops the answer unread. So only
        # the sending half is closed; what still arrives is dropped, and the connection ends when
        # the client closes its half (eof_received) or LINGER_S later.
        self.transport.write_eof()
        self._discarding = True
        self._timer = self.loop.call_later(LINGER_S, self.transport.close)
