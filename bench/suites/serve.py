"""Serving under load: a real server process on 127.0.0.1 per backend, driven by concurrent streaming clients.

Closed-loop clients (`serve.loadgen`) at 1, 8, 16 and 32 concurrent streams; throughput, time to first token and
inter-token latency p50/p99. Concurrency 1 is the same requests served one at a time: the ratio against it is what
continuous batching buys.
"""
from __future__ import annotations

from ..harness import Results
from ..server import running_server
from .common import Context

SUITE = "serve"


def backends(ctx: Context) -> dict:
    def onnx():
        path = ctx.workdir / "model.onnx"
        if not path.exists():
            from export.to_onnx import export_onnx

            ctx.workdir.mkdir(parents=True, exist_ok=True)
            export_onnx(ctx.checkpoint, path, validate=False)
        return path

    return {"torch": lambda: ctx.checkpoint, "onnxruntime": onnx}


def run(ctx: Context, results: Results) -> None:
    from serve.loadgen import DEFAULT_PROMPTS, run_load

    levels = (1, 4) if ctx.quick else (1, 8, 16, 32)
    max_tokens = 8 if ctx.quick else 32
    for name, artifact in backends(ctx).items():
        try:
            model = artifact()
        except Exception as e:  # reported, and the other backends still run
            results.skip(SUITE, name, f"no artifact: {type(e).__name__}: {e}")
            continue
        args = ["--max-batch-size", "32", "--max-queue", "128", "--threads", str(ctx.threads)]
        with running_server(model, *args) as (url, _):
            run_load(url, DEFAULT_PROMPTS[:2], 2, 4)  # warm-up
            single = None
            for c in levels:
                r = run_load(url, DEFAULT_PROMPTS, c, max_tokens, requests=max(16, 2 * c) if not ctx.quick else 4)
                case = f"{c} clients"
                single = single or r["tokens_per_s"]
                extra = {"concurrency": c, "requests": r["requests"], "max_tokens": max_tokens}
                results.add(SUITE, case, name, "throughput", r["tokens_per_s"], "tokens/s",
                            speedup_vs_sequential=r["tokens_per_s"] / single if single else None, **extra)
                for m in ("ttft", "itl", "e2e"):
                    for q in ("p50", "p99"):
                        results.add(SUITE, case, name, f"{m} {q}", 1e3 * r[f"{m}_{q}_s"], "ms", **extra)
                results.add(SUITE, case, name, "errors", r["errors"], "requests", **extra)
                ctx.progress(f"serve {name} @{c}: {r['tokens_per_s']:.0f} tok/s "
                             f"({r['tokens_per_s'] / single:.1f}x one at a time), "
                             f"TTFT p99 {1e3 * r['ttft_p99_s']:.0f} ms, errors {r['errors']}")
