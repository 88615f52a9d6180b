"""``flashsale token``, ``order refund`` and ``reconcile``: shoppers' tokens and orders' money."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from engine.cli.stores import run_with_stores
from engine.errors import ProblemError
from engine.settings import Settings

if TYPE_CHECKING:
    import asyncpg
    from redis.asyncio import Redis

__all__ = ["cmd_order_refund", "cmd_reconcile", "cmd_token"]


def cmd_token(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from engine.http.auth import mint_tokens

    settings = Settings.from_env()
    if args.user:
        users = list(args.user)
    else:
        users = [f"{args.prefix}{i}" for i in range(1, args.count + 1)]
    # A bar on a terminal (tqdm's disable=None) when there are enough to wait for: RS256 signs
    # about a thousand a second.
    shown = tqdm(users, desc="minting", unit=" tokens", disable=None if len(users) > 2000 else True)
    tokens = mint_tokens(settings, shown, args.ttl)
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

    async def refund(db: asyncpg.Pool, redis: Redis) -> str:
        requested = await inventory.refund(redis, sale_id, args.id, "request", args.restock)
        if requested.state == "refunded":
            return "refunded"
        order = await inventory.read_order(redis, sale_id, args.id)
        assert order is not None
        refund_id = await make_gateway(Settings.from_env(), redis).refund(order["pi"], args.id)
        done = await inventory.refund(redis, sale_id, args.id, "complete", refund_id=refund_id)
        return f"{done.state} ({refund_id})"

    print(f"order {args.id}: {run_with_stores(refund)}")
    return 0


def cmd_reconcile(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from engine.payments import make_gateway
    from engine.reconcile import reconcile
    from engine.sales import live_sale_ids

    async def run(db: asyncpg.Pool, redis: Redis) -> int:
        gateway = make_gateway(Settings.from_env(), redis)
        sale_ids = [args.sale] if args.sale else await live_sale_ids(redis)
        differences = 0
        # On a terminal only (the report goes to stdout, the bar to stderr).
        for sale_id in tqdm(sale_ids, desc="reconciling", unit=" sales", disable=None):
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
        return run_with_stores(run)
    except ProblemError:
        raise
    except Exception as exc:  # exit 2 means "could not tell", distinct from "found something"
        print(f"flashsale: reconcile failed: {exc}", file=sys.stderr)
        return 2
