"""GPU suite: correctness of the compiled Triton kernels, then speed against PyTorch's own kernels.

    python -m bench.gpu_suite [--out FILE.json] [--quick] [--sections attention,...] [--budget-s 400] [--debug]

Needs a CUDA GPU; without one it prints `error: no CUDA GPU (...)` and exits 2. The suite is a list of sections
(`SECTIONS`), one module each in bench/gpu/; each section is a function `section(ctx: Context) -> None` that
appends JSON rows `{suite, case, variant, metric, value, unit, device, ...}` with `ctx.add(...)`. To add a section:
write its module and add one `("name", module.section)` entry to `SECTIONS`.

Timing is `triton.testing.do_bench` (median of the runs in a ~100 ms window after ~25 ms of warm-up; the 20th and
80th percentiles are kept as the spread). A whole-suite time budget (default 400 s, leaving room for the last
case's compiles under the 8 minutes allowed on one H200) makes late cases record a `skipped` row instead of running.
Benchmarks measure, they never fail on a time; the exit code is 1 only if a correctness check failed.
"""
from __future__ import annotations

import re
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from common import cli, machine
from common.files import write_json_atomic

from .gpu import adamw, attention, softmax, train_step
from .gpu.context import DEFAULT_BUDGET_S, SUITE, Context

RESULTS_DIR = Path("bench/results/gpu")  # where bench.report looks for GPU runs


def default_out(info: dict[str, Any]) -> Path:
    """bench/results/gpu/<date>-<gpu>.json, e.g. 2026-12-02-nvidia-h200.json."""
    gpu = re.sub(r"[^a-z0-9]+", "-", str(info.get("gpu") or "cuda").lower()).strip("-")
    return RESULTS_DIR / f"{str(info['date'])[:10]}-{gpu}.json"

SECTIONS: list[tuple[str, Callable[[Context], None]]] = [
    ("attention", attention.section),
    ("softmax", softmax.section),
    ("adamw", adamw.section),
    ("train_step", train_step.section),
]


def machine_info() -> dict[str, Any]:
    """common.machine's facts, plus `cpu_count`: the name this suite's JSON has always given the core count."""
    info = machine.machine_info()
    info["cpu_count"] = info["cores"]
    return info


def parse_sections(text: Optional[str]) -> list[tuple[str, Callable[[Context], None]]]:
    known = dict(SECTIONS)
    if not text:
        return list(SECTIONS)
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown section(s) {', '.join(unknown)} (choose from {', '.join(known)})")
    return [(n, known[n]) for n in names]


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = cli.parser("python -m bench.gpu_suite", __doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=None,
                   help=f"JSON results (default {RESULTS_DIR}/<date>-<gpu>.json)")
    p.add_argument("--quick", action="store_true", help="fewer shapes (a smoke run)")
    p.add_argument("--sections", default=None, help=f"comma-separated subset of: {', '.join(n for n, _ in SECTIONS)}")
    p.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="whole-suite time budget in seconds")
    args = p.parse_args(argv)
    try:
        sections = parse_sections(args.sections)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("error: no CUDA GPU (run this on a GPU machine)", file=sys.stderr)
        return 2
    info = machine_info()
    out = args.out or default_out(info)
    ctx = Context(device=info.get("gpu") or "cuda", quick=args.quick, budget_s=args.budget_s)
    print(f"gpu suite on {ctx.device}: sections {', '.join(n for n, _ in sections)}, budget {args.budget_s:.0f} s",
          flush=True)
    for name, section in sections:
        try:
            section(ctx)
        except Exception as e:  # noqa: BLE001 - keep the other sections' results
            ctx.failures += 1
            ctx.add(name, "section", "error", None, "", error=f"{type(e).__name__}: {e}")
            if args.debug:
                traceback.print_exc()
            else:
                print(f"section {name} failed: {type(e).__name__}: {e}", file=sys.stderr)
    elapsed = time.monotonic() - ctx.start
    write_json_atomic(out, {"suite": SUITE, "machine": info, "quick": args.quick, "elapsed_s": elapsed,
                                 "rows": ctx.rows})
    skipped = sum(1 for r in ctx.rows if r.get("skipped"))
    print(f"{len(ctx.rows)} rows ({skipped} skipped, {ctx.failures} failed checks) in {elapsed:.0f} s -> {out}")
    return 1 if ctx.failures else 0


if __name__ == "__main__":
    sys.exit(main())
