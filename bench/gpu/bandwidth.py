"""Copy bandwidth: the roofline of the memory-bound kernels (softmax, AdamW), measured in the same run.

Targets (issue 4, one H200, ~4.3 TB/s copy): softmax rows of 1k-32k at >= 85% of copy bandwidth (bytes read +
written), ahead of torch.softmax and torch.compile; FusedAdamW on 124M fp32 parameters <= 1.0 ms per step
(28 B/param at >= 80% of bandwidth), ahead of torch.optim.AdamW(fused=True). Percentages are against a copy
(dst.copy_(src)) of the same number of bytes.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from .context import Context, failure_reason, gbps


def copy_gbps(ctx: Context, nbytes: int) -> float:
    """Bytes read + written per second by a copy of nbytes in total."""
    src = torch.empty(max(1, nbytes // 2), dtype=torch.uint8, device=ctx.torch_device)
    dst = torch.empty_like(src)
    ctx.warm(dst.copy_, src)
    ms = ctx.measure(lambda: dst.copy_(src))[1]
    return gbps(2 * src.numel(), ms)


def copy_row(ctx: Context, nbytes: int) -> Optional[float]:
    """The copy bandwidth row of a section (a timing like any other: skipped once the budget is spent)."""
    case, variant, metric = "copy bandwidth", "torch_copy", "copy_bandwidth"
    if ctx.out_of_time(case, variant, metric, "GB/s", nbytes=nbytes):
        return None
    try:
        copy = copy_gbps(ctx, nbytes)
    except Exception as e:  # noqa: BLE001 - no copy figure: the % rows are left out, the timings still run
        ctx.add(case, variant, metric, None, "GB/s", skipped=failure_reason(e), nbytes=nbytes)
        return None
    ctx.add(case, variant, metric, copy, "GB/s", nbytes=nbytes)
    return copy


def bandwidth_rows(ctx: Context, case: str, variant: str, prefix: str, ms: Sequence[float], nbytes: int,
                   copy: Optional[float], **extra: Any) -> None:
    """Rows for one timing of a memory-bound kernel: median ms (with p20/p80), GB/s and % of copy bandwidth (left
    out when there is no copy figure)."""
    p20, p50, p80 = ms
    ctx.add(case, variant, f"{prefix}_ms", p50, "ms", p20_ms=p20, p80_ms=p80, **extra)
    ctx.add(case, variant, f"{prefix}_bandwidth", gbps(nbytes, p50), "GB/s", **extra)
    if copy:
        ctx.add(case, variant, f"{prefix}_pct_of_copy", 100.0 * gbps(nbytes, p50) / copy, "%", copy_gbps=copy,
                **extra)
