"""`python -m bench [--suite NAME] [--quick] [--out DIR]`: the project's main job.

Trains (or reuses) the benchmark checkpoint, runs every suite side by side, prints the tables, writes
`<out>/<date>-<host>.json` (one row per measurement) and regenerates `<out>/REPORT.md` with its plots.
"""
from __future__ import annotations

import os
import socket
import time
from datetime import datetime
from pathlib import Path

import torch

from common import cli
from common.files import write_json_atomic
from common.machine import machine_info

from .checkpoint import ensure_checkpoint
from .harness import Results
from .suites import SUITES
from .suites.common import Context


def build_parser():
    p = cli.parser("python -m bench", "Compare baseline and optimized variants: speed, memory and quality together.")
    p.add_argument("--suite", action="append", choices=sorted(SUITES), help="run only this suite (repeatable)")
    p.add_argument("--quick", action="store_true", help="a one-minute smoke run on the tiny model")
    p.add_argument("--out", default="bench/results", help="folder for the JSON, REPORT.md and plots")
    p.add_argument("--checkpoint", default=None, help="benchmark this checkpoint instead of the built-in one")
    cli.add_threads_arg(p, default=os.cpu_count(), help="threads for torch and ONNX Runtime")
    p.add_argument("--no-report", action="store_true", help="skip REPORT.md and plots")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)  # the same thread count for every variant
    out = Path(args.out)
    ckpt = Path(args.checkpoint) if args.checkpoint else ensure_checkpoint(args.quick)
    if args.checkpoint:
        cli.existing_file(ckpt, "checkpoint")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    workdir = Path("runs/bench") / ("artifacts-quick" if args.quick else "artifacts")
    ctx = Context(checkpoint=ckpt, quick=args.quick, threads=args.threads, device="cpu", workdir=workdir,
                  progress=lambda m: print(f"  {m}", flush=True))
    results = Results(device=ctx.device)
    started = time.perf_counter()
    for name in args.suite or list(SUITES):
        print(f"suite {name}", flush=True)
        SUITES[name](ctx, results)
    doc = {
        "machine": machine_info(args.threads),
        "checkpoint": {"path": str(ckpt), "config": ctx.config.to_dict(),
                       "trained_steps": ctx.meta.get("step"), "params": ctx.model.num_params()},
        "quick": args.quick,
        "gpu": device == "cuda",
        "elapsed_s": round(time.perf_counter() - started, 1),
        "rows": results.rows,
        "skipped": results.skipped,
    }
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y-%m-%d")
    path = out / f"{stamp}-{socket.gethostname()}{'-quick' if args.quick else ''}.json"
    write_json_atomic(path, doc)
    from .table import print_tables

    print_tables(results.rows, results.skipped)
    print(f"wrote {path} ({len(results.rows)} rows) in {doc['elapsed_s']:.0f} s")
    if not args.no_report:
        from .report import write_report

        report = write_report([path], out)
        print(f"wrote {report}")
    return 0
