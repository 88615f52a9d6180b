"""``flashsale demo`` and ``bench``: programs that live beside the service (``localrun``,
``loadtests``) and are imported only when one of them runs."""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["cmd_bench", "cmd_demo"]


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
