"""ASGI entry points for uvicorn (``flashsale serve --app engine|ceiling|baseline``).

Each factory builds its app and then freezes the garbage collector's view of everything alive
at that point (``gc.freeze``): the modules, classes and functions of Starlette, uvicorn, redis,
asyncpg, pyjwt and the Stripe SDK are a few hundred thousand objects that never die, and every
full collection walked all of them. Measured on the engine under the bench's load (wrk, 64
connections, one uvicorn process): full collections took ~20 ms each, all 64 requests in flight
waiting behind them. Side by side in one run (6 rounds of 2 s each): frozen 11,696 orders/s at
p99 12.4 ms, not frozen 10,826 at p99 21.3 ms. The
ceiling did not move (19,596 vs 19,469 req/s): fewer modules, fewer survivors. Objects made
later are collected as before, so reference cycles (an exception's traceback, say) are still
freed. The ceiling and the baseline get the same treatment: every server of the bench runs
with the same settings.
"""

from __future__ import annotations

import gc
import logging

from starlette.applications import Starlette

from engine.http.app import create_app
from engine.http.metrics import RequestMetrics
from engine.logs import configure
from engine.settings import Settings

__all__ = ["create", "settled"]


def settled(app: Starlette) -> Starlette:
    gc.collect()
    gc.freeze()
    return app


def create() -> Starlette:
    settings = Settings.from_env()
    # Each server process logs the same way (uvicorn's workers start from a fresh interpreter,
    # where only the uvicorn loggers carry serve's --log-level).
    level = logging.getLogger("uvicorn.error").getEffectiveLevel()
    configure(settings.log_format, logging.getLevelName(level).lower())
    return settled(create_app(settings, hook=RequestMetrics() if settings.metrics else None))
