"""Logs an operator can use: JSON lines by default, readable text on a terminal or on request,
and an outage logged once when it starts and once when it ends.

Every line carries the fields a log search needs as fields, not inside the message: pass them
with ``extra=`` (``sale_id``, ``order_id``, ``job``, ``seconds``...) and they become keys of the
JSON object. ``configure`` is called once by ``flashsale serve`` and ``flashsale worker``; the
library itself only ever logs through ``logging.getLogger("flashsale...")``.
"""

from __future__ import annotations

import logging
import sys
import time
from datetime import UTC, datetime
from typing import Any

import orjson

__all__ = ["JsonFormatter", "Outage", "configure"]


# The attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the record's extra fields, and
    the error with its traceback when the record carries one."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, tz=UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                line[key] = value
        if record.exc_info and record.exc_info[1] is not None:
            error = record.exc_info[1]
            line["error"] = f"{type(error).__name__}: {error}"
            line["traceback"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


class _TextFormatter(logging.Formatter):
    """``time level logger: message key=value ...`` for a person at a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = " ".join(
            f"{key}={value}"
            for key, value in vars(record).items()
            if key not in _STANDARD and not key.startswith("_")
        )
        if not fields:
            return text
        head, newline, rest = text.partition("\n")
        return f"{head} {fields}{newline}{rest}"


def configure(fmt: str = "auto", level: str = "info") -> None:
    """Send every log record (ours, uvicorn's, arq's) to stderr in one format. ``auto``: text
    when stderr is a terminal, JSON lines otherwise (a supervisor, a container, a file)."""
    if fmt == "auto":
        fmt = "text" if sys.stderr.isatty() else "json"
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(_TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # uvicorn and arq bring handlers of their own; their records go through ours instead.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "arq", "arq.worker"):
        borrowed = logging.getLogger(name)
        borrowed.handlers.clear()
        borrowed.propagate = True


class Outage:
    """Logs a dependency's outage once when it starts and once when it ends, with how long it
    lasted and how many calls failed meanwhile, instead of a traceback per failed request (a
    Redis restart under load was thousands of tracebacks in a few seconds)."""

    def __init__(self, what: str, log: logging.Logger) -> None:
        self.what = what
        self._log = log
        self.since: float | None = None
        self.failures = 0

    def failed(self, error: BaseException) -> None:
        self.failures += 1
        if self.since is None:
            self.since = time.monotonic()
            self._log.error(
                "%s unavailable: %s",
                self.what,
                error,
                extra={"event": "outage.start", "dependency": self.what, "error": repr(error)},
            )

    def recovered(self) -> None:
        if self.since is None:
            return
        seconds = round(time.monotonic() - self.since, 3)
        self._log.warning(
            "%s available again after %.1f s (%d calls failed meanwhile)",
            self.what,
            seconds,
            self.failures,
            extra={
                "event": "outage.end",
                "dependency": self.what,
                "seconds": seconds,
                "failures": self.failures,
            },
        )
        self.since = None
        self.failures = 0
