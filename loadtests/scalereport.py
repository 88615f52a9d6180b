"""The figures of ``python -m loadtests.scale``: per-second samples of the soak, the table of
30-second windows, quantiles, the per-hold memory slope, and the summary printed on stdout."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

__all__ = ["WINDOW_S", "Sample", "per_hold", "print_report", "quantiles", "soak_figures"]

WINDOW_S = 30  # one row of the soak table
MILLION = 1_000_000


@dataclass
class Sample:
    t_s: float
    worker_cpu_pct: float
    worker_rss_mb: float
    placed: int
    in_ledger: int
    backlog_entries: int
    oldest_unwritten_s: float

    @property
    def lag_orders(self) -> int:
        # The ledger can count an order whose reserve call has not returned here yet.
        return max(0, self.placed - self.in_ledger)


def per_hold(points: list[dict[str, Any]]) -> dict[str, float]:
    """Memory per live hold between two fill points, and extrapolated to a million holds."""
    low, high = points
    added = max(1, high["holds"] - low["holds"])
    figures = {}
    for what in ("worker_rss_mb", "redis_mb"):
        slope = (high[what] - low[what]) / added
        figures[f"{what.removesuffix('_mb')}_bytes_per_hold"] = round(slope * 2**20, 1)
        figures[f"{what}_at_1m_holds"] = round(high[what] + slope * (MILLION - high["holds"]), 1)
    return figures


def quantiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values) or [0.0]

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)], 3)

    return {"p50": at(0.5), "p99": at(0.99), "max": round(ordered[-1], 3)}


def _windows(samples: list[Sample], placed_before: int) -> list[dict[str, Any]]:
    rows, previous, start = [], placed_before, 0
    while part := [s for s in samples if start < s.t_s <= start + WINDOW_S]:
        rows.append(
            {
                "from_s": start,
                "to_s": round(part[-1].t_s),
                "orders_per_s": round((part[-1].placed - previous) / (part[-1].t_s - start)),
                "worker_cpu_pct": round(statistics.fmean(s.worker_cpu_pct for s in part), 1),
                "worker_rss_mb": part[-1].worker_rss_mb,
                "lag_orders_p50": quantiles([s.lag_orders for s in part])["p50"],
                "lag_orders_max": max(s.lag_orders for s in part),
                "oldest_unwritten_s_max": max(s.oldest_unwritten_s for s in part),
            }
        )
        previous, start = part[-1].placed, start + WINDOW_S
    return rows


def soak_figures(
    rate: int, samples: list[Sample], placing_s: float, placed: int, before: int
) -> dict[str, Any]:
    sustained = (placed - before) / placing_s
    lag = [float(s.lag_orders) for s in samples]
    minutes, rss = [s.t_s / 60 for s in samples], [s.worker_rss_mb for s in samples]
    slope = statistics.linear_regression(minutes, rss).slope if len(rss) > 1 else 0.0
    return {
        "seconds": round(placing_s, 1),
        "target_orders_per_s": rate,
        "sustained_orders_per_s": round(sustained, 1),
        "orders": placed - before,
        "worker_cpu_pct": round(statistics.fmean(s.worker_cpu_pct for s in samples), 1),
        "worker_cpu_pct_1s": quantiles([s.worker_cpu_pct for s in samples]),
        "worker_rss_mb_start": rss[0] if rss else None,
        "worker_rss_mb_end": rss[-1] if rss else None,
        "worker_rss_mb_per_min": round(slope, 2),
        "ledger_lag_orders": quantiles(lag),
        # Orders behind over the rate they arrive at: how long the ledger trails Redis.
        "ledger_lag_s": quantiles([n / sustained for n in lag]),
        "oldest_unwritten_s": quantiles([s.oldest_unwritten_s for s in samples]),
        "windows": _windows(samples, before),
    }


def print_report(report: dict[str, Any]) -> None:
    soak, idle, holds = report["soak"], report["idle"], report["holds"]
    print(
        f"\n{'seconds':>9} {'orders/s':>9} {'cpu %':>6} {'rss MB':>7} {'lag p50':>8} "
        f"{'lag max':>8} {'oldest s':>9}"
    )
    for w in soak["windows"]:
        print(
            f"{w['from_s']:>4}-{w['to_s']:<4} {w['orders_per_s']:>9,} {w['worker_cpu_pct']:>6.1f} "
            f"{w['worker_rss_mb']:>7.1f} {w['lag_orders_p50']:>8,.0f} {w['lag_orders_max']:>8,} "
            f"{w['oldest_unwritten_s_max']:>9.2f}"
        )
    lag, lag_s, exits = soak["ledger_lag_orders"], soak["ledger_lag_s"], report["worker_exits"]
    print(
        f"\nworker jobs: {', '.join(report['settings']['worker_jobs'])}; "
        f"worker exits (each started again): {len(exits)}\n"
        f"worker CPU, % of a core: idle {idle['worker_cpu_pct']} (max over 1 s "
        f"{idle['worker_cpu_pct_max_1s']}), soak {soak['worker_cpu_pct']}\n"
        f"worker RSS: idle {idle['worker_rss_mb']} MB; soak {soak['worker_rss_mb_start']} -> "
        f"{soak['worker_rss_mb_end']} MB, {soak['worker_rss_mb_per_min']} MB/min\n"
        f"per live hold: worker {holds['worker_rss_bytes_per_hold']} B, Redis "
        f"{holds['redis_bytes_per_hold']} B; at 1,000,000 holds: worker "
        f"{holds['worker_rss_mb_at_1m_holds']} MB, Redis {holds['redis_mb_at_1m_holds']} MB\n"
        f"ledger lag, orders: p50 {lag['p50']:,.0f} p99 {lag['p99']:,.0f} max {lag['max']:,.0f}; "
        f"seconds: p50 {lag_s['p50']} p99 {lag_s['p99']} max {lag_s['max']}; oldest unwritten "
        f"max {soak['oldest_unwritten_s']['max']} s; complete {soak['ledger_after_s']} s after "
        f"the last order\nrate: {soak['sustained_orders_per_s']:,} orders/s sustained of "
        f"{soak['target_orders_per_s']:,} asked"
        + (f"; refused {soak['refused']}" if soak["refused"] else "")
    )
    print("invariants: " + ("ok" if report["invariants"]["ok"] else "VIOLATED"))
    for violation in report["invariants"]["violations"]:
        print(f"  {violation}")
