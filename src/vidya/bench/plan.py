"""`vidya plan`: a measured sweep (`vidya bench sweep --json`) -> replicas and rupees.

The operating point is the highest concurrency level of the sweep below which every level, and
it, meets the latency targets with no failed request (a pod passes through every lower load). Its requests per second are what one replica serves while
holding the targets; the peak hour's requests per second (students x questions x the peak hour's
share of the day / 3,600) divided by that gives the replicas to rent. The autoscaler's target is
the operating point's concurrency: a pod with more requests running than that is past the
targets, so the HPA on `vidya:num_requests_running` adds one before it gets there.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import asdict, dataclass

DAYS_PER_MONTH = 30
DEFAULTS = dict(students_per_day=50_000, questions_per_student=5.0, peak_hour_share=0.2, p99_ttft=1.4,
                p99_e2e=None, replica_cost_per_month=40_000.0, api_price_per_million_tokens=50.0)


@dataclass(frozen=True, slots=True)
class Plan:
    feasible: bool
    operating_concurrency: int | None  # the chosen level; None when none meets the targets
    closest_concurrency: int  # the level nearest the targets (the chosen one when feasible)
    requests_per_s_per_replica: float
    output_tok_s_per_replica: float
    p99_ttft_s: float | None
    p99_e2e_s: float | None
    peak_requests_per_s: float
    students_per_day_per_replica: float
    replicas: int
    hpa_target_running_per_pod: int
    cost_per_month: float
    cost_per_student_per_month: float
    tokens_per_request: float
    tokens_per_month: float
    api_cost_per_month: float | None


def meets(level: dict, p99_ttft: float, p99_e2e: float | None) -> bool:
    if level["failed"] or not level["completed"] or not level["requests_s"] or level.get("ttft_p99_ms") is None:
        return False
    if level["ttft_p99_ms"] / 1e3 > p99_ttft:
        return False
    return p99_e2e is None or (level.get("e2e_p99_ms") is not None and level["e2e_p99_ms"] / 1e3 <= p99_e2e)


def miss(level: dict, p99_ttft: float, p99_e2e: float | None) -> float:
    """How far a level is from the targets, as the worst ratio of measured to target (inf: failures)."""
    if level["failed"] or not level["completed"] or level.get("ttft_p99_ms") is None:
        return math.inf
    ratios = [level["ttft_p99_ms"] / 1e3 / p99_ttft]
    if p99_e2e is not None and level.get("e2e_p99_ms") is not None:
        ratios.append(level["e2e_p99_ms"] / 1e3 / p99_e2e)
    return max(ratios)


def make_plan(sweep: dict, students_per_day: int, questions_per_student: float, peak_hour_share: float,
              p99_ttft: float, p99_e2e: float | None, replica_cost_per_month: float,
              api_price_per_million_tokens: float | None) -> Plan:
    levels = sorted(sweep["levels"], key=lambda r: r["concurrency"])
    if not levels:
        raise ValueError("the sweep has no levels; run vidya bench sweep again")
    ok = []  # the levels up to the first that misses: a pod passes through every lower load on its way
    for r in levels:
        if not meets(r, p99_ttft, p99_e2e):
            break
        ok.append(r)
    chosen = ok[-1] if ok else min(levels, key=lambda r: miss(r, p99_ttft, p99_e2e))
    rps = chosen["requests_s"]
    peak_rps = students_per_day * questions_per_student * peak_hour_share / 3600
    replicas = max(1, math.ceil(peak_rps / rps)) if rps > 0 else 0
    per_replica_students = rps * 3600 / (peak_hour_share * questions_per_student) if rps > 0 else 0.0
    cost = replicas * replica_cost_per_month
    tokens = (chosen.get("prompt_tokens_per_request") or 0) + (chosen.get("output_tokens_per_request") or 0)
    monthly_tokens = students_per_day * questions_per_student * DAYS_PER_MONTH * tokens
    api = monthly_tokens / 1e6 * api_price_per_million_tokens if api_price_per_million_tokens is not None else None
    ms = lambda k: None if chosen.get(k) is None else chosen[k] / 1e3  # noqa: E731
    return Plan(bool(ok), chosen["concurrency"] if ok else None, chosen["concurrency"], rps, chosen["output_tok_s"],
                ms("ttft_p99_ms"), ms("e2e_p99_ms"), peak_rps, per_replica_students, replicas, chosen["concurrency"],
                cost, cost / students_per_day, tokens, monthly_tokens, api)


def add_args(p: argparse.ArgumentParser) -> None:
    d = DEFAULTS
    p.add_argument("--sweep", required=True, help="a sweep JSON written by `vidya bench sweep --json`")
    p.add_argument("--students-per-day", type=int, default=d["students_per_day"],
                   help=f"students who use the tutor on a school day (default {d['students_per_day']:,})")
    p.add_argument("--questions-per-student", type=float, default=d["questions_per_student"],
                   help=f"questions each asks a day (default {d['questions_per_student']:g})")
    p.add_argument("--peak-hour-share", type=float, default=d["peak_hour_share"],
                   help=f"fraction of the day's questions asked in the busiest hour (default {d['peak_hour_share']:g}: "
                        "school hours, one period busier than the rest)")
    p.add_argument("--p99-ttft", type=float, default=d["p99_ttft"],
                   help=f"target p99 time to first token, seconds (default {d['p99_ttft']:g})")
    p.add_argument("--p99-e2e", type=float, default=None, help="target p99 time to the whole answer, seconds (default: none)")
    p.add_argument("--replica-cost-per-month", type=float, default=d["replica_cost_per_month"],
                   help=f"rupees a month for one replica's machine (default {d['replica_cost_per_month']:,.0f}: an A10 24 GB)")
    p.add_argument("--api-price-per-million-tokens", type=float, default=d["api_price_per_million_tokens"],
                   help=f"a hosted API's rupees per million tokens, prompt and answer together, to compare "
                        f"(default {d['api_price_per_million_tokens']:g})")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--plot", default=None, help="also draw latency and throughput against concurrency (PNG; needs matplotlib)")


def check_args(a) -> None:
    if a.students_per_day < 1:
        raise ValueError(f"--students-per-day must be at least 1, got {a.students_per_day}")
    if not 0 < a.peak_hour_share <= 1:  # (NaN fails this too)
        raise ValueError(f"--peak-hour-share must be in (0, 1], got {a.peak_hour_share:g}")
    for name in ("questions_per_student", "p99_ttft", "p99_e2e", "replica_cost_per_month",
                 "api_price_per_million_tokens"):
        v = getattr(a, name)
        if v is not None and not (math.isfinite(v) and v > 0):
            raise ValueError(f"--{name.replace('_', '-')} must be a positive number, got {v:g}")
    if a.plot:
        plot_path_ok(a.plot)


def plot_path_ok(path: str) -> None:
    """Refuse a chart path that cannot be written before anything is computed or printed."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"--plot {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"--plot {path}: cannot write into {folder}")
    if os.path.splitext(path)[1].lower() not in (".png", ".svg", ".pdf"):
        raise ValueError(f"--plot {path}: name a .png (or .svg, .pdf) file")


