"""Every ``flashsale`` command's arguments, in one parser.

Each command's handler lives in the module of its concern, and imports the tooling (``loadtests``,
``localrun``) or the workers only when it runs: building this parser, and ``--help``, load none.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from datetime import datetime
from importlib import metadata
from typing import Any, TypeAlias

from engine.apikeys import SCOPES
from engine.cli.apikeys import cmd_apikey_create, cmd_apikey_list, cmd_apikey_revoke
from engine.cli.orders import cmd_order_refund, cmd_reconcile, cmd_token
from engine.cli.sales import cmd_sale_create, cmd_sale_show, cmd_sale_status
from engine.cli.serve import SERVE_APPS, cmd_migrate, cmd_serve, cmd_worker
from engine.cli.tooling import cmd_bench, cmd_demo
from engine.settings import LOG_FORMATS

__all__ = ["build_parser"]

_Handler = Callable[[argparse.Namespace], int]
# What `add_subparsers` returns: the parser's list of commands, or a command's list of actions.
_Commands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError("must be a positive integer")
    return number


def _parse_time(value: str) -> int:
    """An ISO 8601 time with a zone, as epoch milliseconds (the unit sales are stored in)."""
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {value!r}") from None
    if moment.tzinfo is None:
        raise argparse.ArgumentTypeError(f"give a time zone, e.g. {value}+00:00 or {value}Z")
    return int(moment.timestamp() * 1000)


def _command(
    commands: _Commands,
    name: str,
    handler: _Handler,
    help: str,
    description: str | None = None,
    **defaults: Any,
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = commands.add_parser(name, help=help, description=description)
    parser.set_defaults(func=handler, **defaults)
    return parser


def _actions(commands: _Commands, name: str, help: str) -> _Commands:
    """A command made of actions (``sale create``, ``order refund``): the actions' parsers."""
    group = commands.add_parser(name, help=help)
    return group.add_subparsers(dest=f"{name}_command", required=True, metavar="ACTION")


def _servers_dir(parser: argparse.ArgumentParser, default: str) -> None:
    # The programs that start their own Redis and Postgres keep those servers' data here.
    parser.add_argument("--dir", default=default, help="where servers keep their data")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flashsale",
        description="Run and operate a flashsale engine. Configuration comes from FLASHSALE_* "
        "environment variables (FLASHSALE_REDIS_URL, FLASHSALE_DATABASE_URL, "
        "FLASHSALE_JWT_SECRET, ...); see docs/operations.md.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_processes(commands)
    _add_sales(commands)
    _add_orders(commands)
    _add_tooling(commands)
    _add_apikeys(commands)
    return parser


def _version() -> str:
    """The installed package's version (its metadata), or the source's when run uninstalled."""
    try:
        return metadata.version("flashsale")
    except metadata.PackageNotFoundError:
        from engine import __version__

        return __version__


def _add_apikeys(commands: _Commands) -> None:
    actions = _actions(commands, "apikey", "create, list and revoke admin API keys")
    create = _command(
        actions,
        "create",
        cmd_apikey_create,
        "make a key for the admin HTTP API; prints it once",
        "Make a key for the admin HTTP API (Authorization: Bearer fsk_...). The key is printed "
        "once, on stdout; only its SHA-256 is stored. Scopes: " + ", ".join(SCOPES) + ".",
    )
    create.add_argument("--name", required=True, help="what the key is for, e.g. ops-laptop")
    create.add_argument(
        "--scope",
        action="append",
        required=True,
        choices=SCOPES,
        metavar="SCOPE",
        help="a scope the key holds; repeat for more (" + ", ".join(SCOPES) + ")",
    )
    create.add_argument(
        "--expires-in", type=_positive, metavar="DAYS", help="expire after DAYS (default: never)"
    )
    _command(actions, "list", cmd_apikey_list, "every key: name, scopes, expiry, last use")
    revoke = _command(
        actions,
        "revoke",
        cmd_apikey_revoke,
        "revoke a key for good",
        "Revoke a key. Servers that saw it recently refuse it within a few seconds (they cache "
        "lookups for engine.apikeys.CACHE_S).",
    )
    revoke.add_argument("id", type=_positive, help="the key's id (flashsale apikey list)")


def _logging(command: argparse.ArgumentParser, level: str) -> None:
    command.add_argument(
        "--log-level",
        default=level,
        choices=["critical", "error", "warning", "info", "debug"],
        help="the least severe records logged (default %(default)s)",
    )
    command.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        help="log lines as JSON objects or as text; auto (default, or FLASHSALE_LOG_FORMAT): "
        "text on a terminal, JSON otherwise",
    )


