"""``flashsale bench``: how fast the engine places orders, next to what else could be built.

One command starts its own Redis and Postgres (in ``--dir``, which the bench owns and empties),
seeds sales, and drives the servers round robin with wrk (a second of each per round), with the
same connections, duration, request shape and uvicorn set-up:

1. **ceiling**: a bare Starlette endpoint, token and body only (``loadtests.benchapps``);
2. **engine** placing orders while stock lasts (stock sized so the phase cannot sell out),
   with an outbox worker running beside it, then the time until the ledger has every order;
   and the same engine in two servers of their own, one counting requests for ``/metrics`` and
   one not, so what counting costs is read side by side;
3. **engine, appendfsync always**: the same, with Redis fsyncing every write for these slices
   (CONFIG SET), so the engine meets the baseline's fsync-per-commit durability;
4. **sold out**: the engine answering a sale that has no stock left;
5. **baseline**: stock decided in Postgres with ``UPDATE ... WHERE stock >= $1`` + INSERT;
6. **drain**: orders piled up with the worker stopped, then the worker's drain rate.

Then every sale's invariants (``engine.invariants.audit_sale``), and a report: ``report.json``,
``report.md`` and ``throughput.png`` in ``--out``, plus the summary table on stdout.
"""

from __future__ import annotations

import asyncio
import json
import math
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import asyncpg
from redis.asyncio import Redis
from tqdm import tqdm

from engine.db import connect_postgres, connect_redis, empty_tables, migrate
from engine.http.auth import mint_tokens
from engine.invariants import SaleAudit, audit_sale, outbox_backlog, wait_for_ledger
from engine.inventory import SaleDefinition, reserve
from engine.sales import create_sale
from engine.scripts import load_scripts
from engine.settings import Settings
from loadtests.benchapps import baseline_counts, prepare_baseline
from loadtests.benchreport import profile_summary, write_report
from loadtests.cpumeter import CpuMeter, children_of, postmaster_and_backends, processes_s
from loadtests.loadgen import Phase, ensure_wrk, run_phase, run_slice
from localrun import servers as localservices
from localrun.demo import start_process, stop_process, wait_ready

__all__ = ["BenchOptions", "bench_sale", "run_bench"]

# The fastest any server here could possibly take orders, with room to spare: phase (a)'s stock is
# this times every second that places orders in it (the engine's slices with and without metrics
# and with appendfsync always, and the profiled run), so "while stock lasts" holds throughout
# (measured engine rates on the 2-core machine are below a third of it).
MAX_PLAUSIBLE_RPS = 30_000
# Units of the sold-out sale, bought up before its phase by shoppers outside the token file.
SOLD_OUT_STOCK = 1_000
# How many requests the bench sends at once when it places orders itself (sold-out and drain
# sales): enough to keep one Redis busy, few enough to keep memory flat.
DIRECT_BATCH = 500
WORKER_JOBS = "drain_outboxes,expire_holds"
# Within a round, the sold-out slice follows the engine's (the engine server stays warm) and the
# ceiling comes last, farthest from any drain the engine's slice set off.
PHASE_ORDER = (
    "engine",
    "engine_metered",
    "engine_unmetered",
    "engine_fsync",
    "sold_out",
    "baseline",
    "ceiling",
)
# The phase that runs the engine with Redis fsyncing every write (``appendfsync always``, set
# live with CONFIG SET for its slices only), so the engine is compared with the Postgres
# baseline, which fsyncs every commit, at the same durability: nothing answered is lost.
FSYNC_PHASE = "engine_fsync"
SERVER_APPS = ("ceiling", "engine", "baseline")
# The engine twice more, each in a server that serves nothing else, one counting requests for
# /metrics (the default) and one not (``FLASHSALE_METRICS=off``): what counting costs the order
# path is one phase against the other. The main engine server is not the yardstick: it also
# serves the fsync, sold-out and profiled phases.
METERED = "engine_metered"
UNMETERED = "engine_unmetered"
SOLD_OUT_REFRESH_MS = 50
# The phases that place orders in phase (a)'s sale.
STOCK_PHASES = ("engine", METERED, UNMETERED, FSYNC_PHASE)


