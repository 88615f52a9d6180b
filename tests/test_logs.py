"""Log lines: JSON objects with the record's fields as keys; an outage logged at its start and
its end only."""

from __future__ import annotations

import logging
import sys

import orjson
import pytest

from engine.logs import JsonFormatter, Outage


def _record(message: str, *args: object, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord(
        "flashsale.worker", logging.WARNING, __file__, 1, message, args, None
    )
    record.__dict__.update(extra)
    return record


def test_a_json_line_carries_the_extra_fields_as_keys() -> None:
    line = JsonFormatter().format(_record("expired %d holds", 3, sale_id="s-1", job="expiry"))
    parsed = orjson.loads(line)
    assert parsed["message"] == "expired 3 holds" and parsed["level"] == "warning"
    assert parsed["sale_id"] == "s-1" and parsed["job"] == "expiry"
    assert parsed["logger"] == "flashsale.worker" and parsed["time"].endswith("+00:00")
    assert "\n" not in line


def test_a_json_line_carries_the_error_and_its_traceback() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = _record("failed")
        record.exc_info = sys.exc_info()
    parsed = orjson.loads(JsonFormatter().format(record))
    assert parsed["error"] == "ValueError: boom" and "Traceback" in parsed["traceback"]


def test_an_outage_is_logged_when_it_starts_and_when_it_ends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    outage = Outage("redis", logging.getLogger("flashsale.redis"))
    with caplog.at_level(logging.INFO):
        for _ in range(1000):
            outage.failed(ConnectionError("refused"))
        outage.recovered()
        outage.recovered()
    starts = [r for r in caplog.records if getattr(r, "event", None) == "outage.start"]
    ends = [r for r in caplog.records if getattr(r, "event", None) == "outage.end"]
    assert len(starts) == 1 and len(ends) == 1 and len(caplog.records) == 2
    assert ends[0].failures == 1000  # type: ignore[attr-defined]
