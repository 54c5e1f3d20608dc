"""GPU suite: correctness of the compiled Triton kernels, then speed against PyTorch's own kernels.

    python -m bench.gpu_suite [--out FILE.json] [--quick] [--sections softmax,adamw,...] [--budget attention=300]

Needs a CUDA GPU; without one it prints `error: no CUDA GPU (...)` and exits 2. The suite is a list of sections
(`SECTIONS`, cheapest first), one module each in bench/gpu/ with two functions taking the run's Context:
`checks(ctx)` (correctness, always run in full) and `timings(ctx)` (benchmarks, cut by the section's budget). Both
append JSON rows `{suite, case, variant, metric, value, unit, device, ...}` with `ctx.add(...)`. To add a section:
write its module and add one `Section(...)` entry to `SECTIONS`.

Each section has its own wall-time budget (checks + warm-ups + timings; defaults in `SECTIONS`, summing to 425 s so
that every section, run one after the other, fits an 8-minute window on one H200 with room for each section's
last timing to overrun); `--budget NAME=SECONDS` overrides one. Once a section's budget is spent, its remaining
timings become `skipped` rows with the reason; its checks are never skipped. Each timed function is called once
before timing (`Context.warm`: compile and autotune); those seconds are the section's `compile_s`, outside the
timed region. Timing is `triton.testing.do_bench` (median of the runs in a ~100 ms window after ~25 ms of
warm-up; the 20th and 80th percentiles are kept as the spread).

One progress line per section goes to stderr; a summary table ends the run, and the JSON has a `sections` list
with the same figures. Benchmarks measure, they never fail on a time; the exit code is 1 only if a correctness
check failed or a section raised (recorded as failed; the other sections still run).
"""
from __future__ import annotations

import re
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from common import cli, machine
from common.files import write_json_atomic

from .gpu import adamw, attention, decode, softmax, train_step
from .gpu.context import BUDGET_SPENT, SUITE, Context

RESULTS_DIR = Path("bench/results/gpu")  # where bench.report looks for GPU runs


@dataclass(frozen=True)
class Section:
    name: str
    budget_s: float  # default wall-time budget (checks, warm-ups and timings)
    checks: Callable[[Context], None]
    timings: Callable[[Context], None]


# Cheapest first, so that a run of all of them reaches every section: softmax and AdamW compile a few small
# kernels; the training step compiles attention at D = 64; decode the decode path; attention ~75 configs.
SECTIONS: list[Section] = [
    Section("softmax", 60.0, softmax.checks, softmax.timings),
    Section("adamw", 45.0, adamw.checks, adamw.timings),
    Section("train_step", 60.0, train_step.checks, train_step.timings),
    Section("decode", 60.0, decode.checks, decode.timings),
    Section("attention", 200.0, attention.checks, attention.timings),
]


def default_out(info: dict[str, Any]) -> Path:
    """bench/results/gpu/<date>-<gpu>.json, e.g. 2026-12-02-nvidia-h200.json."""
    gpu = re.sub(r"[^a-z0-9]+", "-", str(info.get("gpu") or "cuda").lower()).strip("-")
    return RESULTS_DIR / f"{str(info['date'])[:10]}-{gpu}.json"


def machine_info() -> dict[str, Any]:
    """common.machine's facts, plus `cpu_count`: the name this suite's JSON has always given the core count."""
    info = machine.machine_info()
    info["cpu_count"] = info["cores"]
    return info


def _names() -> str:
    return ", ".join(s.name for s in SECTIONS)


def parse_sections(text: Optional[str]) -> list[Section]:
    """The sections named (comma-separated, in the order given, repeats dropped); all of them when empty."""
    if not text:
        return list(SECTIONS)
    known = {s.name: s for s in SECTIONS}
    names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ValueError(f"unknown section(s) {', '.join(unknown) or repr(text)} (choose from {_names()})")
    return [known[n] for n in names]


def parse_budgets(items: Optional[Sequence[str]]) -> dict[str, float]:
    """Every section's budget in seconds: the defaults, overridden by `NAME=SECONDS` items (each item may hold
    several, comma-separated)."""
    budgets = {s.name: s.budget_s for s in SECTIONS}
    for item in items or []:
        for part in (p.strip() for p in item.split(",")):
            if not part:
                continue
            name, sep, value = part.partition("=")
            name = name.strip()
            if not sep or name not in budgets:
                raise ValueError(f"bad --budget {part!r} (want NAME=SECONDS, NAME one of {_names()})")
            try:
                seconds = float(value)
            except ValueError:
                seconds = float("nan")
            if not seconds >= 0:  # also rejects NaN
                raise ValueError(f"bad --budget {part!r} (SECONDS must be a number >= 0)")
            budgets[name] = seconds
    return budgets


# ------------------------------------------------------------------------------------------------ the driver
def _is_timing(row: dict[str, Any]) -> bool:
    return str(row["metric"]).endswith("_ms") or row["metric"] == "copy_bandwidth"


