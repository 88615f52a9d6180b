"""The bench's report: ``report.json``, ``report.md``, ``throughput.png`` and the summary table,
plus the summary of a py-spy profile of the server under load."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

import orjson

from loadtests.cpumeter import MACHINE

__all__ = ["TARGETS", "profile_summary", "summary_table", "write_report"]

# (report path, comparison, bound, what it means): the targets the engine is held to, read off
# the report.
TARGETS: list[tuple[str, str, float, str]] = [
    ("ratios.engine_to_ceiling", ">=", 0.75, "orders while stock lasts vs the ceiling"),
    ("ratios.engine_p99_to_ceiling_p99", "<=", 2.0, "their p99 latency vs the ceiling's"),
    ("ratios.soldout_to_ceiling", ">=", 0.9, "answers after sell-out vs the ceiling"),
    ("ratios.engine_to_baseline", ">=", 5.0, "orders vs the Postgres baseline"),
    ("ratios.engine_p99_to_baseline_p99", "<=", 1 / 3, "p99 vs the baseline's p99"),
    # Like for like: both fsync every accepted order before answering.
    ("ratios.engine_fsync_to_baseline", ">=", 5.0, "orders, appendfsync always, vs baseline"),
    # Counting every request for /metrics (on by default) against the same engine with it off,
    # each in a server that serves nothing else.
    ("ratios.engine_metered_to_unmetered", ">=", 0.97, "orders, metrics on vs off"),
    ("persistence.ledger_complete_s", "<=", 2.0, "last order to ledger complete, s"),
    ("persistence.drain_orders_per_s", ">=", 20_000, "outbox drain rate, orders/s"),
]

PHASE_TITLES = {
    "ceiling": "ceiling (Starlette, no store)",
    "engine": "engine, while stock lasts",
    "engine_metered": "engine, own server, metrics on",
    "engine_unmetered": "engine, own server, metrics off",
    "engine_fsync": "engine, appendfsync always",
    "sold_out": "engine, after sell-out",
    "baseline": "baseline (Postgres UPDATE)",
}

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^:()]*)(?::\d+)?\)$")


def _frame_name(frame: str) -> str:
    """``func (path/to/module.py:12)`` -> ``func (module.py)``: lines of one function merge."""
    match = _FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    return f"{match['func']} ({Path(match['file']).name})"


def profile_summary(raw: Path, top: int = 15) -> dict[str, Any]:
    """Self and inclusive shares of py-spy ``--format raw`` samples (idle time is not sampled,
    so the shares are of the server's busy CPU)."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame_name(f) for f in stack.split(";") if not f.startswith("process ")]
        if not frames:
            continue
        total += count
        own[frames[-1]] += count
        for name in set(frames):
            inclusive[name] += count
    if not total:
        return {"samples": 0, "self": [], "inclusive": []}

    def share(counter: Counter[str], limit: float) -> list[dict[str, Any]]:
        rows = [(n, c) for n, c in counter.most_common() if c / total <= limit]
        return [{"function": n, "percent": round(100 * c / total, 1)} for n, c in rows[:top]]

    # The frames around everything (uvicorn's run, the event loop) share the largest count;
    # they say nothing, so the inclusive list starts below them.
    roots = max(inclusive.values())
    inner: Counter[str] = Counter({n: c for n, c in inclusive.items() if c < roots})
    return {"samples": total, "self": share(own, 1.0), "inclusive": share(inner, 1.0)}


def _get(report: dict[str, Any], dotted: str) -> float:
    value: Any = report
    for part in dotted.split("."):
        value = value[part]
    return float(value)


def _holds(value: float, comparison: str, bound: float) -> bool:
    return value >= bound if comparison == ">=" else value <= bound


def _bound(bound: float) -> str:
    return "1/3" if abs(bound - 1 / 3) < 1e-9 else f"{bound:g}"


def summary_table(report: dict[str, Any]) -> str:
    lines = [
        f"{'phase':<32} {'req/s':>9} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} "
        f"{'max ms':>8} {'non-2xx':>8}",
    ]
    for name, title in PHASE_TITLES.items():
        p = report["phases"][name]
        lat = p["latency_ms"]
        lines.append(
            f"{title:<32} {p['throughput_rps']:>9,.0f} {lat['p50']:>8.2f} {lat['p95']:>8.2f} "
            f"{lat['p99']:>8.2f} {lat['max']:>8.1f} {p['non_2xx']:>8}"
        )
    lines.append("")
    for path, comparison, bound, meaning in TARGETS:
        value = _get(report, path)
        verdict = "ok" if _holds(value, comparison, bound) else "MISSED"
        lines.append(
            f"{path:<36} {value:>10,.3f}  target {comparison} {_bound(bound):<6} "
            f"{verdict:<6} {meaning}"
        )
    inv = report["invariants"]
    lines.append("")
    lines.append(
        "invariants: ok" if inv["ok"] else "invariants: VIOLATED " + "; ".join(inv["violations"])
    )
    return "\n".join(lines)


def _cpu_table(report: dict[str, Any]) -> list[str]:
    """CPU microseconds per request in each process, by phase, and cores busy."""
    phases = {name: report["phases"][name].get("cpu") for name in PHASE_TITLES}
    if not all(phases.values()):
        return []
    processes = list(next(iter(phases.values()))["us_per_request"])
    md = [
        "",
        "## Where each phase's CPU goes (µs of CPU per request, from /proc)",
        "",
        "| process | " + " | ".join(PHASE_TITLES.values()) + " |",
        "| --- |" + " ---: |" * len(PHASE_TITLES),
    ]
    for process in processes:
        cells = [phases[name]["us_per_request"].get(process) for name in PHASE_TITLES]
        md.append(f"| {process} | " + " | ".join(f"{c:,.0f}" for c in cells) + " |")
    md.append(
        "| cores busy (machine) | "
        + " | ".join(f"{phases[name]['cores'].get(MACHINE, 0):.2f}" for name in PHASE_TITLES)
        + " |"
    )
    return md


def _markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    md = [
        "# flashsale bench",
        "",
        f"`{report['command']}`: {s['connections']} connections ({s['wrk_threads']} wrk threads),"
        f" {s['duration_s']} s per phase, {s['server_workers']} uvicorn process(es), Redis "
        f"`appendfsync {s['appendfsync']}`, {s['shoppers']:,} shoppers, stock "
        f"{s['stock']:,}, limit {s['per_user_limit']} per shopper.",
        "",
        "| phase | req/s | p50 ms | p95 ms | p99 ms | max ms | non-2xx |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, title in PHASE_TITLES.items():
        p = report["phases"][name]
        lat = p["latency_ms"]
        md.append(
            f"| {title} | {p['throughput_rps']:,.0f} | {lat['p50']:.2f} | {lat['p95']:.2f}"
            f" | {lat['p99']:.2f} | {lat['max']:.1f} | {p['non_2xx']:,} |"
        )
    md += ["", "| target | value | bound | holds |", "| --- | ---: | ---: | --- |"]
    for path, comparison, bound, meaning in TARGETS:
        value = _get(report, path)
        held = "yes" if _holds(value, comparison, bound) else "**no**"
        md.append(
            f"| {meaning} (`{path}`) | {value:,.3f} | {comparison} {_bound(bound)} | {held} |"
        )
    drain = report["persistence"]["drain"]
    inv = report["invariants"]
    md += [
        "",
        f"Drain: {drain['orders']:,} orders piled up with the worker stopped, drained in "
        f"{drain['drain_s']} s ({drain['worker_start_to_empty_s']} s including the worker's "
        "start-up).",
        "",
        "Invariants: "
        + ("**ok**" if inv["ok"] else "**VIOLATED**: " + "; ".join(inv["violations"])),
        "",
        "| sale | initial | available | held | sold | orders in Redis | in ledger | max/user |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, a in inv["sales"].items():
        md.append(
            f"| {name} | {a['initial']:,} | {a['available']:,} | {a['held']:,} | "
            f"{a['sold']:,} | {a['orders_in_redis']:,} | {a['orders_in_ledger']:,} | "
            f"{a['max_units_per_user']} |"
        )
    md += _cpu_table(report)
    profile = report.get("profile")
    if profile and profile["samples"]:
        md += [
            "",
            f"## Where the server's CPU goes ({profile['samples']:,} py-spy samples)",
            "",
            "| self % | function | | inclusive % | function |",
            "| ---: | --- | --- | ---: | --- |",
        ]
        for own, inc in zip(profile["self"], profile["inclusive"], strict=False):
            md.append(
                f"| {own['percent']} | `{own['function']}` | | {inc['percent']} | "
                f"`{inc['function']}` |"
            )
    md += ["", "![throughput and latency over time](throughput.png)", ""]
    return "\n".join(md)


def _plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    for name, title in PHASE_TITLES.items():
        slices = report["phases"][name]["slices"]
        t = [s["started_s"] + s["duration_s"] / 2 for s in slices]
        top.plot(t, [s["rps"] for s in slices], marker="o", label=title)
        (line,) = bottom.plot(t, [s["p99_ms"] for s in slices], marker="o", label=f"{title} p99")
        bottom.plot(t, [s["p50_ms"] for s in slices], linestyle="--", color=line.get_color())
    top.set_ylabel("requests / s")
    top.set_title("POST /v1/sales/{id}/orders, per 1-second wrk slice")
    top.legend(fontsize=8)
    top.grid(alpha=0.3)
    bottom.set_ylabel("latency ms (solid p99, dashed p50)")
    bottom.set_yscale("log")
    bottom.set_xlabel("seconds into the phase")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(report: dict[str, Any], out: Path) -> str:
    """Write report.json, report.md and throughput.png to ``out``; return the summary table."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_bytes(
        orjson.dumps(report, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY)
    )
    (out / "report.md").write_text(_markdown(report))
    _plot(report, out / "throughput.png")
    return summary_table(report)
