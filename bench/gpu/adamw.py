"""AdamW section (kernels.FusedAdamW): correctness against torch.optim.AdamW, then one optimizer step over the
gpt2 preset's 124M fp32 parameters against torch's fused and foreach AdamW: ms, GB/s (28 B/param) and % of copy.

The headline row is FusedAdamW.step() captured in a CUDA graph and replayed (no host work per step): goal <= 1.0 ms
on an H200, floor ~0.81 ms (124.4M params x 28 B at 4.3 TB/s). If capture fails, the eager step is timed in its
place as variant `hotpath_triton_eager_fallback`, with the capture error recorded on the row."""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Optional, Sequence

import torch

from .bandwidth import bandwidth_rows, copy_row
from .checks import check_error, check_row, error_bound, print_verdict
from .context import Context, failure_reason, ratio_rows

ADAMW_BYTES_PER_PARAM = 28  # fp32: read g, m, v, w; write m, v, w (7 x 4 B)
HEADLINE = "hotpath_triton_cuda_graph"
EAGER_FALLBACK = "hotpath_triton_eager_fallback"  # the headline's variant when capture fails
ADAMW_VARIANTS = (HEADLINE, "hotpath_triton", "torch_fused", "torch_foreach")  # headline first
STEP_GOAL_MS = 1.0  # the goal for one step of 124M fp32 parameters on an H200
COPY_TBPS = 4.3  # an H200's copy bandwidth (bytes read + written), the issue's figure for the floor
CHECK_SHAPES = [(1,), (7,), (4095,), (4097,), (333, 77)]
CHECK_STEPS = 10


def adamw_bytes(n_params: int, bytes_per_param: int = ADAMW_BYTES_PER_PARAM) -> int:
    return n_params * bytes_per_param


def step_floor_ms(n_params: int) -> float:
    """The fastest a step can be: its bytes at the copy bandwidth (0.81 ms for 124.4M fp32 params)."""
    return adamw_bytes(n_params) / (COPY_TBPS * 1e12) * 1e3


def headline_fields(n_params: int) -> dict[str, Any]:
    floor = step_floor_ms(n_params)
    return dict(headline=True, goal_ms=STEP_GOAL_MS, floor_ms=round(floor, 3),
                notes=f"headline: one FusedAdamW.step() replayed from a CUDA graph; goal <= {STEP_GOAL_MS:g} ms "
                      f"on an H200; floor {floor:.2f} ms = {n_params / 1e6:.1f}M params x {ADAMW_BYTES_PER_PARAM} B "
                      f"(fp32 g, m, v, w read; m, v, w written) at {COPY_TBPS:g} TB/s")


def gpt2_param_shapes() -> list[torch.Size]:
    """Parameter shapes of the gpt2 preset (124M), built on the meta device (no memory, no init time)."""
    from model.gpt import GPT, GPTConfig

    with torch.device("meta"):
        model = GPT(GPTConfig.preset("gpt2"))
    return [p.shape for p in model.parameters()]


def _fp32_bound(params: Iterable[torch.Tensor]) -> float:
    return error_bound(torch.float32, max(p.abs().max().item() for p in params))


def _check_fp32(ctx: Context, case: str, seed: int, **kw: Any) -> None:
    """FusedAdamW and torch.optim.AdamW stepped on the same gradients; parameters compared."""
    from kernels import FusedAdamW

    dev = ctx.torch_device
    g = torch.Generator(device=dev).manual_seed(seed)
    ref = [torch.randn(*s, generator=g, device=dev).requires_grad_() for s in CHECK_SHAPES]
    mine = [p.detach().clone().requires_grad_() for p in ref]
    o_ref, o_mine = torch.optim.AdamW(ref, lr=1e-2, **kw), FusedAdamW(mine, lr=1e-2, **kw)
    for _ in range(CHECK_STEPS):
        for a, b in zip(ref, mine):
            a.grad = torch.randn(a.shape, generator=g, device=dev)
            b.grad = a.grad.clone()
        o_ref.step()
        o_mine.step()
    err = max((a - b).abs().max().item() for a, b in zip(mine, ref))
    check_row(ctx, case, "hotpath_triton", "param", err, _fp32_bound(ref))


def _check_master_weights(ctx: Context, case: str) -> None:
    """bf16 parameters with fp32 master weights: the masters track fp32 AdamW, the parameters are their rounding."""
    from kernels import FusedAdamW

    dev = ctx.torch_device
    g = torch.Generator(device=dev).manual_seed(2)
    ref = [torch.randn(*s, generator=g, device=dev).bfloat16().float().requires_grad_() for s in CHECK_SHAPES]
    mine = [p.detach().bfloat16().requires_grad_() for p in ref]
    o_ref, o_mine = torch.optim.AdamW(ref, lr=1e-2), FusedAdamW(mine, lr=1e-2, master_weights=True)
    for _ in range(CHECK_STEPS):
        for a, b in zip(ref, mine):
            b.grad = torch.randn(a.shape, generator=g, device=dev).bfloat16()
            a.grad = b.grad.float()
        o_ref.step()
        o_mine.step()
    err = max((o_mine.state[b]["master_param"] - a).abs().max().item() for a, b in zip(ref, mine))
    check_row(ctx, case, "hotpath_triton", "master", err, _fp32_bound(ref))
    exact = all(torch.equal(b, o_mine.state[b]["master_param"].bfloat16()) for b in mine)
    check_row(ctx, case, "hotpath_triton", "param_is_rounded_master", 0.0 if exact else float("inf"), 0.0)


