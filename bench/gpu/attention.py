"""Attention section (kernels.attention): correctness, then speed against PyTorch's attention kernels.

All bf16 unless stated:
  - check: compiled kernel vs the reference (fp16/bf16/fp32; MHA, GQA, T != S, D = 80) forward and dq, dk, dv,
    under the FlashAttention error rule (<= 2x PyTorch's own error in the same dtype + atol);
  - training shapes: D in {64, 128}, causal and not, T = S in 512..16384, B = 16384 // T, H = 2048 // D; forward
    and backward of hotpath (Triton), SDPA with each backend (flash, efficient, cuDNN, math), eager attention and
    torch.compile of eager attention (math, eager and compile are skipped above T = 4096: the T x S scores would
    take tens of GB and minutes);
  - timings in two passes, so that a spent budget cuts the least interesting ones: hotpath and SDPA flash on every
    case first, then the other variants. Decode shapes (T <= 16, long KV cache) are the `decode` section's.

FLOPs = 4*B*H*T*S*D forward (QK^T and PV), halved for causal; backward 2.5x forward.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

from .checks import check_against_reference, check_error, print_verdict
from .context import Context, failure_reason, gbps, is_oom, ratio_rows, tflops


def attention_flops(B: int, H: int, T: int, S: int, D: int, causal: bool, direction: str = "fwd") -> float:
    """4*B*H*T*S*D for the forward (QK^T and PV), halved for causal; backward = 2.5x forward."""
    flops = 4.0 * B * H * T * S * D
    if causal:
        flops /= 2
    if direction == "bwd":
        flops *= 2.5
    elif direction != "fwd":
        raise ValueError(f"direction must be 'fwd' or 'bwd', got {direction!r}")
    return flops


def kv_read_bytes(B: int, H_kv: int, S: int, D: int, elem_bytes: int) -> int:
    """Bytes of K and V a decode step must read."""
    return 2 * B * H_kv * S * D * elem_bytes


# ------------------------------------------------------------------------------------------------ cases
@dataclass(frozen=True)
class AttnCase:
    B: int
    H: int
    H_kv: int
    T: int
    S: int
    D: int
    causal: bool
    kind: str = "train"  # "train" or "decode"

    @property
    def name(self) -> str:
        mask = "causal" if self.causal else "full"
        heads = f"H{self.H}" if self.H == self.H_kv else f"H{self.H}/{self.H_kv}kv"
        return f"attn {self.kind} D{self.D} {mask} B{self.B} {heads} T{self.T} S{self.S}"

    def shape_fields(self) -> dict[str, Any]:
        return {"B": self.B, "H": self.H, "H_kv": self.H_kv, "T": self.T, "S": self.S, "D": self.D,
                "causal": self.causal}


TRAIN_SEQ_LENS = (512, 1024, 2048, 4096, 8192, 16384)
QUICK_SEQ_LENS = (1024, 4096)
TOKENS_PER_BATCH = 16384
MODEL_DIM = 2048
MATERIALISING_MAX_T = 4096  # math backend, eager and torch.compile only up to here


def attention_cases(quick: bool = False) -> list[AttnCase]:
    """Training shapes (T = S, B*T = 16k tokens, H*D = 2048), D = 128 before D = 64, so that a spent time budget
    cuts the least interesting cases."""
    cases = []
    for D in ((128,) if quick else (128, 64)):
        for causal in (True, False):
            for T in (QUICK_SEQ_LENS if quick else TRAIN_SEQ_LENS):
                H = MODEL_DIM // D
                cases.append(AttnCase(max(1, TOKENS_PER_BATCH // T), H, H, T, T, D, causal))
    return cases


SDPA_BACKENDS = ("flash", "efficient", "cudnn", "math")
ATTN_VARIANTS = ("hotpath_triton",) + tuple(f"sdpa_{b}" for b in SDPA_BACKENDS) + ("eager", "torch_compile")
FIRST_PASS = ("hotpath_triton", "sdpa_flash")  # timed on every case before any other variant


def variants_for(case: AttnCase) -> list[str]:
    """Which variants run on a case: materialising ones only up to MATERIALISING_MAX_T."""
    out = []
    for v in ATTN_VARIANTS:
        if v in ("sdpa_math", "eager", "torch_compile") and case.T > MATERIALISING_MAX_T:
            continue
        if case.H != case.H_kv and v.startswith("sdpa_") and v not in ("sdpa_flash", "sdpa_math"):
            continue  # enable_gqa: only the flash and math SDPA backends take grouped heads
        out.append(v)
    return out


def directions_for(case: AttnCase) -> tuple[str, ...]:
    return ("fwd",) if case.kind == "decode" else ("fwd", "bwd")


# ------------------------------------------------------------------------------------------------ variants
def _scores(q: torch.Tensor, k: torch.Tensor, causal: bool, scale: float) -> torch.Tensor:
    """Scaled q k^T, masked bottom-right causal: (B, H, T, S)."""
    T, S = q.shape[2], k.shape[2]
    s = torch.matmul(q, k.transpose(-2, -1)) * scale
    if causal:
        keep = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
        s = s.masked_fill(~keep, float("-inf"))
    return s


def _repeat_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if k.shape[1] == q.shape[1]:
        return k, v
    groups = q.shape[1] // k.shape[1]
    return k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float) -> torch.Tensor:
    """What a plain PyTorch model does: materialise scores, mask, fp32 softmax, matmul (bottom-right causal)."""
    k, v = _repeat_kv(q, k, v)
    p = torch.softmax(_scores(q, k, causal, scale), dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(p, v)


def attention_in_dtype(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                       scale: float) -> torch.Tensor:
    """Naive attention by PyTorch entirely in the inputs' dtype (rows attending nothing -> 0): the baseline
    error of the FlashAttention tolerance rule."""
    k, v = _repeat_kv(q, k, v)
    s = _scores(q, k, causal, scale)
    m = s.amax(-1, keepdim=True).detach()
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    e = torch.exp(s - m)
    total = e.sum(-1, keepdim=True)
    return torch.matmul(e / torch.where(total == 0, torch.ones_like(total), total), v)


@functools.cache
def _compiled_eager() -> Callable[..., torch.Tensor]:
    return torch.compile(eager_attention, dynamic=True)


def _variant_fn(variant: str, causal: bool, scale: float, gqa: bool) -> Callable[..., torch.Tensor]:
    import torch.nn.functional as F

    import kernels

    if variant == "hotpath_triton":
        return lambda q, k, v: kernels.attention(q, k, v, causal=causal, scale=scale)
    if variant.startswith("sdpa_"):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                   "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[variant[5:]]

        def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            with sdpa_kernel([backend]):  # T == S here or T == 1 non-causal: SDPA's alignment agrees
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=gqa)

        return sdpa
    if variant == "eager":
        return lambda q, k, v: eager_attention(q, k, v, causal, scale)
    if variant == "torch_compile":
        return lambda q, k, v: _compiled_eager()(q, k, v, causal, scale)
    raise ValueError(f"unknown variant {variant!r}")


# ------------------------------------------------------------------------------------------------ timing
def throughput_rows(ctx: Context, case: AttnCase, variant: str, direction: str, ms: Sequence[float],
                    dtype_bytes: int = 2, **extra: Any) -> None:
    """Rows for one timing: median ms (with p20/p80) and TFLOP/s, or GB/s of KV read for decode."""
    p20, p50, p80 = ms
    fields = dict(case.shape_fields(), direction=direction, p20_ms=p20, p80_ms=p80, **extra)
    ctx.add(case.name, variant, f"{direction}_ms", p50, "ms", **fields)
    if case.kind == "decode":
        nbytes = kv_read_bytes(case.B, case.H_kv, case.S, case.D, dtype_bytes)
        ctx.add(case.name, variant, f"{direction}_kv_read", gbps(nbytes, p50), "GB/s", **fields)
    else:
        flops = attention_flops(case.B, case.H, case.T, case.S, case.D, case.causal, direction)
        ctx.add(case.name, variant, f"{direction}_tflops", tflops(flops, p50), "TFLOP/s", **fields)


def _skip(ctx: Context, case: AttnCase, variant: str, direction: str, reason: str) -> None:
    ctx.add(case.name, variant, f"{direction}_ms", None, "ms", skipped=reason, **case.shape_fields())


def _time_one(ctx: Context, fn: Callable[..., torch.Tensor], direction: str, q: torch.Tensor, k: torch.Tensor,
              v: torch.Tensor) -> list[float]:
    """[p20, p50, p80] ms of the forward, or of the backward alone (the graph is kept and replayed). The first call
    (compile, autotune) is a warm-up outside the timing."""
    if direction == "fwd":
        with torch.no_grad():
            ctx.warm(fn, q, k, v)
            return ctx.measure(lambda: fn(q, k, v))
    qg, kg, vg = (x.detach().clone().requires_grad_() for x in (q, k, v))
    o = ctx.warm(fn, qg, kg, vg)  # compiles the forward if its own timing did not run
    do = torch.randn_like(o)
    ctx.warm(lambda: o.backward(do, retain_graph=True))
    return ctx.measure(lambda: o.backward(do, retain_graph=True), grad_to_none=[qg, kg, vg])


def run_attention_case(ctx: Context, case: AttnCase, dtype: torch.dtype = torch.bfloat16,
                       variants: Optional[Sequence[str]] = None, ratios: bool = True) -> None:
    """Time every variant on one case, forward (and backward for training shapes); failures and timings past the
    section's budget become `skipped` rows. `ratios`: add the speedup rows for this case now."""
    variants = list(variants if variants is not None else variants_for(case))
    if ctx.time_left() <= 0:  # past the budget: skipped rows, nothing allocated
        for variant in variants:
            for direction in directions_for(case):
                _skip(ctx, case, variant, direction, ctx.budget_reason())
        return
    dev = ctx.torch_device
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(case.B, case.H, case.T, case.D, generator=g, device=dev, dtype=dtype)
    k, v = (torch.randn(case.B, case.H_kv, case.S, case.D, generator=g, device=dev, dtype=dtype) for _ in range(2))
    scale = case.D ** -0.5
    for variant in variants:
        for direction in directions_for(case):
            if ctx.time_left() <= 0:
                _skip(ctx, case, variant, direction, ctx.budget_reason())
                continue
            try:
                fn = _variant_fn(variant, case.causal, scale, case.H != case.H_kv)
                ms = _time_one(ctx, fn, direction, q, k, v)
                throughput_rows(ctx, case, variant, direction, ms, dtype.itemsize)
            except Exception as e:  # noqa: BLE001 - a variant that cannot run is a result, not a crash
                _skip(ctx, case, variant, direction, failure_reason(e))
                if is_oom(e) and dev == "cuda":
                    torch.cuda.empty_cache()
    if ratios:
        ratio_rows(ctx, case.name)