def read_sweep(path: str) -> dict:
    try:
        with open(path) as f:
            sweep = json.load(f)
        levels = sweep["levels"]
        for r in levels:
            for k in ("concurrency", "requests_s", "output_tok_s", "failed", "completed"):
                if not isinstance(r[k], (int, float)) or isinstance(r[k], bool) or not math.isfinite(r[k]) or r[k] < 0:
                    raise ValueError(f"level field {k!r} is {r[k]!r}, not a number >= 0")
            if not isinstance(r.get("ttft_p99_ms", 0), (int, float, type(None))):
                raise ValueError(f"level field 'ttft_p99_ms' is {r['ttft_p99_ms']!r}, not a number")
    except (OSError, ValueError, KeyError, TypeError) as e:
        why = (f"it has no field {e.args[0]!r}" if isinstance(e, KeyError)
               else "not a JSON object with a list of levels" if isinstance(e, TypeError)
               else getattr(e, "strerror", None) or str(e))
        raise ValueError(f"cannot read sweep {path}: {why}; write one with "
                         f"vidya bench sweep --base-url URL --json {path}") from None
    if levels and not any(r["completed"] for r in levels):
        first = next((e for r in levels for e in r.get("errors") or []), "no error recorded")
        raise ValueError(f"every request of sweep {path} failed, at every level (first error: {first}); "
                         "fix that and sweep again")
    return sweep