@dataclass
class BenchOptions:
    dir: Path = Path(".flashsale/bench")
    out: Path = Path("bench-report")
    connections: int = 64
    threads: int = 2
    duration_s: int = 10
    stock: int | None = None  # phase (a); default MAX_PLAUSIBLE_RPS x its seconds of orders
    shoppers: int = 10_000
    limit: int | None = None  # per shopper; default: nobody reaches it while stock lasts
    server_workers: int = 1
    appendfsync: str = "everysec"
    drain_orders: int = 50_000
    warmup_s: int = 2
    profile_s: int = 5
    smoke: bool = False

    def __post_init__(self) -> None:
        if self.smoke:
            self.duration_s = min(self.duration_s, 2)
            self.shoppers = min(self.shoppers, 2_000)
            self.drain_orders = min(self.drain_orders, 5_000)
            self.warmup_s = 1
            self.profile_s = 0

    @property
    def phase_stock(self) -> int:
        seconds = self.duration_s * len(STOCK_PHASES) + self.profile_s
        return self.stock or MAX_PLAUSIBLE_RPS * seconds

    @property
    def per_user_limit(self) -> int:
        return self.limit or math.ceil(self.phase_stock / self.shoppers) + 1


class Servers:
    """The bench's processes, each server on its own port; stops whatever it started."""

    def __init__(self, settings: Settings, logs: Path) -> None:
        self.settings = settings
        self.logs = logs
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.urls: dict[str, str] = {}

    async def serve(
        self, app: str, name: str | None = None, **changes: Any
    ) -> subprocess.Popen[bytes]:
        """Serve ``app`` as ``name`` (default: the app's), with ``changes`` to the settings."""
        name = name or app
        settings = replace(self.settings, port=localservices.free_port(), **changes)
        proc = start_process(["serve", "--app", app], settings, self.logs / f"{name}.log")
        self.procs[name] = proc
        self.urls[name] = f"http://{settings.host}:{settings.port}"
        await wait_ready(self.urls[name])
        return proc

    def work(self) -> None:
        # Outbox drain and hold expiry only: the bench's shoppers never pay, so the payment jobs
        # would find nothing to do, and the figures are the order path's.
        self.procs["worker"] = start_process(
            ["worker", "--jobs", WORKER_JOBS], self.settings, self.logs / "worker.log"
        )

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name, None)
        if proc is not None:
            stop_process(proc)

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.stop(name)


def bench_sale(sale_id: str, stock: int, limit: int) -> SaleDefinition:
    now_ms = int(time.time() * 1000)
    return SaleDefinition(
        id=sale_id,
        name=f"Bench {sale_id}",
        stock=stock,
        price=4900,
        currency="usd",
        per_user_limit=limit,
        per_order_max=limit,
        hold_seconds=3600,  # no hold expires during the bench, so held units only grow
        start_ms=now_ms - 1000,
        end_ms=now_ms + 6 * 3_600_000,
    )


async def _place_directly(redis: Redis, sale_id: str, orders: int, prefix: str) -> set[str]:
    """``orders`` one-unit orders by distinct shoppers, through the reserve script itself."""
    placed: set[str] = set()
    for start in range(0, orders, DIRECT_BATCH):
        holds = await asyncio.gather(
            *(
                reserve(redis, sale_id, f"{prefix}{i}", 1, f"direct-{i}")
                for i in range(start, min(orders, start + DIRECT_BATCH))
            )
        )
        placed.update(hold.order_id for hold in holds)
    return placed


async def _drain_rate(redis: Redis, servers: Servers, sale_id: str, orders: int) -> dict[str, Any]:
    """Start the (stopped) worker on a piled-up outbox of ``orders`` orders and time the drain,
    from the first entry leaving the stream to the last, so the worker's own start-up is not
    counted. The orders were placed one script call each, so one entry each: the drain's worst
    case (a server's storm packs a batch of orders into each entry)."""
    backlog = await outbox_backlog(redis, sale_id)
    started = time.monotonic()
    servers.work()
    first_drop: float | None = None
    while True:
        left = await outbox_backlog(redis, sale_id)
        now = time.monotonic()
        if first_drop is None and left < backlog:
            first_drop = now
        if left == 0:
            break
        if now - started > 300:
            raise TimeoutError(f"the worker drained {backlog - left} of {backlog} in 300 s")
        await asyncio.sleep(0.005)
    assert first_drop is not None
    draining = max(now - first_drop, 1e-3)
    return {
        "orders": orders,
        "entries": backlog,
        "drain_s": round(draining, 3),
        "worker_start_to_empty_s": round(now - started, 3),
        "drain_orders_per_s": round(orders / draining, 1),
    }


