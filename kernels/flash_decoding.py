"""Flash-decoding: attention for a few new query tokens over a long KV cache, with the KV length split across CTAs.

Math
----
Same semantics as `kernels.flash_attention.attention_forward`: q (B, H, T, D), k/v (B, H_kv, S, D), query head h
reads kv head h // GROUP (GROUP = H // H_kv), causal is bottom-right aligned (row i sees key j iff j <= i + S - T),
and the result is o (B, H, T, D) in q.dtype and lse (B, H, T) fp32 in natural log (-inf, with o = 0, for a row
that sees no key). The backward of the main kernel consumes this lse, so it is exact, not an estimate.

The KV range [0, S) is cut into NUM_SPLITS chunks of SPLIT_LEN keys (a multiple of every BLOCK_N). Split s computes,
for each query row, the attention restricted to its chunk:

    m_s = max_j s_ij,   l_s = sum_j exp2(s_ij - m_s),   o_s = sum_j exp2(s_ij - m_s) v_j / l_s,
    lse_s = m_s + log2(l_s)                                 (base-2 units; -inf if the chunk has no visible key)

and a combine kernel merges them exactly: lse = log2 sum_s 2^lse_s, o = sum_s 2^(lse_s - lse) o_s.

Kernels
-------
1. `_decode_split_kernel`, grid (NUM_SPLITS, B * H_kv, cdiv(GROUP * T, BLOCK_M)). A program owns one kv head and
   one chunk, and ALL the query rows of that kv head's group: the GROUP heads x T tokens are packed into one
   "rows" axis (row r = head r // T, token r % T), so each K/V tile is read from memory once for the whole group
   (the main kernel reads it once per query head). Rows are padded to BLOCK_M = max(16, next_pow2(GROUP * T)),
   at most 32 (16 for fp32); more rows take a third grid axis, whose programs re-read the chunk (mostly from L2,
   they run concurrently). Why 32: at 64 rows the transposed accumulator, scores and reductions compiled to 246-255
   registers (over the 232 budget at D = 128); at 32 rows 125-148.
   The matmuls are computed transposed ("swap AB"): s^T = K q^T, (BLOCK_N, BLOCK_M), and o^T = V^T p^T,
   (BLOCK_D, BLOCK_M). Hopper's wgmma needs M = 64 rows per warpgroup; with only 1-16 query rows the keys
   (BLOCK_N = 64/128) and the head dim (BLOCK_D = 64/128) take the M side instead, and the query rows become the
   N side, where wgmma accepts 8..256. No tensor-core work is wasted on padding beyond BLOCK_M = 16, and the
   fp32 accumulator o^T is only BLOCK_D x BLOCK_M (16 registers per thread at D = 128, 16 rows, 4 warps).
   (Head dims up to 32, i.e. BLOCK_D 16/32, cannot fill M = 64 in the o^T dot, which compiles to mma.sync there;
   the score dot stays wgmma. fp32 inputs use IEEE FMA dots, as in the main kernel, with their own 16-key
   config: larger fp32 tiles spill.)
   The price of the transposed layout: the keys of a tile are spread over the warps, so the per-row max is a
   cross-warp (shared-memory) reduction per tile. The running sum avoids a second one: it is kept per key slot
   (l_t, BLOCK_N x BLOCK_M, elementwise FFMA) and reduced once after the loop. Decode is bound by reading K/V,
   and several CTAs per SM hide the reduction's latency.
   The scale is folded into one FFMA: the running max is kept in raw score units and p = exp2(s * c - m * c)
   with c = scale * log2(e) > 0 (the host negates q for a negative scale and zeroes q with scale 1 for
   scale 0: both exact).
   Each chunk runs two loops: an unmasked steady state over the full tiles every row may see (keys < S - T + 1
   under causal, all keys otherwise, up to the chunk's last full tile), then a masked tail (chunk end, causal
   diagonal; at most a couple of tiles, only in the last chunk unless a chunk ends off a tile boundary).
   Output: per split, o_s (fp32, normalised) and lse_s for every row in a workspace.
2. `_decode_combine_kernel`, one program per (b, h, t) row: pass 1 takes the max of lse_s over the splits, pass 2
   accumulates 2^(lse_s - max) o_s and the weights, BLOCK_S splits at a time (no register growth with NUM_SPLITS).

Memory traffic
--------------
KV: 2 * B * H_kv * S * D * sizeof(dtype) bytes, read once (per row block). Workspace: NUM_SPLITS * B * H * T *
(D + 1) * 4 bytes written by the split kernel and read back by the combine (mostly from L2). The split count is
capped so that this round trip stays under ~25% of the KV bytes (`_num_splits`), which limits T = 16 decode with
GQA to fewer splits than T = 1.

Split count and dispatch
------------------------
`_num_splits`: enough splits that B * H_kv * row_blocks * NUM_SPLITS reaches WAVES (2) x the SM count
(`torch.cuda.get_device_properties` for CUDA tensors, else 132, an H100/H200, so a CPU capture sees the same
launch), each split at least MIN_SPLIT_LEN keys, and the workspace cap above. SPLIT_LEN is rounded up to SPLIT_ALIGN
(the largest BLOCK_N) so every autotune config sees the same grid. `FORCE_NUM_SPLITS` (tests) overrides the choice.

`use_flash_decoding(q, k)` is True iff: fp16/bf16/fp32, 1 <= T <= MAX_NEW_TOKENS (16), D <= 128,
S >= MIN_KV_LEN (1024) and S >= T, and the split rule gives at least 2 splits, i.e. B * H_kv * row_blocks is below
2 waves of SMs (the main kernel, one program per query head and 64-row block, would leave the GPU mostly idle
and read each kv head once per query head). Otherwise the main kernel runs.

GPU speed here is a static prediction (compiled for sm_90a on a CPU machine), never a measurement.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from ._dispatch import interpreting, sm_count

__all__ = ["use_flash_decoding", "flash_decoding_forward", "flash_decoding_ref", "SMEM_ESTIMATES"]

try:  # Triton is optional
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only on machines without triton
    triton = None
    tl = None

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = 128

# Dispatch rule and split choice (module knobs: tests lower MIN_KV_LEN and force the split count).
MAX_NEW_TOKENS = 16  # T above this: the main kernel (its 64-row query tiles are no longer mostly empty)
MIN_KV_LEN = 1024  # S below this: too little KV to be worth splitting
MAX_ROWS = 32  # BLOCK_M cap: GROUP * T rows per program (more rows: a third grid axis); see the docstring
MAX_ROWS_FP32 = 16  # fp32 (FMA dots): 32 rows take 233 registers at D = 128, 16 rows stay well under 232
WAVES = 2  # target CTAs = WAVES x SM count
SPLIT_ALIGN = 128  # SPLIT_LEN is a multiple of this (every BLOCK_N in the autotune lists divides it)
MIN_SPLIT_LEN = 256  # keys per split at least (a few KV tiles, so the loop's pipeline has something to overlap)
WORKSPACE_FRACTION = 0.25  # partial-result round trip at most this fraction of the KV bytes
FORCE_NUM_SPLITS: Optional[int] = None  # tests: use exactly this many splits (before rounding SPLIT_LEN)
# Interpreter: one fixed small config.
INTERPRET_BLOCK_N = 16
COMBINE_BLOCK_S = 16
# Allocator for outputs and workspaces; tests replace it with a NaN-filling one ("poisoned outputs").
_new_empty = torch.empty


# ---------------------------------------------------------------------------------------------------------------
# 1. Triton kernels (plain functions here; decorated with triton.jit on first use, see _kernels()).
# ---------------------------------------------------------------------------------------------------------------
if tl is not None:

    def _decode_split_kernel(  # type: ignore[no-untyped-def]  # Triton reads annotations: constexprs only
        q_ptr, k_ptr, v_ptr, op_ptr, lp_ptr,
        stride_qb, stride_qh, stride_qt, stride_qd,
        stride_kb, stride_kh, stride_ks, stride_kd,
        stride_vb, stride_vh, stride_vs, stride_vd,
        H_KV, GROUP, T, S, SPLIT_LEN, N_ROWS, qk_scale,
        S_BUCKET,  # autotune key only (power of two), unused in the body
        CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    ):
        pid_s = tl.program_id(0)
        pid_bh = tl.program_id(1).to(tl.int64)
        pid_m = tl.program_id(2)
        off_b = pid_bh // H_KV
        off_hk = pid_bh % H_KV
        # packed rows: r -> (query head off_hk * GROUP + r // T, token r % T)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        r_ok = rows < GROUP * T
        tok = rows % T
        off_h = off_hk * GROUP + rows // T  # (BLOCK_M,)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM

        # q^T (BLOCK_D, BLOCK_M), resident
        qT = tl.load(q_ptr + off_b * stride_qb + off_h[None, :] * stride_qh + tok[None, :] * stride_qt
                     + offs_d[:, None] * stride_qd, mask=d_ok[:, None] & r_ok[None, :], other=0.0)
        if DOT_FP32:
            qT = qT.to(tl.float32)
        k_base = k_ptr + off_b * stride_kb + off_hk * stride_kh
        v_base = v_ptr + off_b * stride_vb + off_hk * stride_vh

        lo = pid_s * SPLIT_LEN
        hi = tl.minimum(lo + SPLIT_LEN, S)
        diag = S - T  # row with token t sees key j iff j <= t + diag (causal)
        if CAUSAL:
            seen_by_all = tl.minimum(hi, diag + 1)  # keys every row sees
        else:
            seen_by_all = hi
        mid = lo + tl.maximum(seen_by_all - lo, 0) // BLOCK_N * BLOCK_N  # end of the unmasked full tiles

        # per row: running max (raw score units), running sum (kept per key slot), o^T accumulator
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_t = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)  # running sum, reduced over keys after the loop
        accT = tl.zeros([BLOCK_D, BLOCK_M], dtype=tl.float32)
        for phase in tl.static_range(2):  # 0: unmasked steady state, 1: masked tail
            if phase == 0:
                start = lo
                stop = mid
            else:
                start = mid
                stop = hi
            for start_n in range(start, stop, BLOCK_N):
                cols = start_n + offs_n
                k_ptrs = k_base + cols[:, None] * stride_ks + offs_d[None, :] * stride_kd
                v_ptrs = v_base + cols[:, None] * stride_vs + offs_d[None, :] * stride_vd
                # K, V tiles (BLOCK_N, BLOCK_D)
                if phase == 1:
                    kv_mask = (cols < hi)[:, None] & d_ok[None, :]
                    k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
                    v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
                elif BLOCK_D != HEAD_DIM:
                    k = tl.load(k_ptrs, mask=d_ok[None, :], other=0.0)
                    v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
                else:
                    k = tl.load(k_ptrs)
                    v = tl.load(v_ptrs)
                if DOT_FP32:
                    k = k.to(tl.float32)
                    v = v.to(tl.float32)
                sT = tl.dot(k, qT, input_precision=PRECISION)  # (BLOCK_N, BLOCK_M), raw scores
                if phase == 1:
                    keep = (cols < hi)[:, None]
                    if CAUSAL:
                        keep = keep & (cols[:, None] <= tok[None, :] + diag)
                    sT = tl.where(keep, sT, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(sT, 0))
                m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing seen yet
                mc = m_use * qk_scale
                pT = tl.math.exp2(sT * qk_scale - mc[None, :])  # one FFMA + exp2 per score
                alpha = tl.math.exp2(m_i * qk_scale - mc)
                l_t = l_t * alpha[None, :] + pT  # elementwise: no cross-warp reduction per tile
                accT = accT * alpha[None, :]
                accT = tl.dot(tl.trans(v), pT.to(v.dtype), accT, input_precision=PRECISION)  # (BLOCK_D, BLOCK_M)
                m_i = m_new

        l_i = tl.sum(l_t, 0)
        l_ok = l_i > 0.0
        l_div = tl.where(l_ok, l_i, 1.0)
        oT = accT / l_div[None, :]  # rows with no key in this chunk: acc = 0 -> o_s = 0
        m_fin = tl.where(l_ok, m_i, 0.0) * qk_scale
        lse2 = tl.where(l_ok, m_fin + tl.math.log2(l_div), float("-inf"))
        row_id = (off_b * (H_KV * GROUP) + off_h) * T + tok  # (b * H + h) * T + t, int64
        ws = pid_s.to(tl.int64) * N_ROWS
        tl.store(op_ptr + (ws + row_id[None, :]) * HEAD_DIM + offs_d[:, None], oT,
                 mask=d_ok[:, None] & r_ok[None, :])
        tl.store(lp_ptr + ws + row_id, lse2, mask=r_ok)

    def _decode_combine_kernel(  # type: ignore[no-untyped-def]  # Triton reads annotations: constexprs only
        op_ptr, lp_ptr, o_ptr, lse_ptr,
        stride_ob, stride_oh, stride_ot, stride_od,
        H, T, N_ROWS, NUM_SPLITS,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)  # (b * H + h) * T + t
        off_t = row % T
        off_h = (row // T) % H
        off_b = row // (T * H)
        offs_s = tl.arange(0, BLOCK_S)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM

        m = tl.full([BLOCK_S], float("-inf"), dtype=tl.float32)
        for s0 in range(0, NUM_SPLITS, BLOCK_S):
            s = s0 + offs_s
            m = tl.maximum(m, tl.load(lp_ptr + s * N_ROWS + row, mask=s < NUM_SPLITS, other=float("-inf")))
        m_max = tl.max(m, 0)
        m_use = tl.where(m_max == float("-inf"), 0.0, m_max)  # no split saw a key: all weights 0

        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        w_sum = tl.zeros([BLOCK_S], dtype=tl.float32)
        for s0 in range(0, NUM_SPLITS, BLOCK_S):
            s = s0 + offs_s
            s_ok = s < NUM_SPLITS
            w = tl.math.exp2(tl.load(lp_ptr + s * N_ROWS + row, mask=s_ok, other=float("-inf")) - m_use)
            o_s = tl.load(op_ptr + (s[:, None] * N_ROWS + row) * HEAD_DIM + offs_d[None, :],
                          mask=s_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_S, BLOCK_D)
            acc += tl.sum(w[:, None] * o_s, 0)
            w_sum += w
        total = tl.sum(w_sum, 0)
        ok = total > 0.0
        o = acc / tl.where(ok, total, 1.0)
        lse = tl.where(ok, (m_use + tl.math.log2(tl.where(ok, total, 1.0))) * 0.6931471805599453, float("-inf"))
        tl.store(o_ptr + off_b * stride_ob + off_h * stride_oh + off_t * stride_ot + offs_d * stride_od,
                 o.to(o_ptr.dtype.element_ty), mask=d_ok)
        tl.store(lse_ptr + row, lse)


# (BLOCK_N, num_warps, num_stages). BLOCK_N divides SPLIT_ALIGN, so only the last chunk has a masked tail (any
# chunk length is correct: the tail loop masks at the chunk end). Memory-bound: two configs, one with more
# bytes in flight per CTA (128-key tiles) and one with more CTAs per SM (64-key tiles, less shared memory).
_SPLIT_CONFIGS = [(64, 4, 3), (128, 8, 2)]
# fp32 inputs: IEEE dots run on FMA units with both operands in registers; 32-key tiles at D = 128 spill (255
# registers), 16-key tiles do not (80 registers at T = 1, 233 at 32 packed rows; sm_90a static compile).
_SPLIT_CONFIGS_FP32 = [(16, 4, 2)]
_AUTOTUNE_KEY = ["S_BUCKET", "BLOCK_M", "HEAD_DIM", "CAUSAL", "DOT_FP32", "PRECISION"]
_SMEM_LIMIT = 227 * 1024  # an H100/H200 block's shared-memory maximum


def _split_smem_estimate(named_args: dict, config: Any) -> int:
    """Shared memory (bytes) of `_decode_split_kernel` for a config: the K and V ring (num_stages buffers), q^T,
    p^T staged for the second wgmma, plus a fixed allowance for reductions and barriers."""
    args = {**named_args, **config.all_kwargs()}
    elem = args["q_ptr"].element_size()
    block_d, block_m, block_n = args["BLOCK_D"], args["BLOCK_M"], args["BLOCK_N"]
    stages = config.num_stages
    return (stages * 2 * block_n * block_d * elem + block_d * block_m * elem + block_n * block_m * elem
            + 1024)


SMEM_ESTIMATES: dict[str, Callable[[dict, Any], int]] = {"_decode_split_kernel": _split_smem_estimate}


def _configs(entries: list) -> list:
    return [triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=s) for n, w, s in entries]


def _prune_configs(configs: list, named_args: dict, **kwargs: Any) -> list:
    """Keep the configs whose estimated shared memory fits (all listed ones do today; the guard keeps it so)."""
    kept = [c for c in configs if _split_smem_estimate({**named_args, **kwargs}, c) <= _SMEM_LIMIT]
    return kept or configs[:1]


@functools.cache
def _kernels(interpret: bool) -> tuple[Any, Any, Any]:
    """(split kernel for 16-bit inputs, split kernel for fp32 inputs, combine kernel), decorated once per mode
    (Triton reads TRITON_INTERPRET at `triton.jit`, so never at import). The two split kernels are the same code
    with different autotune lists."""
    split16 = triton.jit(_decode_split_kernel)
    split32 = triton.jit(_decode_split_kernel)
    combine = triton.jit(_decode_combine_kernel)
    if not interpret:
        tune = lambda entries: triton.autotune(  # noqa: E731
            _configs(entries), key=_AUTOTUNE_KEY, prune_configs_by={"early_config_prune": _prune_configs})
        split16 = tune(_SPLIT_CONFIGS)(split16)
        split32 = tune(_SPLIT_CONFIGS_FP32)(split32)
    return split16, split32, combine


# ---------------------------------------------------------------------------------------------------------------
# 2. Split choice, dispatch rule, launcher.
# ---------------------------------------------------------------------------------------------------------------
def _block_m(group: int, T: int, elem: int) -> int:
    """Packed query rows per program: GROUP * T padded to a power of two >= 16, capped."""
    return min(MAX_ROWS if elem < 4 else MAX_ROWS_FP32, max(16, triton.next_power_of_2(group * T)))


def _split_align() -> int:
    """SPLIT_LEN granularity: the largest BLOCK_N the launch may use (the interpreter's fixed tile)."""
    return INTERPRET_BLOCK_N if interpreting() else SPLIT_ALIGN


def _num_splits(B: int, H: int, H_kv: int, T: int, S: int, D: int, elem: int, sm_count: int,
                align: int) -> tuple[int, int]:
    """(NUM_SPLITS, SPLIT_LEN): SPLIT_LEN a multiple of `align`, every split non-empty."""
    group = H // H_kv
    if FORCE_NUM_SPLITS is not None:
        n = FORCE_NUM_SPLITS
    else:
        row_blocks = -(-group * T // _block_m(group, T, elem))
        n = -(-WAVES * sm_count // (B * H_kv * row_blocks))  # fill the waves
        n = min(n, S // MIN_SPLIT_LEN)  # a few tiles per split
        kv_bytes = 2 * H_kv * S * D * elem
        ws_bytes_per_split = 2 * H * T * (D + 1) * 4  # written once, read once by the combine
        n = min(n, int(WORKSPACE_FRACTION * kv_bytes / ws_bytes_per_split))
    n = max(1, n)
    split_len = -(-(-(-S // n)) // align) * align  # ceil(S / n) rounded up to the alignment
    return -(-S // split_len), split_len


def _supported(q: Tensor, k: Tensor) -> bool:
    if triton is None or q.dim() != 4 or k.dim() != 4:
        return False
    B, H, T, D = q.shape
    H_kv, S = k.shape[1], k.shape[2]
    return (q.dtype in _TRITON_DTYPES and 0 < D <= _MAX_HEAD_DIM and 1 <= T <= MAX_NEW_TOKENS and S >= T
            and B > 0 and H > 0 and H_kv > 0 and H % H_kv == 0)


def use_flash_decoding(q: Tensor, k: Tensor) -> bool:
    """Should `attention_forward` run flash-decoding? (T <= 16 new tokens, S >= MIN_KV_LEN keys, supported dtype
    and head dim, and B * H_kv small enough that splitting the KV length gives at least 2 splits.)"""
    if not _supported(q, k) or k.shape[2] < MIN_KV_LEN:
        return False
    B, H, T, D = q.shape
    H_kv, S = k.shape[1], k.shape[2]
    n, _ = _num_splits(B, H, H_kv, T, S, D, q.element_size(), sm_count(q.device), _split_align())
    return n >= 2


def flash_decoding_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    """Split-KV forward. q (B, H, T, D), k/v (B, H_kv, S, D) -> o (B, H, T, D) in q.dtype, lse (B, H, T) fp32
    (natural log). Requires 1 <= T <= MAX_NEW_TOKENS, T <= S, fp16/bf16/fp32, D <= 128."""
    if not _supported(q, k) or k.shape != v.shape or q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"flash-decoding needs q (B, H, T<={MAX_NEW_TOKENS}, D<={_MAX_HEAD_DIM}), k/v (B, H_kv, "
                         f"S>=T, D) of one dtype in fp16/bf16/fp32; got {tuple(q.shape)}, {tuple(k.shape)} {q.dtype}")
    B, H, T, D = q.shape
    H_kv, S = k.shape[1], k.shape[2]
    group = H // H_kv
    # The kernel keeps the running max in raw score units, which needs scale > 0 (and -inf * 0 would be NaN).
    if scale < 0:
        q, scale = -q, -scale  # exact
    elif scale == 0:
        q, scale = torch.zeros_like(q), 1.0  # every score exactly 0, as with scale 0
    interpret = interpreting()
    block_d = max(16, triton.next_power_of_2(D))
    block_m = _block_m(group, T, q.element_size())
    num_splits, split_len = _num_splits(B, H, H_kv, T, S, D, q.element_size(), sm_count(q.device), _split_align())
    n_rows = B * H * T

    o = _new_empty((B, H, T, D), dtype=q.dtype, device=q.device)  # (B, H, T, D)
    lse = _new_empty((B, H, T), dtype=torch.float32, device=q.device)  # (B, H, T)
    o_part = _new_empty((num_splits, n_rows, D), dtype=torch.float32, device=q.device)  # per split, normalised
    lse_part = _new_empty((num_splits, n_rows), dtype=torch.float32, device=q.device)  # log2 units
    split16, split32, combine = _kernels(interpret)
    split = split32 if q.dtype == torch.float32 else split16
    consts: dict[str, Any] = dict(
        CAUSAL=bool(causal), HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=block_m,
        DOT_FP32=interpret and q.dtype == torch.bfloat16,  # interpreter bf16 tl.dot returns garbage
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # "tf32" is ignored for 16-bit operands
    )
    if interpret:
        consts["BLOCK_N"] = INTERPRET_BLOCK_N
    grid = (num_splits, B * H_kv, triton.cdiv(group * T, block_m))
    split[grid](
        q, k, v, o_part, lse_part,
        *q.stride(), *k.stride(), *v.stride(),
        H_kv, group, T, S, split_len, n_rows, float(scale) * _LOG2E, triton.next_power_of_2(S),
        **consts,
    )
    combine[(n_rows,)](
        o_part, lse_part, o, lse, *o.stride(), H, T, n_rows, num_splits,
        HEAD_DIM=D, BLOCK_D=block_d, BLOCK_S=COMBINE_BLOCK_S, num_warps=4,
    )
    return o, lse


# ---------------------------------------------------------------------------------------------------------------
# 3. Reference: the same split-and-combine in plain PyTorch (float64 in tests).
# ---------------------------------------------------------------------------------------------------------------
def flash_decoding_ref(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float,
                       num_splits: int) -> tuple[Tensor, Tensor]:
    """Per-split partial softmax over contiguous KV chunks, merged with log-sum-exp weights. Computes in q's dtype
    (pass float64); returns (o (B, H, T, D), lse (B, H, T), natural log, -inf for rows that see nothing)."""
    B, H, T, D = q.shape
    H_kv, S = k.shape[1], k.shape[2]
    group = H // H_kv
    kx = k.repeat_interleave(group, dim=1)  # (B, H, S, D)
    vx = v.repeat_interleave(group, dim=1)
    s = torch.matmul(q, kx.transpose(-2, -1)) * scale  # (B, H, T, S)
    if causal:
        keep = torch.arange(S, device=q.device)[None, :] <= torch.arange(T, device=q.device)[:, None] + (S - T)
        s = s.masked_fill(~keep, float("-inf"))
    chunk = -(-S // max(1, num_splits))
    lses, outs = [], []
    for lo in range(0, S, chunk):
        sc = s[..., lo:lo + chunk]
        lse_c = torch.logsumexp(sc, dim=-1, keepdim=True)  # -inf if the chunk sees nothing
        p = torch.exp(sc - torch.where(torch.isinf(lse_c), torch.zeros_like(lse_c), lse_c))
        outs.append(torch.matmul(p, vx[..., lo:lo + chunk, :]))  # normalised within the chunk
        lses.append(lse_c)
    lse_all = torch.cat(lses, dim=-1)  # (B, H, T, n)
    lse = torch.logsumexp(lse_all, dim=-1, keepdim=True)
    w = torch.exp(lse_all - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse))  # (B, H, T, n)
    o = sum(w[..., i:i + 1] * outs[i] for i in range(len(outs)))
    return torch.as_tensor(o).to(q.dtype), lse.squeeze(-1)