def _add_processes(commands: _Commands) -> None:
    serve = _command(
        commands, "serve", cmd_serve, "run the HTTP API (uvicorn + uvloop + httptools)"
    )
    serve.add_argument("--host", help="bind address (default FLASHSALE_HOST or 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default FLASHSALE_PORT or 8000)")
    serve.add_argument(
        "--workers", type=_positive, help="server processes (default FLASHSALE_SERVER_WORKERS or 1)"
    )
    _logging(serve, "warning")
    serve.add_argument(
        "--app",
        default="engine",
        choices=sorted(SERVE_APPS),
        help="engine (default), or one of `flashsale bench`'s yardsticks: ceiling (token and "
        "body only, no store) or baseline (stock decided in Postgres)",
    )

    worker = _command(
        commands,
        "worker",
        cmd_worker,
        "run an arq worker: drain outboxes, expire holds, payments",
        "Run an arq worker: drain outboxes into Postgres, expire holds (cancelling their "
        "PaymentIntents first), pay refunds, void cancelled orders' "
        "intents, retry stored webhooks, and reconcile every minute.",
    )
    worker.add_argument("--burst", action="store_true", help="run the due jobs once and exit")
    worker.add_argument(
        "--check",
        action="store_true",
        help="do not run: exit 0 if every job (of --jobs) completed recently, 1 if one is "
        "overdue, 2 if Redis does not answer (a liveness probe for a supervisor)",
    )
    _logging(worker, "info")
    worker.add_argument(
        "--jobs",
        help="comma-separated cron jobs to run (default all), e.g. drain_outboxes,expire_holds",
    )

    _command(commands, "migrate", cmd_migrate, "apply pending Postgres migrations (idempotent)")


def _add_sales(commands: _Commands) -> None:
    actions = _actions(commands, "sale", "create, inspect, pause, resume and close sales")
    create = _command(
        actions,
        "create",
        cmd_sale_create,
        "define a sale in Postgres and load it into Redis",
        "Define a sale in Postgres and load it into Redis. Re-running with the same terms is "
        "harmless; other terms under an existing id are refused.",
    )
    create.add_argument("--id", required=True, help="sale id: a-z, 0-9 and '-', max 48")
    create.add_argument("--name", help="display name (default: the id)")
    create.add_argument("--stock", type=int, required=True, help="units for sale")
    create.add_argument("--price", type=int, default=1000, help="unit price in minor units")
    create.add_argument("--currency", default="usd", help="ISO 4217, lowercase (default usd)")
    create.add_argument("--limit", type=_positive, default=2, help="units per shopper")
    create.add_argument(
        "--per-order-max", type=_positive, help="units per order (default: the per-shopper limit)"
    )
    create.add_argument(
        "--hold-seconds",
        type=_positive,
        help="how long an unpaid hold lasts (default FLASHSALE_HOLD_SECONDS)",
    )
    create.add_argument(
        "--stock-low",
        type=int,
        help="send stock.low when available units fall to this (default FLASHSALE_STOCK_LOW_UNITS)",
    )
    when = create.add_mutually_exclusive_group()
    when.add_argument("--starts-at", type=_parse_time, help="ISO 8601 start, with time zone")
    when.add_argument("--starts-in", type=int, default=0, help="start N seconds from now")
    end = create.add_mutually_exclusive_group()
    end.add_argument("--ends-at", type=_parse_time, help="ISO 8601 end, with time zone")
    end.add_argument("--duration", type=_positive, default=3600, help="seconds (default 3600)")
    create.add_argument("--paused", action="store_true", help="create it paused")

    show = _command(
        actions, "show", cmd_sale_show, "definition, live stock, held, sold, outbox lag"
    )
    show.add_argument("id")
    show.add_argument("--json", action="store_true", help="print JSON")
    for action, text in (
        ("pause", "stop taking orders for now"),
        ("resume", "take orders again"),
        ("close", "end the sale for good"),
    ):
        _command(actions, action, cmd_sale_status, text, action=action).add_argument("id")


