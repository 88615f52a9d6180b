"""``flashsale demo`` and ``bench``: programs that live beside the service (``localrun``,
``loadtests``) and are imported only when one of them runs."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

__all__ = ["BENCH_MODULES", "cmd_bench", "cmd_demo"]

# What the `bench` extra adds that the bench imports. The report's chart needs matplotlib, and it
# is drawn last: without this check a plain install runs every phase and then fails half-written.
# (py-spy, the extra's other package, is a program: without it the report has no profile.)
BENCH_MODULES = ("matplotlib",)


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
    missing = [name for name in BENCH_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        print(
            f"flashsale: bench needs {', '.join(missing)}, which is not installed: "
            "pip install 'flashsale[bench]'",
            file=sys.stderr,
        )
        return 2

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
