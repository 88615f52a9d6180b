"""One Redis connection shared by every request of a server process, pipelined.

The order path makes one EVALSHA per request. Through redis-py's asyncio client each call costs
~75 µs of client CPU on this 2-core machine (pool checkout, command packing, a timeout context,
a write and a read per call); py-spy put redis-py at 20 % of the engine server's CPU. Here a call
packs its command with hiredis (C), appends it to a buffer and waits on a future: every command
issued in one event-loop iteration leaves in a single write, Redis answers them in order in one
read, and hiredis parses the replies. Measured (wrk, 64 connections, one uvicorn process, the
bare ASGI order route, two rounds on a machine with neighbours): 7,781 and 8,849 orders/s on
redis-py's pool, 9,690 and 14,020 on this connection. Alone, 64 tasks calling ``reserve``
through it reach ~18,000 calls/s at ~15 us of client CPU per call; past that Redis itself is the
limit (the reserve script runs ~36 us inside Redis, its ``INFO commandstats``).

Replies come back in the order commands were sent, so futures wait in a FIFO. A lost
connection fails every waiting call with ``ConnectionError`` (the caller answers 503 and the
shopper retries with the same Idempotency-Key, which is safe whether or not the script ran);
the next call reconnects.

Every wait has a deadline. A stalled Redis (stopped, swapping, a slow script) accepts commands
and answers nothing, so a lost connection is not the only failure: a watchdog, one timer per
connection rather than one per command, checks a few times per deadline whether commands have
waited that long without a single reply arriving. If so the connection is given up (closed, so
no late reply can be matched to a newer command) and every waiting call fails with
``RedisStalled``: the shoppers hear 503 within about the deadline, and the next call connects
afresh. Connecting has the same deadline.

It speaks just enough of redis-py's interface for ``engine.scripts.Script`` (``evalsha``,
``script_load``), so the typed script wrappers work on either client unchanged.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import Any, cast

import hiredis
from redis.connection import parse_url
from redis.exceptions import ConnectionError, NoScriptError, ResponseError

from engine.logs import Outage
from engine.settings import Settings

__all__ = ["PipelinedRedis", "RedisStalled"]

# Called with a command's reply, or with the exception it failed with (a ``ResponseError``,
# ``NoScriptError`` or ``ConnectionError`` instance), in the protocol's data_received.
ReplyCallback = Callable[[Any], None]
_Waiter = asyncio.Future[Any] | ReplyCallback


class RedisStalled(ConnectionError):  # type: ignore[misc]
    """Redis took longer than the deadline to answer; the connection was given up."""


def _error(reply: ResponseError) -> ResponseError:
    message = str(reply)
    return NoScriptError(message) if message.startswith("NOSCRIPT") else reply


class _Protocol(asyncio.Protocol):
    def __init__(self, deadline_s: float, outage: Outage) -> None:
        self.loop = asyncio.get_running_loop()
        self.deadline_s = deadline_s
        self.outage = outage
        self.closing = False  # closed on purpose: not an outage
        # When the oldest waiting command last saw progress: sent into an idle connection, or
        # any reply arrived since. One clock read per write burst or reply chunk, not per call.
        self.progress_at = 0.0
        self.watchdog: asyncio.TimerHandle | None = None
        self.transport: asyncio.Transport | None = None
        self.reader = hiredis.Reader(encoding="utf-8", replyError=ResponseError)
        self.waiting: deque[_Waiter] = deque()
        self.pending: list[bytes] = []  # packed commands not yet written
        self.flush_scheduled = False
        self.hooks: list[Callable[[], None]] = []  # run by the next flush, before it writes
        self.lost: Exception | None = None

    def schedule_flush(self) -> None:
        if not self.flush_scheduled:
            # Everything issued before the loop comes round again shares this one write.
            self.flush_scheduled = True
            self.loop.call_soon(self.flush)

    def enqueue(self, args: tuple[Any, ...], waiter: _Waiter) -> None:
        # Packed first: a command that cannot be packed must not leave a waiter without a
        # command, or every later reply would go to the wrong caller.
        packed = hiredis.pack_command(args)
        if not self.waiting:
            self.progress_at = self.loop.time()
        self.waiting.append(waiter)
        self.pending.append(packed)
        self.schedule_flush()

    def flush(self) -> None:
        # Still "scheduled" while the hooks run: what they send joins this write.
        hooks, self.hooks = self.hooks, []
        try:
            for hook in hooks:
                hook()
        finally:
            # A hook that raised must not leave the flag set: nothing would ever be written
            # again on this connection. Its error goes to the loop's exception handler.
            self.flush_scheduled = False
            if self.pending and self.transport is not None and self.lost is None:
                self.transport.write(b"".join(self.pending))
            self.pending.clear()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports quack like asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self._arm()

    def _arm(self) -> None:
        self.watchdog = self.loop.call_later(max(self.deadline_s / 4, 0.01), self._watch)

    def _watch(self) -> None:
        if self.lost is not None:
            return
        if self.waiting and self.loop.time() - self.progress_at >= self.deadline_s:
            self.give_up(RedisStalled(f"Redis answered nothing for {self.deadline_s:g} s"))
            return
        self._arm()

    def give_up(self, error: Exception) -> None:
        """Fail every waiting call with ``error`` and drop the connection: once a caller has
        stopped waiting, a late reply could only be matched to the wrong command."""
        if self.lost is None:
            self.lost = error
            if not self.closing:
                self.outage.failed(error)
        if self.watchdog is not None:
            self.watchdog.cancel()
        self.pending.clear()
        while self.waiting:
            waiter = self.waiting.popleft()
            if not isinstance(waiter, asyncio.Future):
                waiter(error)
            elif not waiter.done():
                waiter.set_exception(error)
        if self.transport is not None:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        self.progress_at = self.loop.time()
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            waiter = self.waiting.popleft()
            if isinstance(reply, ResponseError):
                reply = _error(reply)
            elif self.outage.since is not None:
                # A real answer, not an error reply (a Redis still loading its AOF answers
                # LOADING): Redis serves again.
                self.outage.recovered()
            if not isinstance(waiter, asyncio.Future):
                waiter(reply)
            elif waiter.done():  # its caller was cancelled; the reply is simply dropped
                continue
            elif isinstance(reply, ResponseError):
                waiter.set_exception(reply)
            else:
                waiter.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        # Commands not yet written die with the connection too: written to the next one, their
        # replies would be matched to that connection's waiters.
        self.give_up(ConnectionError(f"lost the Redis connection: {exc or 'closed'}"))


class PipelinedRedis:
    """A pipelined connection to the Redis at ``url`` (``redis://`` or ``rediss://``)."""

    def __init__(
        self,
        url: str,
        deadline_s: float = Settings.redis_deadline_ms / 1000,
        outage: Outage | None = None,
    ) -> None:
        options = parse_url(url)
        self._deadline_s = deadline_s
        # Logged once when the connection is lost or stalls, once when Redis answers again.
        self.outage = outage or Outage("redis", logging.getLogger("flashsale.redis"))
        self._host: str = options.get("host", "127.0.0.1")
        self._port: int = int(options.get("port", 6379))
        self._ssl = ssl.create_default_context() if url.startswith("rediss://") else None
        self._hello: list[tuple[Any, ...]] = []
        if options.get("password"):
            user = options.get("username")
            self._hello.append(
                ("AUTH", user, options["password"]) if user else ("AUTH", options["password"])
            )
        if options.get("db"):
            self._hello.append(("SELECT", options["db"]))
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Lock | None = None

    async def _connect(self) -> _Protocol:
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        loop = asyncio.get_running_loop()
        try:
            # The deadline covers the wait for the lock too: callers queued behind an attempt
            # that hangs must not each wait a deadline of their own in turn.
            async with asyncio.timeout(self._deadline_s), self._connecting:
                protocol = self._protocol
                if protocol is not None and protocol.lost is None:
                    return protocol
                _, protocol = await loop.create_connection(
                    partial(_Protocol, self._deadline_s, self.outage),
                    self._host,
                    self._port,
                    ssl=self._ssl,
                )
                self._protocol = protocol
                for command in self._hello:
                    await self._send(protocol, command)
                return protocol
        except (OSError, TimeoutError) as exc:
            where = f"{self._host}:{self._port}"
            error = ConnectionError(f"cannot reach Redis at {where}: {exc!r}")
            self.outage.failed(error)
            raise error from exc

    def _send(self, protocol: _Protocol, args: tuple[Any, ...]) -> asyncio.Future[Any]:
        waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if protocol.lost is not None:
            raise protocol.lost
        protocol.enqueue(args, waiter)
        return waiter

    def before_write(self, hook: Callable[[], None]) -> bool:
        """Run ``hook`` just before this loop turn's write, so what it sends with ``send``
        leaves in that write. False, and ``hook`` is not kept, when there is no live
        connection: the awaitable calls (``execute_command``) connect, this does not."""
        protocol = self._protocol
        if protocol is None or protocol.lost is not None:
            return False
        protocol.hooks.append(hook)
        protocol.schedule_flush()
        return True

    def send(self, args: tuple[Any, ...], callback: ReplyCallback) -> None:
        """Send a command without a future or a task: ``callback`` gets its reply (or its
        error) straight from the protocol's data_received."""
        protocol = self._protocol
        if protocol is None or protocol.lost is not None:
            callback(protocol.lost if protocol else ConnectionError("not connected to Redis"))
            return
        protocol.enqueue(args, callback)

    async def execute_command(self, *args: Any) -> Any:
        protocol = self._protocol
        if protocol is None or protocol.lost is not None:
            protocol = await self._connect()
        return await self._send(protocol, args)

    async def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> Any:
        return await self.execute_command("EVALSHA", sha, numkeys, *keys_and_args)

    async def script_load(self, source: str) -> str:
        sha: str = await self.execute_command("SCRIPT", "LOAD", source)
        return sha

    async def ping(self) -> bool:
        return bool(await self.execute_command("PING") == "PONG")

    async def aclose(self) -> None:
        protocol, self._protocol = self._protocol, None
        if protocol is not None:
            protocol.closing = True
            if protocol.watchdog is not None:
                protocol.watchdog.cancel()
            if protocol.transport is not None:
                protocol.transport.close()