def _add_orders(commands: _Commands) -> None:
    token = _command(
        commands,
        "token",
        cmd_token,
        "mint shopper JWTs (tests, load tests)",
        "Mint shopper JWTs signed with FLASHSALE_JWT_SECRET "
        "(or FLASHSALE_JWT_PRIVATE_KEY for RS256).",
    )
    who = token.add_mutually_exclusive_group(required=True)
    who.add_argument("--user", action="append", help="user id (repeatable)")
    who.add_argument("--count", type=_positive, help="mint for N users named PREFIX1..PREFIXN")
    token.add_argument("--prefix", default="shopper-", help="user id prefix for --count")
    token.add_argument("--ttl", type=_positive, default=3600, help="seconds (default 3600)")
    token.add_argument("--out", help="write 'user<TAB>token' lines to this file")

    refund = _command(
        _actions(commands, "order", "operate on one order"),
        "refund",
        cmd_order_refund,
        "refund a paid order at the gateway (idempotent)",
        "Refund a paid order: its units leave the shopper, go back to stock with --restock or "
        "are withdrawn otherwise, and the payment is refunded at the gateway. Running it again "
        "changes nothing.",
    )
    refund.add_argument("id", help="order id")
    refund.add_argument("--restock", action="store_true", help="put the units back on sale")

    reconcile = _command(
        commands,
        "reconcile",
        cmd_reconcile,
        "compare Redis, Postgres and the gateway; exit 0 same, 1 differ, 2 error",
        "Compare Redis (live), Postgres (ledger) and the payment gateway for one sale or every "
        "live sale, and print each difference. Exit status: 0 nothing differs, 1 something "
        "does, 2 the comparison itself failed.",
    )
    reconcile.add_argument("--sale", help="only this sale (default: every live sale)")
    reconcile.add_argument(
        "--repair", action="store_true", help="fix what can be fixed safely, and say what was done"
    )
    reconcile.add_argument(
        "--full",
        action="store_true",
        help="compare every order and intent (an audit), not only what changed at the gateway "
        "since the sale's cursor",
    )


def _add_tooling(commands: _Commands) -> None:
    demo = _command(
        commands,
        "demo",
        cmd_demo,
        "run a whole sale locally and check its invariants",
        "Start Redis and Postgres in --dir, seed a sale, start the API and a worker, storm it "
        "with concurrent shoppers, wait for the ledger, print a report ending in "
        "'invariants: ok' (exit 0) or 'invariants: VIOLATED ...' (exit 1), and stop "
        "everything it started.",
    )
    _servers_dir(demo, ".flashsale/demo")
    demo.add_argument("--stock", type=_positive, default=1000)
    demo.add_argument("--shoppers", type=_positive, default=3000)
    demo.add_argument("--limit", type=_positive, default=2)
    demo.add_argument("--concurrency", type=_positive, default=200)

    bench = _command(
        commands,
        "bench",
        cmd_bench,
        "benchmark placing orders against a bare-Starlette ceiling and a Postgres baseline",
        "Start Redis and Postgres in --dir (which the bench owns: it empties them), then drive, "
        "round robin (one second of each per round) with wrk, a ceiling (bare Starlette "
        "endpoint: token and body only), the engine while stock lasts (also with Redis on "
        "appendfsync always), the engine after sell-out, and a naive Postgres baseline; time "
        "the ledger and the outbox drain; check every invariant. Writes report.json, report.md "
        "and throughput.png to --out and prints a summary. Exit status "
        "1 when an invariant is violated (timing targets are reported, never enforced), 2 when "
        "the bench extra is not installed (pip install 'flashsale[bench]').",
    )
    _servers_dir(bench, ".flashsale/bench")
    bench.add_argument("--out", default="bench-report", help="report folder (default %(default)s)")
    bench.add_argument("--connections", type=_positive, default=64, help="wrk connections")
    bench.add_argument("--threads", type=_positive, default=2, help="wrk threads (default 2)")
    bench.add_argument("--duration", type=_positive, default=10, help="seconds per phase")
    bench.add_argument(
        "--stock",
        type=_positive,
        help="units of the while-stock-lasts sale (default: 30,000 for every second of the "
        "phases that order in it, more than any server here can sell)",
    )
    bench.add_argument("--shoppers", type=_positive, default=10_000, help="distinct tokens")
    bench.add_argument(
        "--limit", type=_positive, help="units per shopper (default: more than stock / shoppers)"
    )
    bench.add_argument("--server-workers", type=_positive, default=1, help="uvicorn processes")
    bench.add_argument(
        "--appendfsync",
        default="everysec",
        choices=["always", "everysec", "no"],
        help="Redis AOF durability mode (default %(default)s)",
    )
    bench.add_argument(
        "--drain-orders",
        type=_positive,
        default=50_000,
        help="orders piled up for the drain measurement",
    )
    bench.add_argument(
        "--profile",
        type=int,
        default=5,
        metavar="SECONDS",
        help="py-spy the server this long under load (0: skip)",
    )
    bench.add_argument(
        "--smoke",
        action="store_true",
        help="a few seconds per phase: checks the machinery, not the speed",
    )
