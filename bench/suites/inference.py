"""Inference variants side by side on one checkpoint and the same inputs: speed, memory and quality together.

Every variant runs behind the serving `Backend` protocol (`serve/backends`), so the numbers are those of the code
that serves. Metrics per variant: prefill tokens/s (batch 8 x 256), decode ms/token (batch 1) and tokens/s
(batch 8) with the KV cache as the server decodes (a slot per request, `measure_decode`), peak memory, model file
size, validation perplexity and its change against the baseline (PyTorch eager fp32), top-1 agreement with the
baseline.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from common.cli import flush_denormals
from common.timing import Timing, measure

from ..harness import Results, peak_rss_mib, reset_peak_rss, rss_mib
from . import variants as V
from .common import Context

SUITE = "inference"
BASELINE = "torch eager fp32"


@dataclass
class Shapes:
    prefill_batch: int
    prefill_len: int
    decode_prompt: int
    decode_steps: int
    eval_windows: int
    repeats: int


FULL = Shapes(prefill_batch=8, prefill_len=256, decode_prompt=32, decode_steps=32, eval_windows=16, repeats=5)
QUICK = Shapes(prefill_batch=2, prefill_len=32, decode_prompt=8, decode_steps=8, eval_windows=4, repeats=2)


def full_forward(backend, ids: torch.Tensor) -> torch.Tensor:
    mask = torch.ones_like(ids)
    pos = torch.arange(ids.shape[1]).expand_as(ids)
    return backend.forward(ids, mask, pos, None)[0]


def quality(backend, windows: list[tuple[torch.Tensor, torch.Tensor]], batch: int = 8):
    """(mean next-token loss in nats, top-1 predictions) over the validation windows."""
    nll, count, top1 = 0.0, 0, []
    for i in range(0, len(windows), batch):
        x = torch.stack([w[0] for w in windows[i : i + batch]])
        y = torch.stack([w[1] for w in windows[i : i + batch]])
        logits = full_forward(backend, x).float()
        nll += torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
        count += y.numel()
        top1.append(logits.argmax(-1))
    return nll / count, torch.cat(top1)


def measure_decode(backend, prompt: torch.Tensor, steps: int, repeats: int) -> Timing:
    """Greedy decode the way serve's engine runs it: each row's prompt prefilled into its own slot of one cache, then
    one step over slots [0, B) at a time (in place on an ort export, on the concatenating `forward` elsewhere); times
    the decode steps only (fresh prefills before each repeat)."""
    times = []
    B, P = prompt.shape
    for r in range(repeats + 1):  # the first pass is warm-up
        cache = backend.new_cache(B, P + steps)
        cache.fit(P + steps, B, 0)
        logits = torch.stack([backend.prefill_slot(cache, b, prompt[b:b + 1]) for b in range(B)])
        t0 = time.perf_counter()
        for s in range(steps):
            token = logits.argmax(-1)
            logits = backend.decode_slots(cache, 0, B, token, torch.full((B,), P + s, dtype=torch.long))
        if r:
            times.append(time.perf_counter() - t0)
    return Timing.of(times)


def measure_variant(name: str, spec: V.Spec, ctx: Context, shapes: Shapes) -> Results:
    """Load one variant's backend and measure everything about it (runs inside the worker process)."""
    from model.data import eval_windows

    results = Results(device=ctx.device)
    cfg = ctx.config
    block = min(cfg.block_size, shapes.prefill_len)
    val = ctx.data.val
    windows = list(eval_windows(val, cfg.block_size, shapes.eval_windows))
    prefill_ids = torch.stack([val[i * block : (i + 1) * block] for i in range(shapes.prefill_batch)])
    prompts = {B: torch.stack([val[i * 97 : i * 97 + shapes.decode_prompt] for i in range(B)]) for B in (1, 4, 8)}
    base_rss = rss_mib()
    reset_peak_rss()
    backend = V.load_backend(spec, ctx.threads)
    extra = {"backend": backend.description, "note": spec.note}
    loss, top1 = quality(backend, windows)
    baseline_file = ctx.workdir / "baseline-quality.pt"
    if name == BASELINE:
        torch.save({"loss": loss, "top1": top1}, baseline_file)
    baseline = torch.load(baseline_file, weights_only=True) if baseline_file.exists() else None
    results.add(SUITE, "validation", name, "perplexity", math.exp(loss), "ppl", **extra)
    if baseline is not None:
        results.add(SUITE, "validation", name, "perplexity change", 100 * (math.exp(loss - baseline["loss"]) - 1),
                    "%", **extra)
        agree = 100 * (top1 == baseline["top1"]).float().mean().item()
        results.add(SUITE, "validation", name, "top-1 agreement", agree, "%", **extra)
    if (size := V.file_bytes(spec)) is not None:
        results.add(SUITE, "artifact", name, "file size", size / 2**20, "MiB", **extra)
    case = f"prefill b{shapes.prefill_batch}x{block}"
    t = measure(lambda: full_forward(backend, prefill_ids), warmup=1, repeats=shapes.repeats)
    results.add_timing(SUITE, case, name, "prefill tokens/s", t, prefill_ids.numel(), "tokens/s", **extra)
    for B in (1, 4, 8):
        d = measure_decode(backend, prompts[B], shapes.decode_steps, shapes.repeats)
        results.add_timing(SUITE, f"decode b{B}", name, "decode step", d, shapes.decode_steps, "ms/step",
                           batch=B, **extra)
        if B == 1:
            results.add_timing(SUITE, "decode b1", name, "decode latency", d, shapes.decode_steps, "ms/token", **extra)
        if B == 8:
            results.add_timing(SUITE, "decode b8", name, "decode tokens/s", d, 8 * shapes.decode_steps, "tokens/s",
                               **extra)
    results.add(SUITE, "memory", name, "peak memory", peak_rss_mib() - base_rss, "MiB", **extra)
    backend.close()
    return results


