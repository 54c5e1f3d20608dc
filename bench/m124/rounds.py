"""Interleaved rounds: every variant in a fresh worker process, round after round (A B C, A B C, ...), so machine
noise falls on all alike and no variant's memory or thread pools reach another's numbers. A variant whose worker
fails is reported with the reason and not run again; the others go on."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from .workload import Workload


@dataclass
class Variant:
    name: str
    runner: str  # module in bench.m124.runners
    options: dict[str, Any] = field(default_factory=dict)
    python: str = sys.executable
    kind: str = "hotpath"  # "hotpath" | "peer"
    precision: str = "fp32"  # fp32 | fp16 | int8 | int4: which goal row it counts for
    file_mib: Optional[float] = None
    error: Optional[str] = None  # set when preparing it failed: reported, never run


def run_worker(v: Variant, w: Workload, vocab_size: int, timeout: float = 900) -> dict[str, Any]:
    """One fresh process measuring one variant; raises RuntimeError with the worker's last error line."""
    job = {"runner": v.runner, "options": v.options, "workload": w.to_dict(), "vocab_size": vocab_size}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([v.python, "-m", "bench.m124.worker"], input=json.dumps(job), capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"worker ran past {timeout:.0f} s") from e
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()] or ["no output"]
        raise RuntimeError(f"worker failed: {lines[-1][:300]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_s"] = round(time.perf_counter() - t0, 1)  # the whole process: start, imports, load, measure
    return result


def run_rounds(variants: list[Variant], w: Workload, vocab_size: int, rounds: int,
               progress: Callable[[str], None] = print) -> dict[str, list[dict[str, Any]]]:
    """{variant name: [one result per round]}; a failing variant's error goes into `variant.error`."""
    results: dict[str, list[dict[str, Any]]] = {v.name: [] for v in variants}
    for r in range(rounds):
        for v in variants:
            if v.error:
                continue
            try:
                res = run_worker(v, w, vocab_size)
            except RuntimeError as e:
                v.error = str(e)
                progress(f"round {r + 1}/{rounds} {v.name}: {v.error}")
                continue
            results[v.name].append(res)
            progress(f"round {r + 1}/{rounds} {v.name}: decode b1 {_med(res['decode_b1_ms']):.1f} ms/token, "
                     f"prefill {_med(res['prefill_ms']):.0f} ms, peak {res['peak_rss_mib']:.0f} MiB "
                     f"({res['wall_s']:.0f} s)")
    return results


def _med(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2] if xs else float("nan")
