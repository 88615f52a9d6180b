"""The ``flashsale`` admin command: serve, work, migrate, run sales, mint tokens, demo.

Configuration comes from the environment (see ``engine.settings``); flags override per run.
Exit status: 0 success, 1 the operation was refused (the message says why), 2 bad configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import orjson

from engine.errors import ProblemError
from engine.settings import ConfigError, Settings

__all__ = ["main"]

T = TypeVar("T")


def _run(coro: Awaitable[T]) -> T:
    async def wrapper() -> T:
        return await coro

    return asyncio.run(wrapper())


def _settings() -> Settings:
    return Settings.from_env()


async def _with_stores(fn: Callable[[Any, Any], Awaitable[T]]) -> T:
    from engine.db import connect_postgres, connect_redis
    from engine.scripts import load_scripts

    settings = _settings()
    redis = connect_redis(settings, pool_size=4)
    db = await connect_postgres(settings, min_size=1, max_size=2)
    try:
        await load_scripts(redis)
        return await fn(db, redis)
    finally:
        await redis.aclose()
        await db.close()


# What `serve --app` can run; the bench's yardsticks are served by the very same uvicorn set-up.
_SERVE_APPS = {
    "engine": "engine.http.asgi:create",
    "ceiling": "loadtests.benchapps:ceiling",
    "baseline": "loadtests.benchapps:baseline",
}


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    settings = _settings()
    uvicorn.run(
        _SERVE_APPS[args.app],
        factory=True,
        host=args.host or settings.host,
        port=args.port if args.port is not None else settings.port,
        workers=args.workers or settings.server_workers,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level=args.log_level,
    )
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from arq import run_worker
    from arq.connections import RedisSettings

    from workers.settings import WorkerSettings

    settings = _settings()
    overrides: dict[str, Any] = {}
    if args.jobs:
        wanted = set(args.jobs.split(","))
        known = {job.name.removeprefix("cron:") for job in WorkerSettings.cron_jobs}
        if wanted - known:
            print(
                f"flashsale: unknown jobs {sorted(wanted - known)}; known: {sorted(known)}",
                file=sys.stderr,
            )
            return 2
        # A dedicated drain worker (the bench runs one) leaves gateway calls to other workers.
        jobs = [job for job in WorkerSettings.cron_jobs if job.name.removeprefix("cron:") in wanted]
        overrides["cron_jobs"] = jobs
    run_worker(
        WorkerSettings,  # type: ignore[arg-type]
        redis_settings=RedisSettings.from_dsn(settings.redis_url),
        burst=args.burst,
        **overrides,
    )
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from engine.db import migrate

    applied = _run(migrate(_settings().database_url))
    if applied:
        for name in applied:
            print(f"applied {name}")
    else:
        print("nothing to apply: the database is up to date")
    return 0


def _parse_time(value: str) -> int:
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {value!r}") from None
    if moment.tzinfo is None:
        raise argparse.ArgumentTypeError(f"give a time zone, e.g. {value}+00:00 or {value}Z")
    return int(moment.timestamp() * 1000)


def cmd_sale_create(args: argparse.Namespace) -> int:
    from engine.inventory import SaleDefinition
    from engine.sales import create_sale

    start_ms = (
        args.starts_at if args.starts_at is not None else int((time.time() + args.starts_in) * 1000)
    )
    sale = SaleDefinition(
        id=args.id,
        name=args.name or args.id,
        stock=args.stock,
        price=args.price,
        currency=args.currency,
        per_user_limit=args.limit,
        per_order_max=args.per_order_max or args.limit,
        hold_seconds=args.hold_seconds or _settings().hold_seconds,
        start_ms=start_ms,
        end_ms=args.ends_at if args.ends_at is not None else start_ms + args.duration * 1000,
        status="paused" if args.paused else "open",
    )
    created = _run(_with_stores(lambda db, redis: create_sale(db, redis, sale)))
    print(
        f"{'created' if created else 'already existed, reloaded'} sale {sale.id}: "
        f"{sale.stock} units, limit {sale.per_user_limit} per shopper"
    )
    return 0


def cmd_sale_show(args: argparse.Namespace) -> int:
    from engine.sales import sale_report

    report = _run(_with_stores(lambda db, redis: sale_report(db, redis, args.id)))
    if args.json:
        print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
        return 0
    definition = report.get("definition", {})
    for name in (
        "name",
        "status",
        "stock",
        "price",
        "currency",
        "per_user_limit",
        "per_order_max",
        "hold_seconds",
        "starts_at",
        "ends_at",
    ):
        if name in definition:
            print(f"{name:>20}: {definition[name]}")
    for name, value in report.get("live", {}).items():
        print(f"{'live ' + name:>20}: {value}")
    ledger = ", ".join(f"{k} {v}" for k, v in sorted(report["ledger_orders"].items()))
    print(f"{'ledger orders':>20}: {ledger or 'none'}")
    return 0


def cmd_sale_status(args: argparse.Namespace) -> int:
    from engine.sales import change_status

    status = {"pause": "paused", "resume": "open", "close": "closed"}[args.action]
    previous = _run(_with_stores(lambda db, redis: change_status(db, redis, args.id, status)))
    print(f"sale {args.id}: {previous} -> {status}")
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    from engine.http.auth import mint_tokens

    settings = _settings()
    if args.user:
        users = list(args.user)
    else:
        users = [f"{args.prefix}{i}" for i in range(1, args.count + 1)]
    tokens = mint_tokens(settings, users, args.ttl)
    if args.out:
        lines = [f"{user}\t{token}" for user, token in zip(users, tokens, strict=True)]
        Path(args.out).write_text("\n".join(lines) + "\n")
        print(f"wrote {len(tokens)} tokens to {args.out} (user<TAB>token per line)")
    else:
        for token in tokens:
            print(token)
    return 0


def cmd_order_refund(args: argparse.Namespace) -> int:
    from engine import inventory
    from engine.ids import sale_of_order
    from engine.payments import make_gateway

    sale_id = sale_of_order(args.id)
    if sale_id is None:
        raise ProblemError("order-not-found", f"not an order id: {args.id!r}", status=404)

    async def refund(db: Any, redis: Any) -> str:
        requested = await inventory.refund(redis, sale_id, args.id, "request", args.restock)
        if requested.state == "refunded":
            return "refunded"
        order = await inventory.read_order(redis, sale_id, args.id)
        assert order is not None
        refund_id = await make_gateway(_settings(), redis).refund(order["pi"], args.id)
        done = await inventory.refund(redis, sale_id, args.id, "complete", refund_id=refund_id)
        return f"{done.state} ({refund_id})"

    print(f"order {args.id}: {_run(_with_stores(refund))}")
    return 0


def cmd_reconcile(args: argparse.Namespace) -> int:
    from engine.payments import make_gateway
    from engine.reconcile import reconcile
    from engine.sales import live_sale_ids

    async def run(db: Any, redis: Any) -> int:
        gateway = make_gateway(_settings(), redis)
        sale_ids = [args.sale] if args.sale else await live_sale_ids(redis)
        differences = 0
        for sale_id in sale_ids:
            report = await reconcile(
                redis, db, gateway, sale_id, repair=args.repair, full=args.full
            )
            differences += len(report.differences)
            print(f"sale {sale_id}: {len(report.differences) or 'no'} differences")
            if report.differences:
                print(f"  {'kind':<26} {'order':<34} detail")
                for difference in report.differences:
                    print(f"  {difference}")
            for line in report.repaired:
                print(f"  repaired: {line}")
        return 1 if differences else 0

    try:
        return _run(_with_stores(run))
    except ProblemError:
        raise
    except Exception as exc:  # exit 2 means "could not tell", distinct from "found something"
        print(f"flashsale: reconcile failed: {exc}", file=sys.stderr)
        return 2


def cmd_demo(args: argparse.Namespace) -> int:
    from localrun.demo import run_demo

    return run_demo(
        base_dir=Path(args.dir),
        stock=args.stock,
        shoppers=args.shoppers,
        limit=args.limit,
        concurrency=args.concurrency,
    )


def cmd_bench(args: argparse.Namespace) -> int:
    from loadtests.bench import BenchOptions, run_bench

    return run_bench(
        BenchOptions(
            dir=Path(args.dir),
            out=Path(args.out),
            connections=args.connections,
            threads=args.threads,
            duration_s=args.duration,
            stock=args.stock,
            shoppers=args.shoppers,
            limit=args.limit,
            server_workers=args.server_workers,
            appendfsync=args.appendfsync,
            drain_orders=args.drain_orders,
            profile_s=args.profile,
            smoke=args.smoke,
        )
    )


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError("must be a positive integer")
    return number


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flashsale",
        description="Run and operate a flashsale engine. Configuration comes from FLASHSALE_* "
        "environment variables (FLASHSALE_REDIS_URL, FLASHSALE_DATABASE_URL, "
        "FLASHSALE_JWT_SECRET, ...); see README.md.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the HTTP API (uvicorn + uvloop + httptools)")
    serve.add_argument("--host", help="bind address (default FLASHSALE_HOST or 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default FLASHSALE_PORT or 8000)")
    serve.add_argument(
        "--workers", type=_positive, help="server processes (default FLASHSALE_SERVER_WORKERS or 1)"
    )
    serve.add_argument(
        "--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"]
    )
    serve.add_argument(
        "--app",
        default="engine",
        choices=sorted(_SERVE_APPS),
        help="engine (default), or one of `flashsale bench`'s yardsticks: ceiling (token and "
        "body only, no store) or baseline (stock decided in Postgres)",
    )
    serve.set_defaults(func=cmd_serve)

    worker = sub.add_parser(
        "worker",
        help="run an arq worker: drain outboxes, expire holds, payments",
        description="Run an arq worker: drain outboxes into Postgres, expire holds (cancelling "
        "their PaymentIntents first), pay refunds, void cancelled "
        "orders' intents, retry stored webhooks, and reconcile every minute.",
    )
    worker.add_argument("--burst", action="store_true", help="run the due jobs once and exit")
    worker.add_argument(
        "--jobs",
        help="comma-separated cron jobs to run (default all), e.g. drain_outboxes,expire_holds",
    )
    worker.set_defaults(func=cmd_worker)

    migrate = sub.add_parser("migrate", help="apply pending Postgres migrations (idempotent)")
    migrate.set_defaults(func=cmd_migrate)

    sale = sub.add_parser("sale", help="create, inspect, pause, resume and close sales")
    sale_sub = sale.add_subparsers(dest="sale_command", required=True, metavar="ACTION")
    create = sale_sub.add_parser(
        "create",
        help="define a sale in Postgres and load it into Redis",
        description="Define a sale in Postgres and load it into Redis. Re-running with the "
        "same terms is harmless; other terms under an existing id are refused.",
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
    when = create.add_mutually_exclusive_group()
    when.add_argument("--starts-at", type=_parse_time, help="ISO 8601 start, with time zone")
    when.add_argument("--starts-in", type=int, default=0, help="start N seconds from now")
    end = create.add_mutually_exclusive_group()
    end.add_argument("--ends-at", type=_parse_time, help="ISO 8601 end, with time zone")
    end.add_argument("--duration", type=_positive, default=3600, help="seconds (default 3600)")
    create.add_argument("--paused", action="store_true", help="create it paused")
    create.set_defaults(func=cmd_sale_create)

    show = sale_sub.add_parser("show", help="definition, live stock, held, sold, outbox lag")
    show.add_argument("id")
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(func=cmd_sale_show)
    for action, text in (
        ("pause", "stop taking orders for now"),
        ("resume", "take orders again"),
        ("close", "end the sale for good"),
    ):
        p = sale_sub.add_parser(action, help=text)
        p.add_argument("id")
        p.set_defaults(func=cmd_sale_status, action=action)

    token = sub.add_parser(
        "token",
        help="mint shopper JWTs (tests, load tests)",
        description="Mint shopper JWTs signed with FLASHSALE_JWT_SECRET "
        "(or FLASHSALE_JWT_PRIVATE_KEY for RS256).",
    )
    who = token.add_mutually_exclusive_group(required=True)
    who.add_argument("--user", action="append", help="user id (repeatable)")
    who.add_argument("--count", type=_positive, help="mint for N users named PREFIX1..PREFIXN")
    token.add_argument("--prefix", default="shopper-", help="user id prefix for --count")
    token.add_argument("--ttl", type=_positive, default=3600, help="seconds (default 3600)")
    token.add_argument("--out", help="write 'user<TAB>token' lines to this file")
    token.set_defaults(func=cmd_token)

    order = sub.add_parser("order", help="operate on one order")
    order_sub = order.add_subparsers(dest="order_command", required=True, metavar="ACTION")
    refund = order_sub.add_parser(
        "refund",
        help="refund a paid order at the gateway (idempotent)",
        description="Refund a paid order: its units leave the shopper, go back to stock with "
        "--restock or are withdrawn otherwise, and the payment is refunded at the gateway. "
        "Running it again changes nothing.",
    )
    refund.add_argument("id", help="order id")
    refund.add_argument("--restock", action="store_true", help="put the units back on sale")
    refund.set_defaults(func=cmd_order_refund)

    reconcile = sub.add_parser(
        "reconcile",
        help="compare Redis, Postgres and the gateway; exit 0 same, 1 differ, 2 error",
        description="Compare Redis (live), Postgres (ledger) and the payment gateway for one "
        "sale or every live sale, and print each difference. Exit status: 0 nothing differs, "
        "1 something does, 2 the comparison itself failed.",
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
    reconcile.set_defaults(func=cmd_reconcile)

    demo = sub.add_parser(
        "demo",
        help="run a whole sale locally and check its invariants",
        description="Start Redis and Postgres in --dir, seed a sale, start the API and a "
        "worker, storm it with concurrent shoppers, wait for the ledger, print a report "
        "ending in 'invariants: ok' (exit 0) or 'invariants: VIOLATED ...' (exit 1), and stop "
        "everything it started.",
    )
    demo.add_argument("--dir", default=".flashsale/demo", help="where servers keep their data")
    demo.add_argument("--stock", type=_positive, default=1000)
    demo.add_argument("--shoppers", type=_positive, default=3000)
    demo.add_argument("--limit", type=_positive, default=2)
    demo.add_argument("--concurrency", type=_positive, default=200)
    demo.set_defaults(func=cmd_demo)

    bench = sub.add_parser(
        "bench",
        help="benchmark placing orders against a bare-Starlette ceiling and a Postgres baseline",
        description="Start Redis and Postgres in --dir (which the bench owns: it empties them), "
        "then drive, one after the other and with wrk, a ceiling (bare Starlette endpoint: "
        "token and body only), the engine while stock lasts, the engine after sell-out, and a "
        "naive Postgres baseline; time the ledger and the outbox drain; check every invariant. "
        "Writes report.json, report.md and throughput.png to --out and prints a summary. Exit "
        "status 1 when an invariant is violated (timing targets are reported, never enforced).",
    )
    bench.add_argument("--dir", default=".flashsale/bench", help="where servers keep their data")
    bench.add_argument("--out", default="bench-report", help="report folder (default %(default)s)")
    bench.add_argument("--connections", type=_positive, default=64, help="wrk connections")
    bench.add_argument("--threads", type=_positive, default=2, help="wrk threads (default 2)")
    bench.add_argument("--duration", type=_positive, default=10, help="seconds per phase")
    bench.add_argument(
        "--stock",
        type=_positive,
        help="units of the while-stock-lasts sale (default: 30,000 x duration, more than any "
        "server here can sell in the phase)",
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
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result: int = args.func(args)
        return result
    except ConfigError as exc:
        print(f"flashsale: configuration error: {exc}", file=sys.stderr)
        return 2
    except ProblemError as exc:
        print(f"flashsale: {exc.code}: {exc.detail}", file=sys.stderr)
        return 1
    except (OSError, ConnectionError) as exc:
        print(f"flashsale: cannot reach a backing service: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