async def _seed_tokens(settings: Settings, options: BenchOptions, path: Path) -> None:
    users = [f"shopper-{i}" for i in range(options.shoppers)]
    tokens = mint_tokens(settings, users, ttl_s=6 * 3600)
    lines = "".join(f"{u}\t{t}\n" for u, t in zip(users, tokens, strict=True))
    await asyncio.to_thread(path.write_text, lines)


async def _reset(redis: Redis, db: asyncpg.Pool) -> None:
    # The bench owns its --dir: earlier runs' orders would only slow and confuse this one.
    await redis.flushdb()
    await empty_tables(db)
    await db.execute("DROP TABLE IF EXISTS orders_baseline, sales_baseline")


def _meter(services_dir: Path, servers: Servers) -> CpuMeter:
    """CPU of every process the phases use; a server counts with its children (uvicorn's
    worker processes when there are several), Postgres with its backends."""
    recorded = json.loads((services_dir / "services.json").read_text())
    redis_pid, pg_pid = recorded["redis"]["pid"], recorded["postgres"]["pid"]

    def process(name: str) -> Callable[[], float]:
        def seconds() -> float:
            proc = servers.procs.get(name)
            return processes_s([proc.pid, *children_of(proc.pid)]) if proc is not None else 0.0

        return seconds

    return CpuMeter(
        {
            **{f"{app} server": process(app) for app in (*SERVER_APPS, METERED, UNMETERED)},
            "drain worker": process("worker"),
            "redis": lambda: processes_s([redis_pid]) if redis_pid else 0.0,
            "postgres": lambda: postmaster_and_backends(pg_pid) if pg_pid else 0.0,
        }
    )


def _warm(options: BenchOptions, url: str, path: str, tokens: Path) -> None:
    """Every server meets every token before it is measured, so no phase pays first-time JWT
    decodes that another does not (each server process caches the tokens it verified)."""
    run_phase(
        "warm-up",
        url,
        path,
        tokens,
        connections=options.connections,
        threads=options.threads,
        duration_s=options.warmup_s,
    )


def _profile(pid: int, seconds: int, out: Path) -> Path | None:
    # `make bench` runs .venv/bin/python without .venv/bin on PATH; py-spy installs beside it.
    beside = Path(sys.executable).parent / "py-spy"
    spy = str(beside) if beside.exists() else shutil.which("py-spy")
    if spy is None or seconds <= 0:
        return None
    raw = out / "profile.txt"
    subprocess.run(
        [
            spy,
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(seconds),
            "--rate",
            "250",
            "--format",
            "raw",
            "--output",
            str(raw),
            "--nonblocking",
            "--subprocesses",
        ],
        capture_output=True,
        check=False,
        timeout=seconds + 60,
    )
    return raw if raw.exists() else None


