"""Decode section (kernels.attention with a few new tokens against a long KV cache): correctness, then KV bandwidth
against torch SDPA (and flash-attn's flash_attn_with_kvcache when it is installed).

Shapes: T = 1 and T = 16 new tokens, S = 4k..32k cached keys, B = 1..8, H = 32 query heads, H_kv = 8 (GQA) or 32
(MHA), D = 128, bf16, causal bottom-right (the T new tokens see the whole cache and each other causally).
`kernels.attention` dispatches such shapes to its decode path (flash-decoding: the KV length split across CTAs and
the partial results combined), so batch-1 decode can fill the GPU; this section calls only the public function.

Metric: KV bandwidth, the bytes of K and V a step must read (2 * B * H_kv * S * D * 2 for bf16) per second, and its
% of a same-size copy measured in the run; queries and outputs are negligible next to them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

from .attention import attention_in_dtype, kv_read_bytes
from .bandwidth import copy_row
from .checks import check_against_reference, check_error, print_verdict
from .context import Context, failure_reason, gbps, is_oom, ratio_rows

DECODE_H, DECODE_D = 32, 128
DECODE_T = (1, 16)
DECODE_B = (1, 8)
DECODE_H_KV = (8, 32)
DECODE_S = (4096, 8192, 16384, 32768)
QUICK = dict(T=(1,), B=(1,), H_kv=(8,), S=(4096, 32768))
DECODE_VARIANTS = ("hotpath_triton", "sdpa", "flash_attn")


@dataclass(frozen=True)
class DecodeCase:
    B: int
    H: int
    H_kv: int
    T: int
    S: int
    D: int = DECODE_D

    @property
    def name(self) -> str:
        heads = f"H{self.H}" if self.H == self.H_kv else f"H{self.H}/{self.H_kv}kv"
        return f"decode D{self.D} B{self.B} {heads} T{self.T} S{self.S}"

    def shape_fields(self) -> dict[str, Any]:
        return {"B": self.B, "H": self.H, "H_kv": self.H_kv, "T": self.T, "S": self.S, "D": self.D,
                "causal": True}

    def kv_bytes(self, elem_bytes: int = 2) -> int:
        return kv_read_bytes(self.B, self.H_kv, self.S, self.D, elem_bytes)


def decode_cases(quick: bool = False) -> list[DecodeCase]:
    """T = 1 before T = 16, then batch 1 before 8 (batch-1 decode is what flash-decoding is for), GQA before MHA,
    short caches before long: a spent budget cuts the least interesting ones."""
    grid = QUICK if quick else dict(T=DECODE_T, B=DECODE_B, H_kv=DECODE_H_KV, S=DECODE_S)
    return [DecodeCase(B, DECODE_H, H_kv, T, S)
            for T in grid["T"] for B in grid["B"] for H_kv in grid["H_kv"] for S in grid["S"]]


# ------------------------------------------------------------------------------------------------ variants
def _flash_attn() -> Any:
    """flash-attn's module, or None when it is not installed."""
    try:
        import flash_attn
    except ImportError:
        return None
    return flash_attn


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """torch SDPA with its own backend choice; T > 1 needs the bottom-right causal mask (is_causal=True would align
    top-left), T = 1 sees everything."""
    import torch.nn.functional as F

    T, S = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if T == 1:
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)
    from torch.nn.attention.bias import causal_lower_right

    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(T, S), scale=scale, enable_gqa=gqa)


def _variant_fn(variant: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                scale: float) -> Callable[[], torch.Tensor]:
    """A no-argument call of the variant on these inputs (layout changes done here, outside the timing)."""
    if variant == "hotpath_triton":
        import kernels

        return lambda: kernels.attention(q, k, v, causal=True, scale=scale)
    if variant == "sdpa":
        return lambda: _sdpa(q, k, v, scale)
    if variant == "flash_attn":
        fa = _flash_attn()
        if fa is None:
            raise RuntimeError("flash-attn is not installed")
        # flash-attn wants (B, T, H, D); its causal mask is bottom-right aligned, and it takes grouped heads as is
        qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))
        return lambda: fa.flash_attn_with_kvcache(qt, kt, vt, softmax_scale=scale, causal=True)
    raise ValueError(f"unknown decode variant {variant!r}")


# ------------------------------------------------------------------------------------------------ timing
def decode_rows(ctx: Context, case: DecodeCase, variant: str, ms: Sequence[float], copy: Optional[float],
                elem_bytes: int = 2) -> None:
    """Rows for one timing: median ms (with p20/p80), KV bandwidth in GB/s and its % of copy bandwidth."""
    p20, p50, p80 = ms
    fields = dict(case.shape_fields(), kv_bytes=case.kv_bytes(elem_bytes))
    ctx.add(case.name, variant, "fwd_ms", p50, "ms", p20_ms=p20, p80_ms=p80, **fields)
    bw = gbps(case.kv_bytes(elem_bytes), p50)
    ctx.add(case.name, variant, "kv_bandwidth", bw, "GB/s", **fields)
    if copy:
        ctx.add(case.name, variant, "kv_pct_of_copy", 100.0 * bw / copy, "%", copy_gbps=copy, **fields)


