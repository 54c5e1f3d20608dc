"""GPT-2 124M beside `small`: hotpath's torch eager fp32, ONNX Runtime fp32, int8, int4 and fp16 on a model of the
size people deploy (made locally, see bench.m124.model), each variant in a fresh process, in interleaved rounds.

Columns: decode b1 ms/token (128-token prompt), prefill 1x512 ms, decode b8 tokens/s, peak RSS MiB, file MiB;
quality stays with the trained `small` model (these weights are random). The quick run does the same on a tiny
GPT-2 through the same path. `python -m bench.peers` runs this workload through the CPU engines users would
otherwise pick.
"""
from __future__ import annotations

import time

from ..harness import Results
from ..m124.model import ensure_model
from ..m124.rounds import run_rounds
from ..m124.summary import summarize
from ..m124.variants import hotpath_variants
from ..m124.workload import FULL, QUICK
from .common import Context

SUITE = "gpt2-124m"
QUICK_VARIANTS = ("hotpath torch fp32", "hotpath ORT fp32", "hotpath int8-dynamic")  # both runners, one quantizer
ROUNDS = {True: 1, False: 2}  # interleaved rounds (quick: 1); each worker repeats every measurement
METRICS = (("decode_b1_ms", "decode b1", "decode latency", "ms/token"),
           ("prefill_ms", "prefill 1x512", "prefill latency", "ms"),
           ("decode_b8_tok_s", "decode b8", "decode tokens/s", "tokens/s"),
           ("peak_rss_mib", "memory", "peak memory", "MiB"))


def run(ctx: Context, results: Results) -> None:
    t0 = time.perf_counter()
    m = ensure_model(ctx.workdir.parent, ctx.quick, ctx.progress)
    variants = hotpath_variants(m, only=QUICK_VARIANTS if ctx.quick else ())
    ctx.progress(f"{m.recipe.name}: prepared in {time.perf_counter() - t0:.0f} s")
    w = QUICK if ctx.quick else FULL
    runs = run_rounds(variants, w, m.recipe.vocab_size, ROUNDS[ctx.quick], ctx.progress)
    for row in summarize(variants, runs):
        name = row["variant"]
        if row["error"]:
            results.skip(SUITE, name, row["error"])
            continue
        extra = {"model": m.recipe.name, "rounds": row["rounds"], "note": row["note"], "threads": w.threads}
        for key, case, metric, unit in METRICS:
            if s := row[key]:
                results.add(SUITE, case, name, metric, s["median"], unit, low=s["min"], high=s["max"],
                            repeats=s["n"], **extra)
        if row["file_mib"]:
            results.add(SUITE, "artifact", name, "file size", row["file_mib"], "MiB", **extra)
