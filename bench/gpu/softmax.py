"""Softmax section (kernels.softmax): correctness, then forward and backward over rows of 1k..32k elements against
torch.softmax and torch.compile, in GB/s (bytes read + written) and % of copy bandwidth."""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence

import torch

from .bandwidth import bandwidth_rows, copy_row
from .checks import check_against_reference, check_error, print_verdict
from .context import Context, failure_reason, ratio_rows

SOFTMAX_ROW_LENS = (1024, 2048, 4096, 8192, 16384, 32768)
QUICK_SOFTMAX_ROW_LENS = (1024, 8192, 32768)
SOFTMAX_ELEMENTS = 1 << 27  # elements per softmax case (256 MiB of bf16 in, as much out): far beyond L2
SOFTMAX_VARIANTS = ("hotpath_triton", "torch_softmax", "torch_compile")


def softmax_bytes(numel: int, elem_bytes: int, direction: str = "fwd") -> int:
    """Bytes a softmax must move: forward reads x, writes y; backward reads y and dy, writes dx."""
    if direction not in ("fwd", "bwd"):
        raise ValueError(f"direction must be 'fwd' or 'bwd', got {direction!r}")
    return (2 if direction == "fwd" else 3) * numel * elem_bytes


def softmax_cases(quick: bool = False, elements: int = SOFTMAX_ELEMENTS) -> list[tuple[int, int]]:
    """(rows, N) with rows * N = elements, for N in 1k..32k."""
    return [(max(1, elements // n), n) for n in (QUICK_SOFTMAX_ROW_LENS if quick else SOFTMAX_ROW_LENS)]


SoftmaxCheck = tuple[tuple[int, ...], bool, float, torch.dtype]
SOFTMAX_CHECKS: list[SoftmaxCheck] = [  # (shape, causal, scale, dtype)
    ((4, 1000), False, 1.0, torch.float32),
    ((3, 5, 777), True, 0.125, torch.bfloat16),
    ((2, 3, 64, 100), True, 1.0, torch.float16),   # T < S: bottom-right aligned
    ((2, 100, 64), True, 1.0, torch.float32),      # T > S: rows that see nothing
    ((2, 40000), False, 0.5, torch.float32),       # longer than one block: online path
    ((3, 70001), False, 1.0, torch.bfloat16),      # online path, odd length
    ((2, 32768), False, 1.0, torch.bfloat16),      # the longest one-block row
]


def _softmax_in_dtype(x: torch.Tensor, scale: float, causal: bool) -> torch.Tensor:
    """torch.softmax in the input's dtype (masked rows -> 0): the baseline error of the half rule."""
    z = x * scale
    if causal:
        T, S = x.shape[-2:]
        keep = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T)
        z = z.masked_fill(~keep, float("-inf"))
    return torch.softmax(z, dim=-1).nan_to_num(0.0)


def check_softmax(ctx: Context, checks: Optional[Sequence[SoftmaxCheck]] = None) -> None:
    """Compiled softmax vs float64 reference, forward and gradient (fp32 ~1e-5; half: <= 2x torch's error)."""
    import kernels

    dev = ctx.torch_device
    for shape, causal, scale, dtype in (checks or SOFTMAX_CHECKS):
        case = f"check softmax {str(dtype)[6:]} {'x'.join(map(str, shape))} {'causal' if causal else 'full'}"
        try:
            g = torch.Generator(device=dev).manual_seed(sum(shape))
            x = (3 * torch.randn(*shape, generator=g, device=dev)).to(dtype)
            dy = torch.randn(*shape, generator=g, device=dev).to(dtype)
            outs = {}
            for name, fn, inp, grad in (
                ("kernel", lambda t: kernels.softmax(t, scale=scale, causal=causal), x, dy),
                ("ref", lambda t: kernels.softmax_ref(t, scale=scale, causal=causal), x.double(), dy.double()),
                ("torch", lambda t: _softmax_in_dtype(t, scale, causal), x, dy),
            ):
                t = inp.detach().clone().requires_grad_()
                y = fn(t)
                outs[name] = (y.detach(), *torch.autograd.grad(y, t, grad))
            for i, what in enumerate(("y", "dx")):
                check_against_reference(ctx, case, what, outs["kernel"][i], outs["ref"][i], outs["torch"][i], dtype)
        except Exception as e:  # noqa: BLE001 - a check that raises is a failed check, and the suite goes on
            check_error(ctx, case, "hotpath_triton", e)
        print_verdict(ctx, case, [case])


@functools.cache
def _compiled_softmax() -> Callable[[torch.Tensor], torch.Tensor]:
    # static shapes: one specialised (persistent-reduction) kernel per N
    return torch.compile(lambda x: torch.softmax(x, dim=-1), dynamic=False)


def _softmax_variant(variant: str) -> Callable[[torch.Tensor], torch.Tensor]:
    import kernels

    if variant == "hotpath_triton":
        return lambda x: kernels.softmax(x)
    if variant == "torch_softmax":
        return lambda x: torch.softmax(x, dim=-1)
    if variant == "torch_compile":
        return _compiled_softmax()
    raise ValueError(f"unknown softmax variant {variant!r}")


def _softmax_backward(variant: str, y: torch.Tensor, dy: torch.Tensor) -> Optional[Callable[[], torch.Tensor]]:
    """The backward alone, given the forward's output; None for torch.compile (it would need a training graph, and
    the forward is the target there)."""
    if variant == "hotpath_triton":
        from kernels.fused_softmax import softmax_backward

        return lambda: softmax_backward(y, dy, 1.0, False)
    if variant == "torch_softmax":
        return lambda: torch._softmax_backward_data(dy, y, -1, y.dtype)
    return None


def run_softmax_case(ctx: Context, rows: int, N: int, dtype: torch.dtype = torch.bfloat16,
                     copy: Optional[float] = None, variants: Sequence[str] = SOFTMAX_VARIANTS) -> None:
    """Forward and backward of each variant on a (rows, N) tensor: ms, GB/s and % of `copy` bandwidth (when
    given). Each function's first call (compile) is a warm-up outside the timing."""
    dev = ctx.torch_device
    case = f"softmax {str(dtype)[6:]} rows{rows} N{N}"
    shape: dict[str, Any] = dict(rows=rows, N=N, dtype=str(dtype))
    if ctx.time_left() <= 0:  # past the budget: a skipped row per variant, nothing allocated
        for variant in variants:
            ctx.out_of_time(case, variant, "fwd_ms", **shape)
        return
    x = torch.randn(rows, N, device=dev, dtype=dtype)
    dy = torch.randn_like(x)
    for variant in variants:
        if ctx.out_of_time(case, variant, "fwd_ms", **shape):
            continue
        direction = "fwd"  # the one a failure is recorded under
        try:
            fn = _softmax_variant(variant)
            y = ctx.warm(fn, x)
            ms = ctx.measure(lambda: fn(x))
            bandwidth_rows(ctx, case, variant, "fwd", ms, softmax_bytes(x.numel(), dtype.itemsize, "fwd"), copy,
                           **shape)
            direction = "bwd"
            bwd = _softmax_backward(variant, y, dy)
            if bwd is None or ctx.out_of_time(case, variant, "bwd_ms", **shape):
                continue
            ctx.warm(bwd)
            ms = ctx.measure(bwd)
            bandwidth_rows(ctx, case, variant, "bwd", ms, softmax_bytes(x.numel(), dtype.itemsize, "bwd"), copy,
                           **shape)
        except Exception as e:  # noqa: BLE001 - a variant that cannot run is a result, not a crash
            ctx.add(case, variant, f"{direction}_ms", None, "ms", skipped=failure_reason(e), **shape)
    ratio_rows(ctx, case)


def checks(ctx: Context) -> None:
    check_softmax(ctx)


def timings(ctx: Context) -> None:
    cases = softmax_cases(ctx.quick)
    copy = copy_row(ctx, softmax_bytes(SOFTMAX_ELEMENTS, 2))
    for i, (rows, N) in enumerate(cases):
        print(f"[softmax {i + 1}/{len(cases)}] rows {rows} x N {N}  ({ctx.time_left():.0f} s of budget left)",
              flush=True)
        run_softmax_case(ctx, rows, N, torch.bfloat16, copy)
