"""The ``flashsale`` admin command: serve, work, migrate, run sales, mint tokens, demo, bench.

Configuration comes from the environment (see ``engine.settings``); flags override per run.
Exit status: 0 success, 1 the operation was refused (the message says why), 2 bad configuration.

The arguments are in ``parser``; the handlers by concern in ``serve`` (serve, worker, migrate),
``sales``, ``orders`` (token, order refund, reconcile) and ``tooling`` (demo, bench).
"""

from __future__ import annotations

import sys

from engine.cli.parser import build_parser
from engine.errors import ProblemError
from engine.settings import ConfigError

__all__ = ["build_parser", "main"]


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
