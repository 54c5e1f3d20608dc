"""Where an exported decoder's time goes, by op type, from ONNX Runtime's own profiler.

    python -m export.ort_profile model.onnx [--prefill 512] [--decode 32] [--batch 1] [--runs 3] [--threads 2]
                                            [--trace trace.json] [--json [PATH]]

Runs what generation runs, with :class:`export.onnx_runtime.OnnxDecoder`: a prefill of `--prefill` tokens (last
position's logits only) then `--decode` single-token steps after it, `--runs` times after one warm-up, with ONNX
Runtime's profiler on. Its trace is then read back and split by phase (each ``model_run`` event is one graph run, in
the order they were made). Per phase and op type: node count, milliseconds per run, share of the run's wall time,
and for the matmul-like ops the GFLOP/s reached (2 x output elements x the shared dimension, from the shapes the
trace records). What is left of the run's wall time after its kernels is ONNX Runtime's own time between them; what
the same call takes from Python on top of the run is OnnxDecoder's (inputs, IO binding, copying the logits out).
The trace (Chrome trace format: chrome://tracing or https://ui.perfetto.dev) is kept with `--trace`.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from common import cli
from common.files import atomic_path

from .onnx_runtime import OnnxDecoder

# ops whose cost is a matrix product of the first input (..., K) into the output (..., N): 2 x prod(out) x K flops
MATMUL_OPS = frozenset({"MatMul", "FusedMatMul", "Gemm", "MatMulInteger", "MatMulIntegerToFloat",
                        "DynamicQuantizeMatMul", "MatMulNBits", "QLinearMatMul"})


@dataclass
class OpStats:
    nodes: set[str] = field(default_factory=set)
    us: float = 0.0  # kernel time summed over the profiled runs
    flops: float = 0.0


@dataclass
class Phase:
    """The kernels of one phase (prefill or decode) over `runs` graph runs of `wall_us` in total."""
    name: str
    runs: int = 0
    wall_us: float = 0.0
    call_us: float = 0.0  # the same runs timed from Python, around the OnnxDecoder call
    ops: dict[str, OpStats] = field(default_factory=lambda: defaultdict(OpStats))

    def rows(self) -> list[dict[str, Any]]:
        """One row per op type, most time first: ms per run, share of the run's wall time, GFLOP/s where known."""
        rows = []
        for op, s in sorted(self.ops.items(), key=lambda kv: -kv[1].us):
            rows.append({"op": op, "nodes": len(s.nodes), "ms_per_run": s.us / self.runs / 1e3,
                         "share": s.us / self.wall_us, "gflops": s.flops / s.us / 1e3 if s.flops and s.us else None})
        return rows

    def summary(self) -> dict[str, Any]:
        kernels = sum(s.us for s in self.ops.values())
        mm_us = sum(s.us for op, s in self.ops.items() if op in MATMUL_OPS)
        mm_flops = sum(s.flops for op, s in self.ops.items() if op in MATMUL_OPS)
        return {"phase": self.name, "runs": self.runs, "ms_per_run": self.wall_us / self.runs / 1e3,
                "call_ms": self.call_us / self.runs / 1e3, "kernel_share": kernels / self.wall_us,
                "matmul_share": mm_us / self.wall_us,
                "matmul_gflops": mm_flops / mm_us / 1e3 if mm_us else None, "ops": self.rows()}


def _shape(entry: dict[str, list[int]]) -> list[int]:
    return next(iter(entry.values()))


def matmul_flops(args: dict[str, Any]) -> float:
    """2 x output elements x the shared dimension of a matmul-like node event's recorded shapes (0 if absent)."""
    ins, outs = args.get("input_type_shape") or [], args.get("output_type_shape") or []
    if not ins or not outs:
        return 0.0
    a, out = _shape(ins[0]), _shape(outs[0])
    return 2.0 * math.prod(out) * a[-1] if a and out else 0.0


def split_trace(events: list[dict[str, Any]], labels: list[Optional[str]],
                call_s: Optional[list[float]] = None) -> dict[str, Phase]:
    """The trace's node events grouped by the graph run they fall in, runs labelled in order by `labels` (None:
    a warm-up run, left out); `call_s`: each run's seconds as timed from Python, in the same order."""
    runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    if len(runs) != len(labels):
        raise ValueError(f"the trace has {len(runs)} graph runs, {len(labels)} were made")
    phases: dict[str, Phase] = {}
    bounds = []
    for i, (run, label) in enumerate(zip(runs, labels)):
        if label is None:
            continue
        phase = phases.setdefault(label, Phase(label))
        phase.runs += 1
        phase.wall_us += run["dur"]
        phase.call_us += 1e6 * call_s[i] if call_s else run["dur"]
        bounds.append((run["ts"], run["ts"] + run["dur"], phase))
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        run_phase = next((p for start, end, p in bounds if start <= e["ts"] <= end), None)
        if run_phase is None:
            continue
        op = e["args"].get("op_name", "?")
        stats = run_phase.ops[op]
        stats.nodes.add(e["name"])
        stats.us += e["dur"]
        if op in MATMUL_OPS:
            stats.flops += matmul_flops(e["args"])
    return phases