def run(ctx: Context, results: Results) -> None:
    """Prepare each variant's artifact here, then measure it in a fresh worker process."""
    ctx.workdir.mkdir(parents=True, exist_ok=True)
    (ctx.workdir / "baseline-quality.pt").unlink(missing_ok=True)
    for name, prepare in V.inference_variants(ctx).items():
        t0 = time.perf_counter()
        try:
            spec = prepare()
        except V.Unsupported as e:
            results.skip(SUITE, name, str(e))
            ctx.progress(f"not run: {name}: {e}")
            continue
        except Exception as e:  # noqa: BLE001 - a variant that breaks is reported, and the run goes on
            first_line = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            reason = f"failed to prepare: {type(e).__name__}: {first_line}"
            results.skip(SUITE, name, reason)
            ctx.progress(f"not run: {name}: {reason}")
            continue
        prepare_s = time.perf_counter() - t0
        rows, error = run_worker(name, spec, ctx)
        if error:
            results.skip(SUITE, name, error)
            ctx.progress(f"not run: {name}: {error}")
            continue
        for r in rows:
            r["prepare_s"] = round(prepare_s, 1)
        results.rows.extend(rows)
        get = {r["metric"]: r["value"] for r in rows}
        ctx.progress(f"{name}: prefill {get.get('prefill tokens/s', 0):,.0f} tok/s, "
                     f"decode {get.get('decode latency', 0):.2f} ms/token, ppl {get.get('perplexity', 0):.2f}")


def run_worker(name: str, spec: V.Spec, ctx: Context) -> tuple[list[dict], Optional[str]]:
    job = {"name": name, "spec": spec.to_dict(), "checkpoint": str(ctx.checkpoint), "quick": ctx.quick,
           "threads": ctx.threads, "workdir": str(ctx.workdir), "device": ctx.device}
    proc = subprocess.run([sys.executable, "-m", "bench.suites.inference"], input=json.dumps(job),
                          capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return [], f"worker failed: {last[:300]}"
    return json.loads(proc.stdout.strip().splitlines()[-1]), None


def worker_main() -> None:
    job = json.loads(sys.stdin.read())
    flush_denormals()  # as every hotpath command does (common.cli.run)
    torch.set_num_threads(job["threads"])
    ctx = Context(checkpoint=Path(job["checkpoint"]), quick=job["quick"], threads=job["threads"],
                  device=job["device"], workdir=Path(job["workdir"]))
    results = measure_variant(job["name"], V.Spec(**job["spec"]), ctx, QUICK if ctx.quick else FULL)
    print(json.dumps(results.rows))


if __name__ == "__main__":
    worker_main()