# ------------------------------------------------------------------------------------------------ checks
CHECK_SHAPES = [  # (B, H, H_kv, T, S, D, causal)
    (2, 8, 8, 257, 257, 64, True),
    (2, 8, 2, 100, 300, 128, True),     # GQA, chunked prefill
    (1, 4, 1, 1, 1000, 128, True),      # decode, MQA
    (1, 4, 4, 300, 127, 80, True),      # T > S (rows that attend nothing), non-power-of-two head dim
    (2, 4, 4, 129, 383, 96, False),
    (1, 2, 2, 65, 63, 32, True),
    (1, 2, 2, 2048, 2048, 128, True),   # large enough to autotune over several configs
]
CheckPlan = dict[torch.dtype, list[tuple[int, int, int, int, int, int, bool]]]
# fp16 and fp32 on a subset: every dtype x shape is another set of compiled configs
# fp32 compiles slowly (IEEE dots): one small shape; fp32 D = 128 uses the fallback config, compiled only if asked.
CHECK_PLAN: CheckPlan = {torch.bfloat16: CHECK_SHAPES, torch.float16: CHECK_SHAPES[:2],
                         torch.float32: [CHECK_SHAPES[5]]}
QUICK_CHECK_PLAN: CheckPlan = {torch.bfloat16: CHECK_SHAPES[:4], torch.float16: CHECK_SHAPES[:1]}


