"""Serving under load: a real server process on 127.0.0.1 per backend, driven by concurrent streaming clients.

Closed-loop clients (`serve.loadgen`) at 1, 8, 16 and 32 concurrent streams; throughput, time to first token and
inter-token latency p50/p99. Concurrency 1 is the same requests served one at a time: the ratio against it is what
continuous batching buys.
"""
from __future__ import annotations

from ..harness import Results
from .common import Context

SUITE = "serve"


def backends(ctx: Context) -> dict:
    def onnx(target: str):
        def artifact():
            from export.onnx_meta import read_metadata_props

            path = ctx.workdir / ("model.onnx" if target == "ort" else f"model.{target}.onnx")
            # the inference suite's export is reused; a file an older run left with another target is not
            if not path.exists() or read_metadata_props(path).get("hotpath.target", "generic") != target:
                from export.to_onnx import export_onnx

                ctx.workdir.mkdir(parents=True, exist_ok=True)
                export_onnx(ctx.checkpoint, path, validate=False, target=target)
            return path
        return artifact

    # onnxruntime: the ort target, served with its in-place KV cache; the generic graph (concatenated cache) beside
    # it shows what that buys under load
    return {"torch": lambda: ctx.checkpoint, "onnxruntime": onnx("ort"), "onnxruntime generic graph": onnx("generic")}


def run(ctx: Context, results: Results) -> None:
    from serve.loadgen import bench_serve

    levels = (1, 4) if ctx.quick else (1, 8, 16, 32)
    max_tokens = 8 if ctx.quick else 32
    for name, artifact in backends(ctx).items():
        try:
            model = artifact()
            rows = bench_serve(str(model), levels, serve_args=["--max-queue", "128"], max_tokens=max_tokens,
                               requests=4 if ctx.quick else 64)
        except Exception as e:  # noqa: BLE001 - reported, and the other backends still run
            results.skip(SUITE, name, f"{type(e).__name__}: {str(e).strip()[:300]}")
            ctx.progress(f"not run: serve {name}: {e}")
            continue
        single = rows[0]["tokens_per_s"]  # concurrency 1: the same requests one at a time
        for r in rows:
            c = r["concurrency"]
            extra = {"concurrency": c, "requests": r["requests"], "max_tokens": max_tokens}
            speedup = r["tokens_per_s"] / single if single else None
            results.add(SUITE, f"{c} clients", name, "throughput", r["tokens_per_s"], "tokens/s",
                        speedup_vs_one_at_a_time=speedup, **extra)
            for m in ("ttft", "itl", "e2e"):
                for q in ("p50", "p99"):
                    results.add(SUITE, f"{c} clients", name, f"{m} {q}", 1e3 * r[f"{m}_{q}_s"], "ms", **extra)
            results.add(SUITE, f"{c} clients", name, "errors", r["errors"], "requests", **extra)
            ctx.progress(f"serve {name} @{c}: {r['tokens_per_s']:.0f} tok/s ({speedup or 0:.1f}x one at a time), "
                         f"TTFT p99 {1e3 * r['ttft_p99_s']:.0f} ms, errors {r['errors']}")
