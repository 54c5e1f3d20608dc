"""One variant measured in a fresh process: `python -m bench.m124.worker` with a JSON job on stdin, one JSON line
of results on stdout.

Job: {"runner": module in bench.m124.runners, "options": {...}, "workload": Workload fields, "vocab_size": N}.
Result: {"load_s", "prefill_ms": [...], "decode_b1_ms": [...], "decode_b8_tok_s": [...] (empty when the engine has
no batch generation), "peak_rss_mib", "tokens": the b1 greedy tokens, "note"}.

This file and the runner it loads decide what the process imports: an ONNX Runtime runner imports no torch, so
its peak RSS is ONNX Runtime's alone.
"""
from __future__ import annotations

import importlib
import json
import sys
import time
from typing import Any, Callable, Protocol

from common.machine import peak_rss_mib

from .workload import Workload, inputs


class Engine(Protocol):
    note: str

    def generate(self, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        """Greedy: exactly `new_tokens` new ids per prompt (EOS does not stop it); raise NotImplementedError for a
        batch the engine cannot run."""
        ...


def _seconds(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def decode_rate(engine: Engine, prompts: list[list[int]], steps: int) -> float:
    """Seconds per decode step: generating `steps` tokens minus generating 1 (the prompt's prefill), / (steps-1)."""
    one = _seconds(lambda: engine.generate(prompts, 1))
    many = _seconds(lambda: engine.generate(prompts, steps))
    return max(many - one, 0.0) / (steps - 1)


def measure(engine: Engine, w: Workload, vocab_size: int) -> dict[str, Any]:
    x = inputs(vocab_size, w)
    out: dict[str, Any] = {"prefill_ms": [], "decode_b1_ms": [], "decode_b8_tok_s": []}
    tokens = engine.generate(x["b1"], w.decode_steps)[0]  # warm-up, and the tokens other engines are checked on
    engine.generate(x["prefill"], 1)
    try:
        engine.generate(x["batch"], 2)
        batched = True
    except NotImplementedError as e:
        out["batch_note"] = str(e)
        batched = False
    for _ in range(w.repeats):
        out["prefill_ms"].append(1e3 * _seconds(lambda: engine.generate(x["prefill"], 1)))
        out["decode_b1_ms"].append(1e3 * decode_rate(engine, x["b1"], w.decode_steps))
        if batched:
            step = decode_rate(engine, x["batch"], w.batch_steps)
            out["decode_b8_tok_s"].append(w.batch / step if step > 0 else float("nan"))
    out["tokens"] = [int(t) for t in tokens]
    return out


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    w = Workload(**job["workload"])
    runner = importlib.import_module(f"bench.m124.runners.{job['runner']}")
    t0 = time.perf_counter()
    engine = runner.load(job.get("options", {}), w.threads)
    result: dict[str, Any] = {"load_s": time.perf_counter() - t0, "note": getattr(engine, "note", "")}
    result.update(measure(engine, w, job["vocab_size"]))
    result["peak_rss_mib"] = peak_rss_mib()
    result["torch_imported"] = "torch" in sys.modules
    return result


def main() -> None:
    job = json.loads(sys.stdin.read())
    print(json.dumps(run_job(job)), flush=True)


if __name__ == "__main__":
    main()