def rupees(x: float) -> str:
    return f"₹{x:,.0f}"


def print_plan(p: Plan, a, sweep: dict) -> None:
    print(f"plan from {a.sweep} ({sweep.get('model')} at {sweep.get('base_url')}, {len(sweep['levels'])} levels)")
    target = f"p99 TTFT <= {a.p99_ttft:g} s" + (f", p99 e2e <= {a.p99_e2e:g} s" if a.p99_e2e else "")
    if p.feasible:
        print(f"operating point: concurrency {p.operating_concurrency} per replica meets {target} "
              f"(measured p99 TTFT {p.p99_ttft_s:.2f} s" + (f", e2e {p.p99_e2e_s:.2f} s" if p.p99_e2e_s else "") + ")")
    else:
        print(f"NO level meets {target}; the closest is concurrency {p.closest_concurrency} (p99 TTFT "
              f"{p.p99_ttft_s if p.p99_ttft_s is not None else float('nan'):.2f} s). Faster hardware, a smaller "
              f"model or looser targets are needed; the figures below are for that level.")
    rows = [
        ("requests/s per replica", f"{p.requests_per_s_per_replica:.2f} ({p.output_tok_s_per_replica:,.0f} output tok/s)"),
        ("peak load", f"{p.peak_requests_per_s:.2f} requests/s ({a.students_per_day:,} students x "
                      f"{a.questions_per_student:g} questions x {a.peak_hour_share:g} in the peak hour)"),
        ("students a day per replica", f"{p.students_per_day_per_replica:,.0f}"),
        ("replicas at peak", f"{p.replicas}"),
        ("HPA target", f"vidya:num_requests_running = {p.hpa_target_running_per_pod} per pod"),
        ("cost a month", f"{rupees(p.cost_per_month)} ({p.replicas} x {rupees(a.replica_cost_per_month)})"),
        ("cost per student a month", f"₹{p.cost_per_student_per_month:,.2f}"),
    ]
    if p.api_cost_per_month is not None:
        rows.append(("hosted API, same tokens", f"{rupees(p.api_cost_per_month)} a month ({p.tokens_per_month / 1e6:,.0f}M "
                                                 f"tokens at {rupees(a.api_price_per_million_tokens)} per million)"))
    for k, v in rows:
        print(f"  {k:<28} {v}")


def plot(path: str, sweep: dict, p: Plan, a) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install matplotlib") from None
    levels = sorted(sweep["levels"], key=lambda r: r["concurrency"])
    xs = [r["concurrency"] for r in levels]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for key, label in (("ttft_p50_ms", "TTFT p50"), ("ttft_p90_ms", "TTFT p90"), ("ttft_p99_ms", "TTFT p99"),
                       ("e2e_p99_ms", "end to end p99")):
        ax.plot(xs, [None if r.get(key) is None else r[key] / 1e3 for r in levels], marker="o", label=label)
    ax.axhline(a.p99_ttft, color="red", linestyle="--", label=f"target p99 TTFT {a.p99_ttft:g} s")
    if p.operating_concurrency:
        ax.axvline(p.operating_concurrency, color="green", linestyle=":", label=f"operating point {p.operating_concurrency}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent requests per replica")
    ax.set_ylabel("latency (s)")
    ax2 = ax.twinx()
    ax2.plot(xs, [r["output_tok_s"] for r in levels], color="gray", marker="s", label="output tok/s")
    ax2.set_ylabel("output tokens/s")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=8, loc="upper left")
    ax.set_title(f"{sweep.get('model')}: latency and throughput against concurrency")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(a) -> int:
    check_args(a)
    sweep = read_sweep(a.sweep)
    p = make_plan(sweep, a.students_per_day, a.questions_per_student, a.peak_hour_share, a.p99_ttft, a.p99_e2e,
                  a.replica_cost_per_month, a.api_price_per_million_tokens)
    if a.json:
        json.dump(asdict(p), sys.stdout, indent=1)
        print()
    else:
        print_plan(p, a, sweep)
    if a.plot:
        plot(a.plot, sweep, p, a)
        print(f"chart written to {a.plot}", file=sys.stderr)
    return 0 if p.feasible else 3
