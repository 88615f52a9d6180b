"""``python -m loadtests.scale --smoke``: the scale program runs end to end and writes every figure.

Its figures are read off a full run's report, never asserted here (STYLE.md, rule 10); this
checks the machinery, and that the run lost no order on the way to the ledger.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from tests.conftest import ROOT

QUANTILES = ("p50", "p99", "max")


@pytest.mark.slow
def test_scale_smoke_writes_a_complete_report(tmp_path: Path):
    out = tmp_path / "report.json"
    # Drain and expiry only: the program waits at each fill point until every worker job has run
    # since (up to SETTLE_MAX_S), and the reconcile job runs once a minute.
    options = ["--smoke", "--jobs", "drain_outboxes,expire_holds", "--rate", "500", "--out", out]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "loadtests.scale",
            *options,
            "--dir",
            ROOT / ".flashsale/scale-test",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    print(result.stdout[-5000:], result.stderr[-5000:])
    assert result.returncode == 0
    assert "invariants: ok" in result.stdout

    report = orjson.loads(out.read_bytes())
    assert report["settings"]["worker_jobs"] == ["drain_outboxes", "expire_holds"]
    assert report["settings"]["holds"] == 2_000 and report["settings"]["rate"] == 500
    low, high = report["holds"]["points"]
    assert (low["holds"], high["holds"]) == (1_000, 2_000)
    assert high["worker_rss_mb"] > 0 and high["redis_mb"] > low["redis_mb"]
    assert high["worker_peak_rss_mb"] >= high["worker_rss_mb"]
    assert low["every_job_ran_after_s"] is not None and high["every_job_ran_after_s"] is not None
    # Redis holds every hold; the worker's memory per hold may be about nothing, either sign.
    assert report["holds"]["redis_bytes_per_hold"] > 0
    # Either sign, but a figure: not NaN, and far below what a hold costs Redis.
    worker_per_hold = report["holds"]["worker_rss_bytes_per_hold"]
    assert math.isfinite(worker_per_hold) and abs(worker_per_hold) < 64 * 1024
    assert report["holds"]["redis_mb_at_1m_holds"] > high["redis_mb"]
    assert report["idle"]["worker_rss_mb"] > 0

    soak = report["soak"]
    assert soak["orders"] == 5_000 and soak["refused"] == {}
    assert 0 < soak["sustained_orders_per_s"] <= 500 * 1.01
    assert soak["worker_cpu_pct"] > 0 and soak["worker_rss_mb_end"] > 0
    assert soak["worker_rss_mb_start"] > 0
    for figure in ("ledger_lag_orders", "ledger_lag_s", "oldest_unwritten_s"):
        values = [soak[figure][q] for q in QUANTILES]
        assert 0 <= values[0] <= values[1] <= values[2], figure
    assert soak["ledger_after_s"] is not None
    [window] = soak["windows"]  # 10 s of soak: one 30 s row
    assert window["from_s"] == 0 and window["orders_per_s"] > 0
    assert 8 <= len(report["samples"]) <= 12
    assert 2_000 < report["samples"][-1]["placed"] <= 7_000
    assert report["worker_exits"] == []

    invariants = report["invariants"]
    assert invariants["ok"] is True and invariants["violations"] == []
    assert invariants["orders_in_redis"] == invariants["orders_in_ledger"] == 7_000
    assert invariants["states"] == {"reserved": 7_000}