def _capture_step(opt: torch.optim.Optimizer, warmup_steps: int) -> torch.cuda.CUDAGraph:
    """Capture one optimizer step in a CUDA graph (the capture itself runs nothing), after warm-up steps (state
    init, compile, launch table) on a side stream, as CUDA graph capture requires."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup_steps):
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    return graph


def _check_cuda_graph(ctx: Context, case: str) -> None:
    """Steps replayed from a captured graph give what eager steps give, and the on-device step count advances."""
    from kernels import FusedAdamW

    dev = ctx.torch_device
    g = torch.Generator(device=dev).manual_seed(3)
    a = [torch.randn(*s, generator=g, device=dev).requires_grad_() for s in CHECK_SHAPES]
    b = [p.detach().clone().requires_grad_() for p in a]
    for p, q in zip(a, b):
        p.grad = torch.randn(p.shape, generator=g, device=dev)
        q.grad = p.grad.clone()
    oa, ob = FusedAdamW(a, lr=1e-2), FusedAdamW(b, lr=1e-2)
    graph = _capture_step(oa, warmup_steps=3)
    for _ in range(5):
        graph.replay()
    for _ in range(3 + 5):
        ob.step()
    torch.cuda.synchronize()
    err = max((p - q).abs().max().item() for p, q in zip(a, b))
    check_row(ctx, case, "hotpath_triton", "graph_vs_eager", err, 1e-6)
    steps_ok = float(oa.state[a[0]]["step"]) == float(ob.state[b[0]]["step"]) == 8.0
    check_row(ctx, case, "hotpath_triton", "device_step_count", 0.0 if steps_ok else float("inf"), 0.0)


def check_adamw(ctx: Context) -> None:
    """FusedAdamW (compiled) vs torch.optim.AdamW for 10 steps: fp32 options, bf16 + master weights, and a step
    captured in a CUDA graph replayed against eager steps."""
    checks = {
        "check adamw fp32": lambda case: _check_fp32(ctx, case, 1),
        "check adamw fp32 amsgrad maximize": lambda case: _check_fp32(ctx, case, 1, amsgrad=True, maximize=True,
                                                                      weight_decay=0.1),
        "check adamw bf16 master weights": lambda case: _check_master_weights(ctx, case),
    }
    if ctx.torch_device == "cuda":
        checks["check adamw cuda graph"] = lambda case: _check_cuda_graph(ctx, case)
    for case, check in checks.items():
        try:
            check(case)
        except Exception as e:  # noqa: BLE001 - a check that raises is a failed check, and the suite goes on
            check_error(ctx, case, "hotpath_triton", e)
    print_verdict(ctx, "adamw", checks)


def _make_optimizer(variant: str, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    from kernels import FusedAdamW

    if variant.startswith("hotpath_triton"):
        return FusedAdamW(params, lr=1e-4, weight_decay=0.1)
    if variant == "torch_fused":
        return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1, fused=True)
    if variant == "torch_foreach":
        return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1, foreach=True)
    raise ValueError(f"unknown adamw variant {variant!r}")


def _timed_step(ctx: Context, variant: str, params: list[torch.Tensor],
                n: int) -> tuple[str, Callable[[], object], dict[str, Any]]:
    """(the variant recorded, the function to time, extra row fields), after the warm-up step (state init,
    compile, launch table) and, for the headline, the capture; both outside the timing."""
    opt = _make_optimizer(variant, params)
    ctx.warm(opt.step)
    if variant != HEADLINE:
        return variant, opt.step, {}
    fields = headline_fields(n)
    try:
        return variant, ctx.warm(_capture_step, opt, 1).replay, fields
    except Exception as e:  # noqa: BLE001 - no graph: time the eager step instead and say why
        opt = _make_optimizer(variant, params)  # a failed capture may have left the first one half-stepped
        ctx.warm(opt.step)
        return EAGER_FALLBACK, opt.step, dict(fields, capture_error=failure_reason(e))


def run_adamw_case(ctx: Context, shapes: Sequence[torch.Size], case: str = "adamw gpt2 124M fp32",
                   variants: Sequence[str] = ADAMW_VARIANTS, copy: Optional[float] = None) -> None:
    """One optimizer step over fp32 parameters of the given shapes: ms, GB/s (28 B/param), % of `copy` (when
    given). The headline (CUDA graph replay) first."""
    dev = ctx.torch_device
    n = sum(math.prod(s) for s in shapes)
    nbytes = adamw_bytes(n)
    if ctx.time_left() <= 0:  # past the budget: skipped rows, nothing allocated
        for variant in variants:
            ctx.out_of_time(case, variant, "step_ms", params=n)
        return
    g = torch.Generator(device=dev).manual_seed(0)
    params = [(0.02 * torch.randn(*s, generator=g, device=dev)).requires_grad_() for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, device=dev)
    for variant in variants:
        if ctx.out_of_time(case, variant, "step_ms", params=n):
            continue
        try:
            recorded, fn, fields = _timed_step(ctx, variant, params, n)
            ms = ctx.measure(fn)
            bandwidth_rows(ctx, case, recorded, "step", ms, nbytes, copy, params=n,
                           bytes_per_param=ADAMW_BYTES_PER_PARAM, **fields)
            del fn
        except Exception as e:  # noqa: BLE001 - a variant that cannot run is a result, not a crash
            ctx.add(case, variant, "step_ms", None, "ms", skipped=failure_reason(e), params=n)
        if dev == "cuda":
            torch.cuda.empty_cache()
    ratio_rows(ctx, case)


def checks(ctx: Context) -> None:
    check_adamw(ctx)


def timings(ctx: Context) -> None:
    shapes = gpt2_param_shapes()
    n = sum(math.prod(s) for s in shapes)
    print(f"[adamw] {n / 1e6:.1f}M fp32 params in {len(shapes)} tensors ({ctx.time_left():.0f} s of budget left)",
          flush=True)
    run_adamw_case(ctx, shapes, copy=copy_row(ctx, adamw_bytes(n)))