def run_decode_case(ctx: Context, case: DecodeCase, dtype: torch.dtype = torch.bfloat16,
                    variants: Sequence[str] = DECODE_VARIANTS, copy: Optional[float] = None) -> None:
    """Time each variant's forward on one case; failures and timings past the budget become `skipped` rows."""
    if ctx.time_left() <= 0:  # past the budget: skipped rows, nothing allocated
        for variant in variants:
            ctx.out_of_time(case.name, variant, "fwd_ms", **case.shape_fields())
        return
    dev = ctx.torch_device
    g = torch.Generator(device=dev).manual_seed(case.S + case.T)
    q = torch.randn(case.B, case.H, case.T, case.D, generator=g, device=dev, dtype=dtype)
    k, v = (torch.randn(case.B, case.H_kv, case.S, case.D, generator=g, device=dev, dtype=dtype) for _ in range(2))
    scale = case.D ** -0.5
    for variant in variants:
        if ctx.out_of_time(case.name, variant, "fwd_ms", **case.shape_fields()):
            continue
        try:
            with torch.no_grad():
                fn = _variant_fn(variant, q, k, v, scale)
                ctx.warm(fn)  # compile / autotune outside the timing
                ms = ctx.measure(fn)
            decode_rows(ctx, case, variant, ms, copy, dtype.itemsize)
        except Exception as e:  # noqa: BLE001 - a variant that cannot run is a result, not a crash
            ctx.add(case.name, variant, "fwd_ms", None, "ms", skipped=failure_reason(e), **case.shape_fields())
            if is_oom(e) and dev == "cuda":
                torch.cuda.empty_cache()
    ratio_rows(ctx, case.name)


# ------------------------------------------------------------------------------------------------ checks
DecodeCheck = tuple[int, int, int, int, int, int, bool, torch.dtype]  # (B, H, H_kv, T, S, D, causal, dtype)
DECODE_CHECKS: list[DecodeCheck] = [
    (1, 32, 8, 1, 4096, 128, True, torch.bfloat16),     # batch-1 GQA decode
    (2, 32, 32, 16, 4099, 128, True, torch.bfloat16),   # 16 new tokens, odd cache length
    (1, 32, 8, 16, 32768, 128, True, torch.bfloat16),   # the longest cache timed
    (3, 8, 2, 1, 1, 128, True, torch.float16),          # a one-key cache
    (1, 4, 1, 5, 777, 64, True, torch.float16),         # MQA, D = 64
    (2, 8, 2, 16, 2000, 128, False, torch.bfloat16),    # not causal
    (1, 4, 2, 1, 1000, 64, True, torch.float32),
]


def check_decode(ctx: Context, plan: Optional[Sequence[DecodeCheck]] = None) -> None:
    """kernels.attention's forward on decode shapes against the float64 reference (the FlashAttention rule for
    fp16/bf16: <= 2x PyTorch's own error in the same dtype + atol). Forward only: decode runs no backward."""
    import kernels

    dev = ctx.torch_device
    for B, H, H_kv, T, S, D, causal, dtype in (plan if plan is not None else DECODE_CHECKS):
        case = f"check decode {str(dtype)[6:]} B{B} H{H}/{H_kv} T{T} S{S} D{D} {'causal' if causal else 'full'}"
        try:
            g = torch.Generator(device=dev).manual_seed(T * 100003 + S)
            q = torch.randn(B, H, T, D, generator=g, device=dev, dtype=dtype)
            k, v = (torch.randn(B, H_kv, S, D, generator=g, device=dev, dtype=dtype) for _ in range(2))
            scale = D ** -0.5
            with torch.no_grad():
                got = kernels.attention(q, k, v, causal=causal, scale=scale)
                ref = kernels.attention_ref(q.double(), k.double(), v.double(), causal=causal, scale=scale)
                base = attention_in_dtype(q, k, v, causal, scale)
            check_against_reference(ctx, case, "o", got, ref, base, dtype)
        except Exception as e:  # noqa: BLE001 - a check that raises is a failed check, and the suite goes on
            check_error(ctx, case, "hotpath_triton", e)
        print_verdict(ctx, case, [case])


def checks(ctx: Context) -> None:
    check_decode(ctx)


def timings(ctx: Context) -> None:
    cases = decode_cases(ctx.quick)
    copy = copy_row(ctx, max(c.kv_bytes() for c in cases))
    for i, case in enumerate(cases):
        if ctx.time_left() > 0:
            print(f"[decode {i + 1}/{len(cases)}] {case.name}  ({ctx.time_left():.0f} s of budget left)", flush=True)
        run_decode_case(ctx, case, copy=copy)