async def _bench(options: BenchOptions) -> dict[str, Any]:
    ensure_wrk()
    urls = localservices.up(options.dir, appendfsync=options.appendfsync)
    settings = Settings(
        environment="development",
        redis_url=urls["redis_url"],
        database_url=urls["postgres_dsn"],
        jwt_secret=secrets.token_urlsafe(32),
        server_workers=options.server_workers,
        hold_seconds=3600,
        # Sold-out answers from memory (engine.http.soldout): exact with one server process.
        sold_out_refresh_ms=SOLD_OUT_REFRESH_MS,
        metrics_dir=str(options.dir / "metrics"),
    )
    await migrate(settings.database_url)
    options.out.mkdir(parents=True, exist_ok=True)
    logs = options.dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    tokens = options.dir / "tokens.tsv"
    redis = connect_redis(settings, pool_size=64)
    db = await connect_postgres(settings, min_size=1, max_size=4)
    servers = Servers(settings, logs)
    stamp = time.strftime("%H%M%S")
    ids = {k: f"bench-{stamp}-{k}" for k in ("a", "b", "c", "base")}
    path = {
        "engine": f"/v1/sales/{ids['a']}/orders",
        METERED: f"/v1/sales/{ids['a']}/orders",
        UNMETERED: f"/v1/sales/{ids['a']}/orders",
        "engine_fsync": f"/v1/sales/{ids['a']}/orders",
        "sold_out": f"/v1/sales/{ids['b']}/orders",
        "baseline": f"/v1/sales/{ids['base']}/orders",
        "ceiling": f"/v1/sales/{ids['a']}/orders",
    }
    figures: dict[str, Any] = {}
    try:
        await _reset(redis, db)
        await load_scripts(redis)
        await _seed_tokens(settings, options, tokens)
        limit = options.per_user_limit
        await create_sale(db, redis, bench_sale(ids["a"], options.phase_stock, limit))
        await create_sale(db, redis, bench_sale(ids["b"], SOLD_OUT_STOCK, limit))
        await create_sale(db, redis, bench_sale(ids["c"], options.drain_orders, 1))
        await prepare_baseline(db, ids["base"], options.phase_stock)
        presold = await _place_directly(redis, ids["b"], SOLD_OUT_STOCK, "early-bird-")

        print("starting the ceiling, the engine (with an outbox worker) and the baseline")
        server = {app: await servers.serve(app) for app in SERVER_APPS}
        await servers.serve("engine", METERED, metrics=True)
        await servers.serve("engine", UNMETERED, metrics=False)
        servers.work()
        meter = _meter(options.dir, servers)
        url = {
            **servers.urls,
            "sold_out": servers.urls["engine"],
            FSYNC_PHASE: servers.urls["engine"],
        }
        for app in (*SERVER_APPS, METERED, UNMETERED):
            # The engines warm up on the sold-out sale, so phase (a)'s sale stays untouched.
            _warm(
                options,
                url[app],
                path[app if app in ("ceiling", "baseline") else "sold_out"],
                tokens,
            )
        phases = {
            name: Phase(
                name=name, url=url[name], connections=options.connections, threads=options.threads
            )
            for name in PHASE_ORDER
        }
        # Round robin, one slice of each phase per round: whatever else the machine does
        # meanwhile (CPU steal, a noisy neighbour) lands on every phase alike, so the ratios
        # hold up even when the absolute figures wander.
        ledger_waits = []
        rounds = max(1, options.duration_s)
        print(f"{rounds} rounds of 1 s per phase, {options.connections} connections", flush=True)
        for _ in tqdm(range(rounds), desc="rounds", unit=" rounds", disable=None):
            for name in PHASE_ORDER:
                if name == FSYNC_PHASE:
                    await redis.config_set("appendfsync", "always")
                before = meter.read()
                await asyncio.to_thread(run_slice, phases[name], path[name], tokens, 1)
                phases[name].add_cpu(meter.spent(before, meter.read()))
                if name == FSYNC_PHASE:
                    await redis.config_set("appendfsync", options.appendfsync)
                if name in STOCK_PHASES:
                    # The next phase must not pay for this one's drain: wait for the ledger.
                    ledger_waits.append(await wait_for_ledger(redis, ids["a"]))
        figures["ledger_complete_s"] = round(max(ledger_waits), 3)
        figures["ledger_complete_mean_s"] = round(sum(ledger_waits) / len(ledger_waits), 3)

        if options.profile_s:
            print(f"profile: py-spy on the engine for {options.profile_s} s", flush=True)
            spy = asyncio.to_thread(_profile, server["engine"].pid, options.profile_s, options.out)
            load = asyncio.to_thread(
                run_phase,
                "profiled",
                url["engine"],
                path["engine"],
                tokens,
                connections=options.connections,
                threads=options.threads,
                duration_s=options.profile_s,
            )
            raw, profiled = await asyncio.gather(spy, load)
            figures["profile"] = profile_summary(raw) if raw else None
            figures["profiled"] = profiled
        await wait_for_ledger(redis, ids["a"])

        print(f"drain: {options.drain_orders} orders piled up with the worker stopped", flush=True)
        servers.stop_all()
        drained = await _place_directly(redis, ids["c"], options.drain_orders, "drain-")
        figures["drain"] = await _drain_rate(redis, servers, ids["c"], len(drained))
        servers.stop_all()

        audits = {
            "engine": await audit_sale(redis, db, ids["a"]),
            "sold_out": await audit_sale(redis, db, ids["b"], presold),
            "drain": await audit_sale(redis, db, ids["c"], drained),
        }
        figures["baseline_counts"] = await baseline_counts(db, ids["base"])
    finally:
        servers.stop_all()
        await redis.aclose()
        await db.close()
        localservices.down(options.dir)
    return _report(options, settings, ids, phases, figures, audits)


def _audit_json(audit: SaleAudit) -> dict[str, Any]:
    return {
        "ok": audit.ok,
        "initial": audit.initial,
        "available": audit.available,
        "held": audit.held,
        "sold": audit.sold,
        "orders_in_redis": audit.orders_in_redis,
        "orders_in_ledger": audit.orders_in_ledger,
        "max_units_per_user": audit.max_units_per_user,
        "violations": audit.violations,
    }


def _ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b else math.nan


