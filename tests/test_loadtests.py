"""The locust scenarios, run headless for a few seconds against a real server and worker."""

from __future__ import annotations

import asyncio
import csv
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from redis.asyncio import Redis

from engine.invariants import audit_sale, wait_for_ledger
from engine.settings import Settings
from localrun import servers as localservices
from localrun.demo import start_process, stop_process, wait_ready
from tests.conftest import ROOT, SaleFactory


@pytest.fixture
def served(settings: Settings, tmp_path: Path) -> Iterator[Settings]:
    """The API server and a worker as real processes, with a webhook secret locust shares."""
    served = replace(settings, port=localservices.free_port(), webhook_secret="whsec_" + "l" * 24)
    procs = [
        start_process(["serve"], served, tmp_path / "server.log"),
        start_process(["worker"], served, tmp_path / "worker.log"),
    ]
    try:
        yield served
    finally:
        for proc in procs:
            stop_process(proc)


def _locust(served: Settings, url: str, sale_id: str, tmp_path: Path) -> dict[tuple[str, str], Any]:
    """Mint tokens with the CLI, run locust headless for 6 s; its stats rows by (type, name)."""
    env = {**os.environ, **served.as_env()}
    tokens = tmp_path / "tokens.tsv"
    minted = subprocess.run(
        [sys.executable, "-m", "engine.cli", "token", "--count", "60", "--out", str(tokens)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert minted.returncode == 0, minted.stderr
    env |= {"FLASHSALE_LOCUST_TOKENS": str(tokens), "FLASHSALE_LOCUST_SALE": sale_id}
    locustfile = ROOT / "loadtests" / "locustfile.py"
    options = f"--headless -u 40 -r 40 -t 6s --only-summary --loglevel WARNING --host {url}"
    locust = subprocess.run(
        [
            sys.executable,
            "-m",
            "locust",
            "-f",
            str(locustfile),
            *options.split(),
            "--csv",
            str(tmp_path / "run"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    print(locust.stdout[-4000:], locust.stderr[-4000:])
    assert locust.returncode == 0  # locust exits 1 when any request failed
    with open(tmp_path / "run_stats.csv") as stats:
        return {(row["Type"], row["Name"]): row for row in csv.DictReader(stats)}


@pytest.mark.slow
async def test_headless_locust_run_has_no_failures(
    served: Settings, redis: Redis, db: asyncpg.Pool, ledger_sale: SaleFactory, tmp_path: Path
):
    sale = await ledger_sale(stock=50, per_user_limit=2, per_order_max=2)
    url = f"http://{served.host}:{served.port}"
    await wait_ready(url)
    rows = await asyncio.to_thread(_locust, served, url, sale.id, tmp_path)
    assert rows[("", "Aggregated")]["Failure Count"] == "0"
    assert int(rows[("POST", "POST /v1/sales/[id]/orders")]["Request Count"]) > 100
    # 40 shoppers, up to 2 units each, against 50 units: the sale sells out (an outcome).
    assert int(rows[("outcome", "sold-out")]["Request Count"]) > 0
    assert int(rows[("POST", "POST /v1/orders/[id]/pay")]["Request Count"]) > 0
    assert int(rows[("POST", "POST /v1/webhooks/stripe")]["Request Count"]) > 0

    # Pay calls and webhooks still in flight when locust stops change orders for a moment
    # after the storm; the ledger is complete once it has caught up with the last of those.
    for _ in range(30):
        await wait_for_ledger(redis, sale.id, timeout_s=30)
        audit = await audit_sale(redis, db, sale.id)
        if audit.ok:
            break
        await asyncio.sleep(0.5)
    assert audit.ok, audit.violations
    assert audit.states.get("paid", 0) > 0