def run_section(ctx: Context, section: Section, budget_s: float, debug: bool = False) -> dict[str, Any]:
    """Checks (always), then timings (until the budget is spent); an exception in either is a failed section whose
    other part still runs. Returns the section's summary and prints its progress line to stderr."""
    ctx.begin_section(section.name, budget_s)
    first_row, failures_before = len(ctx.rows), ctx.failures
    errors = []
    checks_s = 0.0
    for part, fn in (("checks", section.checks), ("timings", section.timings)):
        t0 = ctx.clock()
        try:
            fn(ctx)
        except Exception as e:  # noqa: BLE001 - keep this section's other part and the other sections
            ctx.failures += 1
            msg = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            errors.append(f"{part}: {msg}")
            ctx.add(section.name, "section", f"{part}_error", None, "", ok=False, error=msg)
            if debug:
                traceback.print_exc()
        if part == "checks":
            checks_s = ctx.clock() - t0
    rows = ctx.rows[first_row:]
    timings = [r for r in rows if _is_timing(r)]
    checks = [r for r in rows if "ok" in r and r["variant"] != "section"]  # incl. checks that raised
    summary = {
        "section": section.name,
        "status": "failed" if errors else ("checks failed" if ctx.failures > failures_before else "ok"),
        "budget_s": budget_s,
        "elapsed_s": ctx.elapsed(),
        "checks_s": checks_s,
        "compile_s": ctx.compile_s,
        "rows": len(rows),
        "checks": len(checks),
        "failed_checks": sum(1 for r in checks if not r["ok"]),
        "timed": sum(1 for r in timings if r["value"] is not None),
        "skipped_budget": sum(1 for r in timings if BUDGET_SPENT in str(r.get("skipped", ""))),
        "skipped_other": sum(1 for r in timings
                             if r.get("skipped") and BUDGET_SPENT not in str(r.get("skipped", ""))),
        "errors": errors,
    }
    print(progress_line(summary), file=sys.stderr, flush=True)
    return summary


def progress_line(s: dict[str, Any]) -> str:
    line = (f"[gpu suite] {s['section']}: {s['status']}, {s['elapsed_s']:.1f} s of {s['budget_s']:g} s budget "
            f"(checks {s['checks_s']:.1f} s, compile {s['compile_s']:.1f} s), {s['rows']} rows, "
            f"{s['timed']} timed, {s['skipped_budget']} skipped by budget")
    return line + (f"; {'; '.join(s['errors'])}" if s["errors"] else "")


def run_suite(ctx: Context, sections: Sequence[Section], budgets: dict[str, float],
              debug: bool = False) -> list[dict[str, Any]]:
    return [run_section(ctx, s, budgets.get(s.name, s.budget_s), debug) for s in sections]


def summary_table(summaries: Sequence[dict[str, Any]]) -> str:
    head = ("section", "status", "budget s", "elapsed s", "checks s", "compile s", "rows", "checks", "timed",
            "skipped (budget)", "skipped (other)")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summaries:
        cells = (s["section"], s["status"], f"{s['budget_s']:g}", f"{s['elapsed_s']:.1f}", f"{s['checks_s']:.1f}",
                 f"{s['compile_s']:.1f}", s["rows"], f"{s['checks'] - s['failed_checks']}/{s['checks']} ok",
                 s["timed"], s["skipped_budget"], s["skipped_other"])
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = cli.parser("python -m bench.gpu_suite", __doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=None,
                   help=f"JSON results (default {RESULTS_DIR}/<date>-<gpu>.json)")
    p.add_argument("--quick", action="store_true", help="fewer shapes (a smoke run)")
    p.add_argument("--sections", default=None,
                   help=f"comma-separated sections to run, in that order (default, cheapest first: {_names()})")
    p.add_argument("--budget", action="append", default=None, metavar="NAME=SECONDS",
                   help="a section's wall-time budget, repeatable (defaults: "
                        + ", ".join(f"{s.name}={s.budget_s:g}" for s in SECTIONS) + ")")
    args = p.parse_args(argv)
    try:
        sections = parse_sections(args.sections)
        budgets = parse_budgets(args.budget)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("error: no CUDA GPU (run this on a GPU machine)", file=sys.stderr)
        return 2
    info = machine_info()
    out = args.out or default_out(info)
    ctx = Context(device=info.get("gpu") or "cuda", quick=args.quick)
    plan = ", ".join(f"{s.name} {budgets[s.name]:g} s" for s in sections)
    print(f"gpu suite on {ctx.device}: {plan}", flush=True)
    summaries = run_suite(ctx, sections, budgets, args.debug)
    elapsed = ctx.clock() - ctx.start
    write_json_atomic(out, {"suite": SUITE, "machine": info, "quick": args.quick, "elapsed_s": elapsed,
                            "sections": summaries, "rows": ctx.rows})
    skipped = sum(1 for r in ctx.rows if r.get("skipped"))
    print(summary_table(summaries))
    print(f"{len(ctx.rows)} rows ({skipped} skipped, {ctx.failures} failed checks or sections) in {elapsed:.0f} s "
          f"-> {out}")
    return 1 if ctx.failures else 0


if __name__ == "__main__":
    sys.exit(main())