def _report(
    options: BenchOptions,
    settings: Settings,
    ids: dict[str, str],
    phases: dict[str, Phase],
    figures: dict[str, Any],
    audits: dict[str, SaleAudit],
) -> dict[str, Any]:
    raw = {name: phase.summary() for name, phase in phases.items()}
    engine, ceiling, sold_out, baseline, fsync = (
        raw["engine"],
        raw["ceiling"],
        raw["sold_out"],
        raw["baseline"],
        raw[FSYNC_PHASE],
    )
    violations = [f"{name}: {v}" for name, a in audits.items() for v in a.violations]
    # Phase (a) must have taken orders all along: every answer a 201, and the sale not sold out.
    a = audits["engine"]
    for name in STOCK_PHASES:
        phase = raw[name]
        if phase["non_2xx"]:
            violations.append(f"{name}: {phase['non_2xx']} answers while stock lasted were not 201")
    # The fsync phase and the profiled run placed orders in the same sale.
    runs = [
        *(phases[name] for name in STOCK_PHASES),
        *([figures["profiled"]] if "profiled" in figures else []),
    ]
    answered = sum(run.requests - run.summary()["non_2xx"] for run in runs)
    # wrk stops mid-flight: up to one request per connection per slice can have been taken
    # without its answer being counted, never the other way round.
    in_flight = options.connections * sum(len(run.slices) for run in runs)
    if not answered <= a.orders_in_redis <= answered + in_flight:
        violations.append(f"engine: {answered} answered 201 but {a.orders_in_redis} orders exist")
    if a.available == 0:
        violations.append("engine: the sale sold out during the phase; give it more --stock")
    if sold_out["non_2xx"] != sold_out["requests"]:
        violations.append("sold out: some requests were accepted after the sale sold out")
    base = figures["baseline_counts"]
    if base["stock"] + base["ordered"] != base["initial_stock"]:
        violations.append(
            f"baseline: stock {base['stock']} + ordered {base['ordered']} "
            f"!= initial {base['initial_stock']}"
        )
    report: dict[str, Any] = {
        "command": "flashsale bench" + (" --smoke" if options.smoke else ""),
        "settings": {
            "connections": options.connections,
            "wrk_threads": options.threads,
            "duration_s": options.duration_s,
            "stock": options.phase_stock,
            "shoppers": options.shoppers,
            "per_user_limit": options.per_user_limit,
            "schedule": "round robin: each round runs 1 s of every phase, in "
            + ", ".join(PHASE_ORDER),
            "server_workers": options.server_workers,
            "appendfsync": options.appendfsync,
            "sold_out_refresh_ms": settings.sold_out_refresh_ms,
            "redis_pool_size": settings.redis_pool_size,
            "drain_batch": settings.drain_batch,
            "sales": ids,
        },
        "ratios": {
            "engine_to_ceiling": _ratio(engine["throughput_rps"], ceiling["throughput_rps"]),
            "soldout_to_ceiling": _ratio(sold_out["throughput_rps"], ceiling["throughput_rps"]),
            "engine_to_baseline": _ratio(engine["throughput_rps"], baseline["throughput_rps"]),
            "engine_p99_to_ceiling_p99": _ratio(
                engine["latency_ms"]["p99"], ceiling["latency_ms"]["p99"]
            ),
            "engine_p99_to_baseline_p99": _ratio(
                engine["latency_ms"]["p99"], baseline["latency_ms"]["p99"]
            ),
            "engine_fsync_to_engine": _ratio(fsync["throughput_rps"], engine["throughput_rps"]),
            "engine_metered_to_unmetered": _ratio(
                raw[METERED]["throughput_rps"], raw[UNMETERED]["throughput_rps"]
            ),
            "engine_fsync_to_baseline": _ratio(fsync["throughput_rps"], baseline["throughput_rps"]),
        },
        "persistence": {
            "ledger_complete_s": figures["ledger_complete_s"],
            "ledger_complete_mean_s": figures["ledger_complete_mean_s"],
            "drain_orders_per_s": figures["drain"]["drain_orders_per_s"],
            "drain": figures["drain"],
        },
        "invariants": {
            "ok": not violations,
            "violations": violations,
            "engine_orders_answered_201": answered,
            "sales": {name: _audit_json(audit) for name, audit in audits.items()},
            "baseline": base,
        },
        "phases": raw,
        "profile": figures.get("profile"),
    }
    return report


def run_bench(options: BenchOptions) -> int:
    localservices.ensure_installed()
    report = asyncio.run(_bench(options))
    print(write_report(report, options.out))
    return 0 if report["invariants"]["ok"] else 1
