"""``flashsale bench --smoke``: the whole benchmark, a couple of seconds per phase.

It checks the machinery and the report, and that no run oversells or loses an order; the timing
targets are read off a full run's report, never asserted here (STYLE.md, rule 10).
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

import loadtests.bench
from engine.cli import main
from loadtests.bench import BenchOptions
from tests.conftest import ROOT

# Every phase the bench runs has its figures in the report.
PHASES = loadtests.bench.PHASE_ORDER
RATIOS = (
    "engine_to_ceiling",
    "soldout_to_ceiling",
    "engine_to_baseline",
    "engine_p99_to_ceiling_p99",
    "engine_p99_to_baseline_p99",
    "engine_fsync_to_engine",
    "engine_fsync_to_baseline",
    "engine_metered_to_unmetered",
)


@pytest.fixture
def bench_runs(monkeypatch: pytest.MonkeyPatch) -> list[BenchOptions]:
    """The options of every bench that `flashsale bench` went on to start (none is started)."""
    runs: list[BenchOptions] = []

    def run_bench(options: BenchOptions) -> int:
        runs.append(options)
        return 0

    monkeypatch.setattr(loadtests.bench, "run_bench", run_bench)
    return runs


def test_bench_without_its_extra_exits_2_before_starting_anything(
    bench_runs: list[BenchOptions],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
):
    # A None entry makes matplotlib unimportable and invisible to importlib.util.find_spec,
    # as in an install without the bench extra.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["bench", "--smoke", "--dir", str(tmp_path / "d"), "--out", str(tmp_path)]) == 2
    assert bench_runs == []
    assert "matplotlib" in (err := capsys.readouterr().err)
    assert "pip install 'flashsale[bench]'" in err


def test_bench_with_its_extra_starts(bench_runs: list[BenchOptions], tmp_path: Path):
    assert main(["bench", "--smoke", "--dir", str(tmp_path / "d"), "--out", str(tmp_path)]) == 0
    assert [options.smoke for options in bench_runs] == [True]


@pytest.mark.slow
def test_bench_smoke_writes_a_complete_report(tmp_path: Path):
    out = tmp_path / "report"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "engine.cli",
            "bench",
            "--smoke",
            "--out",
            str(out),
            "--dir",
            str(ROOT / ".flashsale" / "test-bench"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    print(result.stdout[-5000:], result.stderr[-5000:])
    assert result.returncode == 0
    assert result.stdout.rstrip().endswith("invariants: ok")

    report = orjson.loads((out / "report.json").read_bytes())
    assert report["invariants"]["ok"] is True and report["invariants"]["violations"] == []
    for name, sale in report["invariants"]["sales"].items():
        assert sale["ok"], name
        assert sale["orders_in_redis"] == sale["orders_in_ledger"] > 0, name
        assert sale["available"] + sale["held"] + sale["sold"] == sale["initial"], name
    for ratio in RATIOS:
        assert math.isfinite(report["ratios"][ratio]) and report["ratios"][ratio] > 0, ratio
    persistence = report["persistence"]
    # The ledger wait gives up at 60 s (engine.invariants.wait_for_ledger).
    assert 0 <= persistence["ledger_complete_s"] < 60 and persistence["drain_orders_per_s"] > 0
    for name in PHASES:
        phase = report["phases"][name]
        assert phase["requests"] > 0 and phase["throughput_rps"] > 0, name
        latency = phase["latency_ms"]
        assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"] <= latency["max"], name
        assert phase["slices"] and phase["socket_errors"] == 0, name
    # While stock lasts every answer is a 201; after sell-out every answer is a refusal.
    assert report["phases"]["engine"]["non_2xx"] == 0
    assert report["phases"]["engine_metered"]["non_2xx"] == 0
    assert report["phases"]["engine_unmetered"]["non_2xx"] == 0
    assert report["phases"]["sold_out"]["non_2xx"] == report["phases"]["sold_out"]["requests"]
    # CPU by process: each phase's own server and the load generator worked; the engine's
    # orders cost Redis time, its sold-out answers (engine.http.soldout) almost none.
    cpu = {name: report["phases"][name]["cpu"]["us_per_request"] for name in PHASES}
    server = {
        "ceiling": "ceiling",
        "engine": "engine",
        "engine_metered": "engine_metered",
        "engine_unmetered": "engine_unmetered",
        "engine_fsync": "engine",
        "sold_out": "engine",
        "baseline": "baseline",
    }
    for name in PHASES:
        assert cpu[name][f"{server[name]} server"] > 0 and cpu[name]["wrk"] > 0, name
    assert cpu["engine"]["redis"] > 0 and cpu["baseline"]["postgres"] > 0
    assert cpu["sold_out"]["redis"] < cpu["engine"]["redis"] / 2

    assert (out / "throughput.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (out / "report.md").read_text()
    assert "| ceiling (Starlette, no store) |" in markdown and "Invariants: **ok**" in markdown
    assert "| cores busy (machine) |" in markdown


@pytest.mark.slow
def test_costs_program_prints_every_figure():
    """``python -m loadtests.costs``, tiny: the program behind the batch-size figures still runs."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "loadtests.costs",
            "--orders",
            "200",
            "--rounds",
            "1",
            "--dir",
            str(ROOT / ".flashsale" / "test-costs"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert sum("orders per call" in line and "µs" in line for line in lines) == 3
    header = next(i for i, line in enumerate(lines) if "orders/entry" in line)
    end = lines.index("", header)
    drain_rows = [line.split() for line in lines[header + 1 : end]]
    assert [(row[0], row[1]) for row in drain_rows] == [
        ("1", "200"),
        ("1", "1000"),
        ("20", "200"),
        ("20", "1000"),
    ]
    assert "one subscriber to order.placed" in lines[end + 1]
    assert lines[end + 2].split()[:2] == ["with", "events"] and "µs" in lines[end + 2]
    bad = subprocess.run(
        [sys.executable, "-m", "loadtests.costs", "--orders", "0"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "at least 1" in bad.stderr


@pytest.mark.slow
@pytest.mark.parametrize("mode", [["--in-process", "--requests", "300"], ["--seconds", "1"]])
def test_protocol_cost_program_prints_both_protocols(mode: list[str]):
    """``python -m loadtests.protocolcost``, tiny: the figures behind ``engine.http.protocol``'s
    cost still come out, in process and served (on Redis and Postgres of its own, which it
    stops)."""
    own = ROOT / ".flashsale" / "test-protocolcost"
    program = [sys.executable, "-m", "loadtests.protocolcost", "--dir", str(own)]
    result = subprocess.run(
        [*program, "--rounds", "2", *mode],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    rounds = [line.split()[:3] for line in lines if line.startswith("round ")]
    assert rounds == [
        ["round", "1", "plain"],
        ["round", "1", "limited"],
        ["round", "2", "limited"],
        ["round", "2", "plain"],
    ]
    assert sum(line.startswith("median ") and "µs CPU" in line for line in lines) == 2
    assert lines[-1].startswith("limited/plain ") and "(µs CPU)" in lines[-1]
