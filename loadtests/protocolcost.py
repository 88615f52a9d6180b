"""``python -m loadtests.protocolcost``: what the limits of ``engine.http.protocol`` cost a request.

It compares uvicorn's own httptools protocol (``plain``) with ``LimitedHttpToolsProtocol``
(``limited``) in alternating rounds (the order flips every round, so a machine that speeds up or
slows down favours neither) and prints each round, the medians and their ratio:

- **served** (the default): the engine served twice, the same in everything but the protocol,
  one uvicorn process each with uvloop as ``flashsale serve`` runs them; wrk drives
  ``GET /health`` on each. Per round: requests/s and the server's CPU microseconds per request
  (from ``/proc``). Starts its own Redis and Postgres in ``--dir`` (the app's start-up loads its
  scripts into Redis).
- **--in-process**: the protocol alone, fed whole requests on one connection in a fresh process
  per round, answered by an app that only says 200, its answers thrown away: CPU microseconds
  per request with no network, no load generator and no Starlette to hide in.

Every request carries the headers of an order (a bearer token of a real token's size, an
Idempotency-Key, a content type), so the header checks are paid as often as on the order route.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import secrets
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engine.http.auth import mint_token
from engine.settings import Settings
from loadtests.cpumeter import processes_s
from loadtests.loadgen import ensure_wrk
from localrun import servers as localservices
from localrun.demo import stop_process, wait_ready

__all__ = ["PROTOCOLS", "main"]

# The two protocols, by name: import strings uvicorn resolves (in a spawned server too).
PROTOCOLS = {
    "plain": "uvicorn.protocols.http.httptools_impl:HttpToolsProtocol",
    "limited": "engine.http.protocol:LimitedHttpToolsProtocol",
}

_REQUESTS_PER_S = re.compile(r"^Requests/sec:\s+([\d.]+)", re.MULTILINE)
_REQUESTS = re.compile(r"^\s*(\d+) requests in", re.MULTILINE)
_MEASURED = "µs per request: "


def _order_headers(settings: Settings) -> list[str]:
    return [
        f"Authorization: Bearer {mint_token(settings, 'shopper-1')}",
        f"Idempotency-Key: {secrets.token_hex(16)}",
        "Content-Type: application/json",
    ]


def _child(args: list[str], settings: Settings, **popen: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "loadtests.protocolcost", *args],
        env={**os.environ, **settings.as_env()},
        **popen,
    )


def _serve(protocol: str, port: int) -> None:
    import uvicorn

    uvicorn.run(
        "engine.http.asgi:create",
        factory=True,
        host="127.0.0.1",
        port=port,
        loop="uvloop",
        http=PROTOCOLS[protocol],
        access_log=False,
        log_level="warning",
    )


def _wrk(url: str, headers: list[str], seconds: int, connections: int) -> tuple[int, float]:
    """Requests answered and requests/s of one wrk run."""
    command = [ensure_wrk(), "-t1", f"-c{connections}", f"-d{seconds}s"]
    for header in headers:
        command += ["-H", header]
    done = subprocess.run(
        [*command, url + "/health"], capture_output=True, text=True, timeout=seconds + 60
    )
    rate, count = _REQUESTS_PER_S.search(done.stdout), _REQUESTS.search(done.stdout)
    if rate is None or count is None or "Non-2xx" in done.stdout:
        raise RuntimeError(f"wrk failed (exit {done.returncode}): {done.stdout}{done.stderr}")
    return int(count.group(1)), float(rate.group(1))


async def _served(options: argparse.Namespace) -> None:
    urls = localservices.up(options.dir)
    settings = Settings(
        environment="development",
        redis_url=urls["redis_url"],
        database_url=urls["postgres_dsn"],
        jwt_secret=secrets.token_urlsafe(32),
    )
    headers = _order_headers(settings)
    logs = options.dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    servers = {}
    for name in PROTOCOLS:
        port = localservices.free_port()
        with (logs / f"{name}.log").open("ab") as log:
            proc = _child(["--serve", name, "--port", str(port)], settings, stdout=log, stderr=log)
        servers[name] = (proc, f"http://127.0.0.1:{port}")
    try:
        for _, url in servers.values():
            await wait_ready(url)
            _wrk(url, headers, 1, options.connections)  # warm-up, not counted

        def one(name: str) -> Figures:
            proc, url = servers[name]
            before = processes_s([proc.pid])
            count, rate = _wrk(url, headers, options.seconds, options.connections)
            cpu_us = (processes_s([proc.pid]) - before) / count * 1e6
            return {"req/s": rate, "µs CPU": cpu_us}

        _alternate(options.rounds, one)
    finally:
        for proc, _ in servers.values():
            stop_process(proc)
        localservices.down(options.dir)


def _in_process(options: argparse.Namespace) -> None:
    settings = Settings(environment="development", jwt_secret=secrets.token_urlsafe(32))

    def one(name: str) -> Figures:
        args = ["--measure", name, "--requests", str(options.requests)]
        out, _ = _child(args, settings, stdout=subprocess.PIPE).communicate(timeout=600)
        found = out.decode().partition(_MEASURED)[2]
        if not found:
            raise RuntimeError(f"the {name} round printed no figure: {out.decode()}")
        return {"µs CPU": float(found)}

    _alternate(options.rounds, one)


# One round's figures of one protocol, by unit: {"req/s": 9876.0, "µs CPU": 70.1}.
Figures = dict[str, float]


def _alternate(rounds: int, one: Callable[[str], Figures]) -> None:
    """Run ``one`` for each protocol, ``rounds`` times, the order flipping every round; print
    each round's figures as they come, then the medians and limited/plain."""
    by_round: dict[str, list[Figures]] = {name: [] for name in PROTOCOLS}
    for round_ in range(rounds):
        order = list(PROTOCOLS) if round_ % 2 == 0 else list(reversed(PROTOCOLS))
        for name in order:
            by_round[name].append(one(name))
            print(f"round {round_ + 1}  {name:8} {_shown(by_round[name][-1])}", flush=True)
    medians = {
        name: {unit: statistics.median(f[unit] for f in rows) for unit in rows[0]}
        for name, rows in by_round.items()
    }
    for name, figures in medians.items():
        print(f"median   {name:8} {_shown(figures)}")
    ratios = (
        f"{v / medians['plain'][unit]:.3f} ({unit})" for unit, v in medians["limited"].items()
    )
    print("limited/plain  " + "  ".join(ratios))