def profile(path: str | Path, *, prefill: int = 512, decode: int = 32, batch: int = 1, runs: int = 3,
            threads: Optional[int] = None, trace: Optional[Path] = None) -> dict[str, Any]:
    """Profile `runs` rounds (after one warm-up) of a `batch` x `prefill` prefill and `decode` steps after it;
    returns {model, target, threads, batch, prefill, decode, runs, phases: [summary per phase]} (see
    :meth:`Phase.summary`). `trace`: where to keep ONNX Runtime's trace (written whole, or not at all)."""
    if trace is not None and Path(trace).is_dir():
        raise cli.UserError(f"--trace {trace} is a folder: give the trace's file name "
                            f"(e.g. {Path(trace) / 'trace.json'})")
    with tempfile.TemporaryDirectory(prefix="hotpath-profile.") as tmp:
        dec = OnnxDecoder(path, threads=threads, profile_prefix=str(Path(tmp) / "ort"))
        if prefill + decode > dec.config.block_size:
            raise cli.UserError(f"--prefill {prefill} + --decode {decode} exceed the model context of "
                                f"{dec.config.block_size}")
        ids = np.random.default_rng(0).integers(0, dec.config.vocab_size, (batch, prefill + decode))
        labels: list[Optional[str]] = []
        call_s: list[float] = []
        for r in range(runs + 1):
            _round(dec, ids, prefill, decode, labels, call_s, warm_up=r == 0)
        trace_file = Path(dec.session.end_profiling())
        events = json.loads(trace_file.read_text())
        if trace is not None:
            with atomic_path(trace) as out:
                shutil.copyfile(trace_file, out)
    phases = split_trace(events, labels, call_s)
    return {"model": str(path), "target": dec.target, "threads": threads, "batch": batch, "prefill": prefill,
            "decode": decode, "runs": runs, "phases": [p.summary() for p in phases.values()]}


def _round(dec: OnnxDecoder, ids: np.ndarray, prefill: int, decode: int, labels: list[Optional[str]],
           call_s: list[float], *, warm_up: bool) -> None:
    """One prefill and `decode` steps, through the shared cache on an ort export, the concatenating past elsewhere;
    each graph run's phase appended to `labels` (None in the warm-up round) and its time from Python to `call_s`."""
    batch = ids.shape[0]
    prefill_label, decode_label = (None, None) if warm_up else ("prefill", "decode")

    def timed(label: Optional[str], call: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        out = call()
        call_s.append(time.perf_counter() - t0)
        labels.append(label)
        return out

    if dec.shared_cache:
        cache = dec.new_cache(batch, prefill + decode)
        # several rows at once: from an empty cache only
        timed(prefill_label, lambda: dec.step(cache, 0, ids[:, :prefill], np.zeros(batch)))
        for t in range(decode):
            timed(decode_label, lambda: dec.step(cache, 0, ids[:, prefill + t:prefill + t + 1],
                                                 np.full(batch, prefill + t)))
        return
    _, past = timed(prefill_label, lambda: dec.forward(ids[:, :prefill], logits_to_keep=1))
    for t in range(decode):
        _, past = timed(decode_label, lambda: dec.forward(ids[:, prefill + t:prefill + t + 1], past=past,
                                                          logits_to_keep=1))


def format_profile(r: dict[str, Any], top: int = 12) -> str:
    lines = [f"{Path(r['model']).name} ({r['target']} target), batch {r['batch']}, {r['prefill']}-token prefill, "
             f"{r['decode']} decode steps, {r['runs']} profiled rounds, threads {r['threads'] or 'ORT default'}"]
    for p in r["phases"]:
        gf = f", matmuls {p['matmul_gflops']:.1f} GFLOP/s" if p["matmul_gflops"] else ""
        lines += ["", f"{p['phase']}: {p['ms_per_run']:.2f} ms a graph run ({p['call_ms']:.2f} ms a call from Python); "
                      f"kernels {100 * p['kernel_share']:.0f}% of the run, matmul-like ops "
                      f"{100 * p['matmul_share']:.0f}%{gf}",
                  f"  {'op type':<28}{'nodes':>6}{'ms/run':>10}{'share':>8}{'GFLOP/s':>9}"]
        for row in p["ops"][:top]:
            gflops = f"{row['gflops']:.1f}" if row["gflops"] else "-"
            lines.append(f"  {row['op']:<28}{row['nodes']:>6}{row['ms_per_run']:>10.3f}"
                         f"{100 * row['share']:>7.1f}%{gflops:>9}")
        rest = p["ops"][top:]
        if rest:
            lines.append(f"  {len(rest)} more op types{'':<11}{sum(x['ms_per_run'] for x in rest):>10.3f}"
                         f"{100 * sum(x['share'] for x in rest):>7.1f}%")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser("python -m export.ort_profile",
                   "Profile an exported hotpath .onnx with ONNX Runtime's profiler: time by op type, prefill and "
                   "decode.")
    p.add_argument("model", help="a .onnx written by python -m export.to_onnx or python -m quantize")
    p.add_argument("--prefill", type=cli.positive_int, default=512, help="prompt tokens (default: 512)")
    p.add_argument("--decode", type=cli.non_negative_int, default=32,
                   help="decode steps after the prompt (default: 32)")
    p.add_argument("--batch", type=cli.positive_int, default=1, help="rows (default: 1)")
    p.add_argument("--runs", type=cli.positive_int, default=3, help="profiled rounds after a warm-up (default: 3)")
    p.add_argument("--top", type=cli.positive_int, default=12, help="op types listed per phase (default: 12)")
    p.add_argument("--trace", type=Path, default=None, help="keep ONNX Runtime's trace here (Chrome trace JSON)")
    cli.add_threads_arg(p, help="ONNX Runtime intra-op threads (default: one per core)")
    cli.add_json_arg(p)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    r = profile(args.model, prefill=args.prefill, decode=args.decode, batch=args.batch, runs=args.runs,
                threads=args.threads, trace=args.trace)
    cli.emit(args.json, r, lambda: format_profile(r, args.top))
    return 0


if __name__ == "__main__":
    cli.run(main)
