"""The correctness rule of every kernel check: the compiled kernel against a float64 reference.

fp32 must agree to ~1e-5 relative (tests/tolerances.py); fp16/bf16 follow the FlashAttention rule: the kernel's
error is at most twice PyTorch's own error in the same dtype plus a small atol. Each check is a row
`<name>_max_abs_err` with its `bound` and `ok`; a failed check counts in `ctx.failures` (exit code 1).
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import torch

from .context import Context

HALF_ATOL = {torch.float16: 1e-3, torch.bfloat16: 1e-2, torch.float32: 1e-5}


def error_bound(dtype: torch.dtype, ref_max: float, torch_err: float = 0.0) -> float:
    """The largest error allowed for a kernel in `dtype` whose reference peaks at `ref_max` in magnitude."""
    if dtype == torch.float32:
        return 1e-5 + 1e-5 * ref_max
    return 2 * torch_err + HALF_ATOL[dtype]


def check_row(ctx: Context, case: str, variant: str, name: str, err: float, bound: float, **extra: Any) -> bool:
    ok = bool(math.isfinite(err) and err <= bound)
    ctx.failures += not ok
    ctx.add(case, variant, f"{name}_max_abs_err", err, "abs", bound=bound, ok=ok, **extra)
    return ok


def check_against_reference(ctx: Context, case: str, name: str, got: torch.Tensor, ref: torch.Tensor,
                            in_dtype: torch.Tensor, dtype: torch.dtype) -> bool:
    """Judge hotpath's `got` against the float64 `ref`, allowing for `in_dtype` (PyTorch in the same dtype)."""
    err = (got.double() - ref).abs().max().item()
    torch_err = (in_dtype.double() - ref).abs().max().item()
    bound = error_bound(dtype, ref.abs().max().item(), torch_err)
    return check_row(ctx, case, "hotpath_triton", name, err, bound, torch_err=torch_err, dtype=str(dtype))


def check_error(ctx: Context, case: str, variant: str, e: BaseException) -> None:
    """A check that raised: a failed row with the exception's first line."""
    ctx.failures += 1
    msg = str(e).splitlines()[0][:300] if str(e) else ""
    ctx.add(case, variant, "check_error", None, "", ok=False, error=f"{type(e).__name__}: {msg}")


def print_verdict(ctx: Context, label: str, cases: Iterable[str]) -> None:
    """`[check] <label>: ok` when every row of these cases passed, else FAIL."""
    names = set(cases)
    ok = all(r.get("ok") for r in ctx.rows if r["case"] in names)
    print(f"[check] {label}: {'ok' if ok else 'FAIL'}", flush=True)