def _shown(figures: Figures) -> str:
    return "  ".join(f"{value:10,.2f} {unit}" for unit, value in figures.items())


def _measure(protocol: str, requests: int) -> None:
    """One in-process round: ``requests`` requests through ``protocol`` on one connection (in a
    process configured like a server: FLASHSALE_ENV=development is enough)."""
    import uvloop
    from uvicorn.config import Config
    from uvicorn.importer import import_from_string
    from uvicorn.server import ServerState

    head = ["GET /health HTTP/1.1", "Host: 127.0.0.1:8000", *_order_headers(Settings.from_env())]
    request = ("\r\n".join(head) + "\r\n\r\n").encode()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def run() -> float:
        config = Config(app=app, lifespan="off", log_level="warning")
        config.load()
        loop = asyncio.get_running_loop()
        server = import_from_string(PROTOCOLS[protocol])(config, ServerState(), {}, _loop=loop)
        transport = _Discard()
        server.connection_made(transport)
        for _ in range(1000):  # warm-up, not counted
            server.data_received(request)
            await asyncio.sleep(0)
        started = time.process_time()
        for _ in range(requests):
            server.data_received(request)
            await asyncio.sleep(0)  # the request's task runs and answers
        used = time.process_time() - started
        if transport.answers != 2 * (requests + 1000):  # a head and a body each
            raise RuntimeError(f"{protocol}: {transport.answers} writes for {requests} requests")
        server.connection_lost(None)
        return used / requests * 1e6

    print(f"{_MEASURED}{uvloop.run(run()):.3f}")


class _Discard(asyncio.Transport):
    """A connection that takes the server's writes and throws them away, counting them."""

    def __init__(self) -> None:
        super().__init__()
        self.answers = 0
        self._closing = False

    def write(self, data: Any) -> None:
        self.answers += 1

    def close(self) -> None:
        self._closing = True

    def is_closing(self) -> bool:
        return self._closing

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        addresses = {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 50000)}
        return addresses.get(name, default)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.protocolcost",
        description="Compare uvicorn's plain httptools protocol with engine.http.protocol's in "
        "alternating rounds: served (wrk on GET /health of the engine; starts its own Redis and "
        "Postgres in --dir) or --in-process (the protocol alone).",
    )
    parser.add_argument("--dir", type=Path, default=Path(".flashsale/protocolcost"))
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    parser.add_argument("--seconds", type=int, default=5, help="length of one wrk run")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections")
    parser.add_argument("--in-process", action="store_true", help="measure the protocol alone")
    parser.add_argument("--requests", type=int, default=100_000, help="per in-process round")
    parser.add_argument("--serve", choices=sorted(PROTOCOLS), help=argparse.SUPPRESS)
    parser.add_argument("--measure", choices=sorted(PROTOCOLS), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.serve:
        _serve(options.serve, options.port)
        return 0
    if options.measure:
        _measure(options.measure, options.requests)
        return 0
    numbers = (options.rounds, options.seconds, options.connections, options.requests)
    if min(numbers) < 1:
        parser.error("--rounds, --seconds, --connections and --requests must be at least 1")
    if options.in_process:
        _in_process(options)
        return 0
    localservices.ensure_installed()
    asyncio.run(_served(options))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
