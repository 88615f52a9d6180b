"""``flashsale sale create|show|pause|resume|close``."""

from __future__ import annotations

import argparse
import time

import orjson

from engine.cli.stores import run_with_stores
from engine.settings import Settings

__all__ = ["cmd_sale_create", "cmd_sale_show", "cmd_sale_status"]


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
        hold_seconds=args.hold_seconds or Settings.from_env().hold_seconds,
        start_ms=start_ms,
        end_ms=args.ends_at if args.ends_at is not None else start_ms + args.duration * 1000,
        status="paused" if args.paused else "open",
        stock_low_units=args.stock_low,
    )
    created = run_with_stores(lambda db, redis: create_sale(db, redis, sale))
    print(
        f"{'created' if created else 'already existed, reloaded'} sale {sale.id}: "
        f"{sale.stock} units, limit {sale.per_user_limit} per shopper"
    )
    return 0


def cmd_sale_show(args: argparse.Namespace) -> int:
    from engine.sales import DEFINITION_FIELDS, sale_report

    report = run_with_stores(lambda db, redis: sale_report(db, redis, args.id))
    if args.json:
        print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
        return 0
    definition = report.get("definition", {})
    for name in DEFINITION_FIELDS:
        if definition.get(name) is not None:
            print(f"{name:>20}: {definition[name]}")
    for name, value in report.get("live", {}).items():
        print(f"{'live ' + name:>20}: {value}")
    ledger = ", ".join(f"{k} {v}" for k, v in sorted(report["ledger_orders"].items()))
    print(f"{'ledger orders':>20}: {ledger or 'none'}")
    return 0


def cmd_sale_status(args: argparse.Namespace) -> int:
    from engine.sales import change_status

    status = {"pause": "paused", "resume": "open", "close": "closed"}[args.action]
    previous = run_with_stores(lambda db, redis: change_status(db, redis, args.id, status))
    print(f"sale {args.id}: {previous} -> {status}")
    return 0
