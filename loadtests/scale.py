"""``python -m loadtests.scale``: what the background half of the engine costs as a sale grows.

The worker (``flashsale worker``, a real process) is measured, not the order path: orders go
straight to the reserve script, in calls of ``BATCH`` orders as a busy server's coalescer sends
them, and the HTTP front door is not in the loop. It starts its own Redis and Postgres in
``--dir`` (which it owns and empties), creates one sale whose holds last an hour, then:

1. **fill**: places ``--holds`` one-unit holds as fast as Redis takes them and reads the worker's
   RSS and Redis's memory once the ledger has the first half and every job has run since, and
   again for all of them: the slope per hold, extrapolated to a million holds;
2. **idle**: nothing new for ``--idle-s``, every hold still live: the worker's CPU and RSS;
3. **soak**: ``--rate`` orders/s for ``--soak-s``, paced per 100 ms tick, sampling every second
   the worker's CPU and RSS and the ledger's lag: orders placed but not yet in Postgres (and
   that over the rate, in seconds), and the age of the oldest outbox entry not yet written;
4. stops the worker, drains what is left, and checks the sale (``engine.invariants.audit_sale``).

The figures go to stdout and ``--out`` (JSON); exit 1 only when an invariant is violated.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import secrets
import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import asyncpg
from redis.asyncio import Redis

from engine.db import connect_postgres, connect_redis, empty_tables, migrate
from engine.errors import ProblemError
from engine.invariants import audit_sale, outbox_backlog
from engine.inventory import reserve_many
from engine.keys import WORKER_HEARTBEATS, sale_keys
from engine.ledger import count_orders
from engine.sales import create_sale
from engine.scripts import load_scripts
from engine.settings import Settings
from loadtests.bench import bench_sale
from loadtests.cpumeter import children_of, processes_s
from loadtests.scalereport import Sample, per_hold, print_report, soak_figures
from localrun import servers as localservices
from localrun.demo import start_process, stop_process
from workers.outbox import drain_sale
from workers.settings import WorkerSettings

__all__ = ["ScaleOptions", "Worker", "main", "run_scale"]

BATCH = 64  # orders per reserve call, as the front door's coalescer sends them under a storm
CALLS_IN_FLIGHT = 8  # enough to keep one Redis busy while this process builds the next calls
TICK_S = 0.1
SHOPPERS = 100_000
SETTLE_MAX_S = 75.0  # reconcile runs once a minute and takes seconds with 100,000 holds
LEDGER_TIMEOUT_S = 300.0
AUDIT_DRAIN_PASSES = 100


@dataclass
class ScaleOptions:
    dir: Path = Path(".flashsale/scale")
    out: Path = Path("scale-report/report.json")
    holds: int = 100_000
    idle_s: float = 30
    soak_s: float = 300
    rate: int = 1_000
    appendfsync: str = "everysec"
    jobs: str | None = None  # the worker's --jobs; None runs all, as `flashsale worker` does
    smoke: bool = False

    def __post_init__(self) -> None:
        if self.smoke:
            self.holds = min(self.holds, 2_000)
            self.idle_s = min(self.idle_s, 5)
            self.soak_s = min(self.soak_s, 10)

    @property
    def orders(self) -> int:
        return self.holds + math.ceil(self.rate * self.soak_s)

    @property
    def shoppers(self) -> int:
        return min(SHOPPERS, self.orders)

    @property
    def worker_jobs(self) -> list[str]:
        every = [job.name.removeprefix("cron:") for job in WorkerSettings.cron_jobs]
        return self.jobs.split(",") if self.jobs else every


class Worker:
    """``flashsale worker`` as a real process, started again whenever it exits, as a supervisor
    would (each exit is reported); its CPU and resident memory, children included, from /proc."""

    def __init__(self, settings: Settings, jobs: str | None, log: Path) -> None:
        self.settings, self.log = settings, log
        self.args = ["worker", *(["--jobs", jobs] if jobs else [])]
        self.born = time.monotonic()
        self.phase = "fill"
        self.exits: list[dict[str, Any]] = []
        self.start()

    def start(self) -> None:
        self.proc = start_process(self.args, self.settings, self.log)
        self.last = (time.monotonic(), 0.0)

    def check(self) -> None:
        if (status := self.proc.poll()) is not None:
            at = round(time.monotonic() - self.born, 1)
            self.exits.append({"phase": self.phase, "at_s": at, "status": status})
            print(f"  the worker exited with status {status} after {at} s: started again")
            self.start()

    def pids(self) -> list[int]:
        return [self.proc.pid, *children_of(self.proc.pid)]

    def cpu_pct(self) -> float:
        """Percent of one core since the previous call (since its start, for a new process)."""
        now, cpu = time.monotonic(), processes_s(self.pids())
        (then, before), self.last = self.last, (now, cpu)
        return 100 * max(0.0, cpu - before) / max(now - then, 1e-3)

    def rss_mb(self, field: str = "VmRSS") -> float:
        """Resident memory now, or at its peak so far with ``VmHWM``."""
        kib = 0
        for pid in self.pids():
            with contextlib.suppress(OSError):  # a child that just exited
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith(f"{field}:"):
                        kib += int(line.split()[1])
        return kib / 1024

    def stop(self) -> None:
        stop_process(self.proc)


class Placer:
    """One-unit orders from shoppers taken in turn, each with its own Idempotency-Key."""

    def __init__(self, redis: Redis, sale_id: str, shoppers: int) -> None:
        self.redis, self.sale_id, self.shoppers = redis, sale_id, shoppers
        self.issued = 0
        self.placed = 0
        self.refused: Counter[str] = Counter()

    async def place(self, count: int) -> None:
        first, self.issued = self.issued, self.issued + count
        gate = asyncio.Semaphore(CALLS_IN_FLIGHT)

        async def call(start: int) -> None:
            orders = [
                (f"shopper-{i % self.shoppers}", 1, f"scale-{i}")
                for i in range(start, min(start + BATCH, first + count))
            ]
            async with gate:
                outcomes = await reserve_many(self.redis, self.sale_id, orders)
            for outcome in outcomes:
                if isinstance(outcome, ProblemError):
                    self.refused[outcome.code] += 1
                else:
                    self.placed += 1

        await asyncio.gather(*(call(i) for i in range(first, first + count, BATCH)))


async def _sample(
    worker: Worker, placer: Placer, redis: Redis, db: asyncpg.Pool, t: float
) -> Sample:
    worker.check()
    counts = await count_orders(db, placer.sale_id)
    # The drain deletes an entry when it acknowledges it, after the commit: the first entry left
    # is the oldest change not yet in Postgres, and its id starts with Redis's clock in ms.
    first = await redis.xrange(sale_keys(placer.sale_id).outbox, "-", "+", count=1)
    oldest = time.time() - int(first[0][0].split("-")[0]) / 1000 if first else 0.0
    return Sample(
        t_s=round(t, 2),
        worker_cpu_pct=round(worker.cpu_pct(), 1),
        worker_rss_mb=round(worker.rss_mb(), 1),
        placed=placer.placed,
        in_ledger=sum(counts.values()),
        backlog_entries=await outbox_backlog(redis, placer.sale_id),
        oldest_unwritten_s=round(max(0.0, oldest), 3),
    )


async def _ledger(redis: Redis, sale_id: str, worker: Worker) -> float | None:
    """Seconds until the outbox is empty, keeping the worker alive; None after the timeout (the
    audit drains what is left itself)."""
    started = time.monotonic()
    while await outbox_backlog(redis, sale_id):
        worker.check()
        if time.monotonic() - started > LEDGER_TIMEOUT_S:
            return None
        await asyncio.sleep(0.05)
    return round(time.monotonic() - started, 2)


async def _settle(redis: Redis, worker: Worker, jobs: list[str]) -> float | None:
    """Seconds until every job has finished a run since now, so that memory is read once each
    has met every hold (reconcile runs once a minute); None after SETTLE_MAX_S. A run already
    under way now counts too: it may have missed the last holds of the fill."""
    since, started = time.time() * 1000, time.monotonic()
    while time.monotonic() - started < SETTLE_MAX_S:
        worker.check()
        finished = await redis.hmget(WORKER_HEARTBEATS, jobs)
        if all(ms is not None and int(ms) > since for ms in finished):
            return round(time.monotonic() - started, 1)
        await asyncio.sleep(0.5)
    return None


async def _fill(
    options: ScaleOptions, placer: Placer, worker: Worker, redis: Redis
) -> dict[str, Any]:
    points: list[dict[str, Any]] = []
    for target in (options.holds // 2, options.holds):
        started, count = time.monotonic(), target - placer.issued
        await placer.place(count)
        placing_s = time.monotonic() - started
        ledger_s = await _ledger(redis, placer.sale_id, worker)
        settle_s = await _settle(redis, worker, options.worker_jobs)
        rss, redis_mb = worker.rss_mb(), float((await redis.info("memory"))["used_memory"]) / 2**20
        points.append(
            {
                "holds": placer.placed,
                "orders_per_s": round(count / placing_s),
                "ledger_after_s": ledger_s,
                "every_job_ran_after_s": settle_s,
                "worker_rss_mb": round(rss, 1),
                "worker_peak_rss_mb": round(worker.rss_mb("VmHWM"), 1),
                "redis_mb": round(redis_mb, 1),
            }
        )
        print(
            f"  {placer.placed:>9,} holds: ledger {ledger_s} s after the last, every job "
            f"{settle_s} s later; worker RSS {rss:.1f} MB, Redis {redis_mb:.1f} MB",
            flush=True,
        )
    return {"points": points, **per_hold(points)}


async def _idle(options: ScaleOptions, worker: Worker) -> dict[str, Any]:
    worker.cpu_pct()
    cpu, rss = [], []
    for _ in range(math.ceil(options.idle_s)):
        await asyncio.sleep(1.0)
        worker.check()
        cpu.append(worker.cpu_pct())
        rss.append(worker.rss_mb())
    return {
        "worker_cpu_pct": round(statistics.fmean(cpu or [0.0]), 1),
        "worker_cpu_pct_max_1s": round(max(cpu or [0.0]), 1),
        "worker_rss_mb": round(statistics.fmean(rss or [worker.rss_mb()]), 1),
    }


async def _soak(
    options: ScaleOptions, placer: Placer, worker: Worker, redis: Redis, db: asyncpg.Pool
) -> tuple[list[Sample], float]:
    """Orders at the target rate, paced per tick; returns the per-second samples and the
    seconds the placing took (longer than --soak-s when the box could not keep up)."""
    samples: list[Sample] = []
    started = time.monotonic()
    issued_before = placer.issued

    async def sample_every_second() -> None:
        worker.cpu_pct()
        for second in range(1, 10**9):
            await asyncio.sleep(max(0.0, started + second - time.monotonic()))
            samples.append(await _sample(worker, placer, redis, db, time.monotonic() - started))

    sampler = asyncio.create_task(sample_every_second())
    try:
        tick = 0
        while (elapsed := time.monotonic() - started) < options.soak_s:
            # What is due by the end of this tick, less what was issued: a slow tick is made
            # up by the next ones, so the rate holds on average while the box keeps up.
            due = round(options.rate * min(elapsed + TICK_S, options.soak_s))
            if (count := due - (placer.issued - issued_before)) > 0:
                await placer.place(count)
            tick += 1
            await asyncio.sleep(max(0.0, started + tick * TICK_S - time.monotonic()))
        placing_s = time.monotonic() - started
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
    return samples, placing_s


async def _scale(options: ScaleOptions) -> dict[str, Any]:
    urls = localservices.up(options.dir, appendfsync=options.appendfsync)
    settings = Settings(
        environment="development",
        redis_url=urls["redis_url"],
        database_url=urls["postgres_dsn"],
        jwt_secret=secrets.token_urlsafe(32),  # no token is minted: orders skip the front door
        hold_seconds=3600,
    )
    await migrate(settings.database_url)
    redis = connect_redis(settings, pool_size=2 * CALLS_IN_FLIGHT)
    db = await connect_postgres(settings, min_size=1, max_size=2)
    (options.dir / "logs").mkdir(parents=True, exist_ok=True)
    sale_id = f"scale-{time.strftime('%H%M%S')}"
    limit = math.ceil(options.orders / options.shoppers)
    worker = None
    report: dict[str, Any] = {
        "settings": {
            **asdict(options),
            "worker_jobs": options.worker_jobs,
            "orders_per_reserve_call": BATCH,
            "shoppers": options.shoppers,
            "per_user_limit": limit,
            "front_door": "not in the loop: orders go straight to the reserve script",
        }
    }
    try:
        # The program owns its --dir: an earlier run's orders would only slow this one, and its
        # worker log would be read as this run's.
        (options.dir / "logs" / "worker.log").unlink(missing_ok=True)
        await redis.flushdb()
        await empty_tables(db)
        await load_scripts(redis)
        await create_sale(db, redis, bench_sale(sale_id, options.orders, limit))
        worker = Worker(settings, options.jobs, options.dir / "logs" / "worker.log")
        placer = Placer(redis, sale_id, options.shoppers)
        print(f"worker jobs: {', '.join(options.worker_jobs)}")
        print(f"fill: {options.holds:,} holds in reserve calls of {BATCH}", flush=True)
        report["holds"] = await _fill(options, placer, worker, redis)
        print(f"idle: {options.idle_s:g} s with {placer.placed:,} live holds", flush=True)
        worker.phase = "idle"
        report["idle"] = await _idle(options, worker)
        print(f"soak: {options.rate:,} orders/s for {options.soak_s:g} s", flush=True)
        worker.phase, before = "soak", placer.placed
        samples, placing_s = await _soak(options, placer, worker, redis, db)
        report["soak"] = soak_figures(options.rate, samples, placing_s, placer.placed, before)
        report["soak"]["ledger_after_s"] = await _ledger(redis, sale_id, worker)
        report["soak"]["refused"] = dict(placer.refused)
        report["worker_exits"] = worker.exits
        report["samples"] = [{**asdict(s), "lag_orders": s.lag_orders} for s in samples]
        # The audit compares Redis with the ledger: nothing may change either meanwhile.
        worker.stop()
        for _ in range(AUDIT_DRAIN_PASSES):  # a stopped worker may leave entries pending
            if not await outbox_backlog(redis, sale_id):
                break
            await drain_sale(redis, db, sale_id, "scale-audit", settings.drain_batch, 0)
        audit = await audit_sale(redis, db, sale_id)
        report["invariants"] = {
            "ok": audit.ok,
            "violations": audit.violations,
            "orders_in_redis": audit.orders_in_redis,
            "orders_in_ledger": audit.orders_in_ledger,
            "states": audit.states,
        }
    finally:
        if worker is not None:
            worker.stop()
        await redis.aclose()
        await db.close()
        localservices.down(options.dir)
    return report


def run_scale(options: ScaleOptions) -> int:
    localservices.ensure_installed()
    report = asyncio.run(_scale(options))
    report["command"] = "python -m loadtests.scale" + (" --smoke" if options.smoke else "")
    print_report(report)
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"report: {options.out}")
    return 0 if report["invariants"]["ok"] else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.scale",
        description="The worker's CPU and memory and the ledger's lag with many live holds and "
        "under a steady order rate (orders go straight to Redis; the HTTP front door is not "
        "measured). Starts its own Redis and Postgres in --dir, which it empties.",
    )
    default = ScaleOptions()
    parser.add_argument("--dir", type=Path, default=default.dir, help="data dir")
    parser.add_argument("--out", type=Path, default=default.out, help="JSON report")
    parser.add_argument("--holds", type=int, default=default.holds, help="live holds")
    parser.add_argument("--idle-s", type=float, default=default.idle_s)
    parser.add_argument("--soak-s", type=float, default=default.soak_s)
    parser.add_argument("--rate", type=int, default=default.rate, help="orders/s in the soak")
    parser.add_argument(
        "--appendfsync", choices=localservices.APPENDFSYNC_MODES, default="everysec"
    )
    parser.add_argument("--jobs", help="the worker's --jobs (default: all of them)")
    parser.add_argument("--smoke", action="store_true", help="2,000 holds, 5 s idle, 10 s soak")
    options = ScaleOptions(**vars(parser.parse_args(argv)))
    if options.holds < 2 or options.rate < 1 or options.idle_s < 0 or options.soak_s <= 0:
        parser.error("--holds must be at least 2, --rate at least 1, --soak-s above 0")
    return run_scale(options)


if __name__ == "__main__":
    raise SystemExit(main())
