"""Training step: reference (eager + torch AdamW) against hotpath's kernels (`patch()` + `FusedAdamW`).

On CPU the kernels run their PyTorch reference paths (Triton needs a GPU), so this compares the fallbacks and
says so; the GPU suite measures the compiled kernels.
"""
from __future__ import annotations

import copy

import torch

from common.timing import measure

from ..harness import Results
from .common import Context

SUITE = "train"


def variants(model):
    def ref():
        return model, torch.optim.AdamW(model.parameters(), lr=1e-4)

    def torch_fused():
        m = copy.deepcopy(model)
        return m, torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True)

    def hotpath():
        import kernels

        m = kernels.patch(copy.deepcopy(model))
        return m, kernels.FusedAdamW(m.parameters(), lr=1e-4)

    return {"eager+AdamW": ref, "eager+AdamW(fused=True)": torch_fused, "patch+FusedAdamW": hotpath}


def run(ctx: Context, results: Results) -> None:
    model = ctx.model_copy().train()
    B, T = (4, 64) if ctx.quick else (8, ctx.config.block_size)
    x = ctx.data.train[: B * T].view(B, T)
    y = ctx.data.train[1 : B * T + 1].view(B, T)
    case = f"step b{B}x{T}"
    for name, build in variants(model).items():
        try:
            m, opt = build()
        except Exception as e:  # noqa: BLE001 - e.g. kernels unavailable: listed as skipped
            results.skip(SUITE, name, f"{type(e).__name__}: {e}")
            continue
        note = "CPU: kernels run their PyTorch references" if name == "patch+FusedAdamW" and ctx.device == "cpu" else ""

        def step():
            loss = torch.nn.functional.cross_entropy(m(x).flatten(0, 1), y.flatten())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        t = measure(step, warmup=1 if ctx.quick else 2, repeats=3 if ctx.quick else 5)
        results.add_timing(SUITE, case, name, "step time", t, 1, "ms/step", note=note)
        results.add_timing(SUITE, case, name, "train tokens/s", t, B * T, "tokens/s", note=note)
        ctx.progress(f"train {name}: {1e3 * t.median:.0f} ms/step")