def _fwd_bwd(fn: Callable[..., torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             do: torch.Tensor) -> list[torch.Tensor]:
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    o = fn(q, k, v)
    return [o.detach(), *torch.autograd.grad(o, (q, k, v), do)]


def check_attention(ctx: Context, plan: Optional[CheckPlan] = None) -> None:
    """Compiled kernel vs float64 reference, forward and dq/dk/dv: rows `<x>_max_abs_err` with `bound` and `ok`;
    failures are counted in ctx.failures."""
    import kernels

    dev = ctx.torch_device
    for dtype, shapes in (plan or CHECK_PLAN).items():
        for B, H, H_kv, T, S, D, causal in shapes:
            case = f"check {str(dtype)[6:]} B{B} H{H}/{H_kv} T{T} S{S} D{D} {'causal' if causal else 'full'}"
            try:
                g = torch.Generator(device=dev).manual_seed(T * 1000 + S)
                q, k, v, do = (torch.randn(*shape, generator=g, device=dev, dtype=dtype)
                               for shape in ((B, H, T, D), (B, H_kv, S, D), (B, H_kv, S, D), (B, H, T, D)))
                scale = D ** -0.5
                got = _fwd_bwd(lambda q, k, v: kernels.attention(q, k, v, causal=causal, scale=scale), q, k, v, do)
                ref = _fwd_bwd(lambda q, k, v: kernels.attention_ref(q, k, v, causal=causal, scale=scale),
                               q.double(), k.double(), v.double(), do.double())
                base = _fwd_bwd(lambda q, k, v: attention_in_dtype(q, k, v, causal, scale), q, k, v, do)
                for name, a, r, b in zip(("o", "dq", "dk", "dv"), got, ref, base):
                    check_against_reference(ctx, case, name, a, r, b, dtype)
            except Exception as e:  # noqa: BLE001 - a check that raises is a failed check, and the suite goes on
                check_error(ctx, case, "hotpath_triton", e)
            print_verdict(ctx, case, [case])


def checks(ctx: Context) -> None:
    check_attention(ctx, QUICK_CHECK_PLAN if ctx.quick else CHECK_PLAN)


def timings(ctx: Context) -> None:
    """Two passes over the cases: FIRST_PASS variants everywhere, then the rest; speedup rows at the end."""
    cases = attention_cases(ctx.quick)
    for pass_no, first in enumerate((True, False)):
        for i, case in enumerate(cases):
            variants = [v for v in variants_for(case) if (v in FIRST_PASS) == first]
            if ctx.time_left() > 0:
                print(f"[attention pass {pass_no + 1}/2, {i + 1}/{len(cases)}] {case.name}: "
                      f"{', '.join(variants)}  ({ctx.time_left():.0f} s of budget left)", flush=True)
            run_attention_case(ctx, case, variants=variants, ratios=False)
    for case in cases:
        ratio_rows(ctx, case.name)
