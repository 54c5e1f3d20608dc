"""Fused (flash-style) scaled-dot-product attention: Triton kernels, launchers, torch.library op, reference.

Math
----
For q (B, H, T, D) and k, v (B, H_kv, S, D) with H % H_kv == 0 (MHA: H_kv = H, GQA: 1 < H_kv < H, MQA: H_kv = 1),
query head h reads key/value head h // (H // H_kv). With s = scale * q k^T (default scale = 1/sqrt(D)):

    o[i]   = sum_j softmax_j(s[i, j]) v[j]           over the keys j that row i attends
    lse[i] = log sum_j exp(s[i, j])                   (saved for the backward; natural log, fp32)

Causal masking is aligned bottom-right: query row i attends key j iff j <= i + (S - T). This covers training
(T == S), decode with a KV cache (T = 1, S = past + 1: the new token sees everything) and chunked prefill (T < S).
If T > S the first T - S rows attend nothing: their output is defined as 0 and their lse as -inf (no NaN anywhere,
forward or backward).

Forward (FlashAttention-2 schedule, laid out as in Triton's fused-attention tutorial): one program per (BLOCK_M
query rows, batch*head). The q tile is loaded once; the program streams BLOCK_N-row tiles of K and V, computing the
scores tile, and keeps a running max m, running sum l and an unnormalised fp32 accumulator ("online softmax" in
base 2). The T x S score matrix is never written to memory.
  - Two loops over the keys. Tiles every row of the query tile fully sees (all of them without causal, those left
    of the diagonal with it) and that lie inside S run in an unmasked loop with no mask arithmetic at all; the
    causal diagonal tiles and the ragged last tile (S % BLOCK_N != 0) run after it in a masked loop. Key tiles
    entirely above the diagonal are never visited.
  - Scale folded: with qk_scale = scale * log2(e), m is taken from the raw scores (max(qk) * qk_scale, scale > 0)
    and p = exp2(qk * qk_scale - m), one FFMA per score in the unmasked loop.
  - fp16/bf16 inputs with a power-of-two D, contiguous last dim and 16-byte aligned strides are read and written
    through 4-d TMA tensor descriptors (out-of-range rows of one (batch, head) read as 0 and are not written);
    anything else (fp32, D = 80/96, odd strides) takes masked pointer loads.
  - Causal query tiles are launched longest first (the program id runs over query tiles in reverse), so the
    cheap tiles fill the tail of the grid.
  - Autotune configs are pruned by an estimate of the shared memory the compiled kernel uses (SMEM_ESTIMATES,
    checked against sm_90a compiles): the q tile plus num_stages buffers of K and V tiles.
  Compiled for sm_90a (bf16, D = 128, static prediction; no GPU has run it): 138 registers at 128 x 64 / 8 warps
  and 190-199 at 128 x 128, no spills, wgmma for both dots, a 354-instruction unmasked loop (the tutorial's: 361).

Backward (FlashAttention-2 schedule, one pass over K/V, atomic dq):
    preprocess:  delta[i] = sum_d o[i, d] * do[i, d],  lse2[i] = lse[i] * log2(e)   (+inf where lse = -inf)
    p = exp2(qk * scale*log2(e) - lse2)   (one FFMA + EX2 per score)
    dv = p^T do,  dp = do v^T,  ds = p * (dp - delta),  dk = scale * ds^T q,  dq = scale * ds k
  - dk/dv kernel: one program per (128 keys, batch*kv_head), 8 warps (2 warpgroups); the K and V tiles stay
    resident, 32-row query tiles stream past them. It loops over the H/H_kv query heads sharing the kv head, so
    grouped heads' dk/dv are summed in registers and written once. Each step is 5 matmuls: s^T = k q^T, dv += p^T do,
    dp^T = v do^T, dk += ds^T q, and dq_tile = ds k, added with fp32 atomic adds (vector red.global.add.v4.f32) into
    a zeroed (B, H, T, D) fp32 buffer that the launcher scales and casts once at the end.
  - Causal: the query tiles of one key tile split into a masked diagonal [lo, mid) and an unmasked steady state
    [mid, T) (no compare/select in it); the tiles before lo see none of the keys and are skipped. A key tile that
    reaches past S runs every query tile masked, so its zero-padded keys can never carry exp2 overflow into dq.
    Key tile 0 has the most work and is launched first (longest first).
  - deterministic=True (launcher keyword) runs the dk/dv kernel without dq and a separate dq kernel (one program per
    128 query rows with q, do, dq resident, streaming 32/64-key tiles, the same diagonal split): 7 matmuls per score
    tile instead of 5, but dq is bitwise reproducible. The atomic path's dq depends on the order the fp32 adds land
    (differences at fp32 rounding level, ~1e-7 relative, from run to run); dk and dv are deterministic either way.
  p is recomputed from lse2, so the backward never stores T x S.

Backward registers and shared memory (compiled for sm_90a with bench/sm90.py, bf16/fp16, D = 128; a static
prediction, not a measurement): the dk, dv fp32 accumulators of a 128 x 128 tile take 128 registers per thread at 8
warps, so query tiles are 32 rows (64 spilled 200+ bytes); a maxnreg = 232 cap lands at 224-228 registers with no
spills, ~421 SASS instructions per unmasked step (20 HGMMA for the four 128-key matmuls, 32 mma.sync HMMA for the
M = 32 dq matmul), 137-153 KB shared memory (K/V resident, a second copy of K in the dq operand layout, 2-3 stages of
q/do). One CTA (2 warpgroups) per SM.

FLOPs and bytes
---------------
Forward: 4*B*H*T*S*D FLOPs (two matmuls), halved for causal T == S. Backward: 2.5x the forward (five matmuls,
one of them recomputing s). Memory traffic of the forward, in elements: read q once, K and V once per query tile
(B*H*S*D*2 * ceil(T / BLOCK_M), served mostly from L2), write o once plus 4 bytes of lse per row. That is O(T*D)
instead of O(T*S) for a materialising implementation. Decode (T = 1) is bound by reading the KV cache:
2*B*H_kv*S*D*sizeof(dtype) bytes.

Trade-offs
----------
- fp32 accumulation everywhere; p and ds are rounded to the input dtype before their matmuls (as FlashAttention
  does), which is what the fp16/bf16 tolerance rule in tests/tolerances.py accounts for. fp32 inputs use IEEE fp32
  dots (not TF32), trading Hopper tensor-core speed for the 1e-5 tolerance.
- Head dims up to 128; a non-power-of-two D (80, 96, ...) is padded to the next power of two in registers with
  masked loads/stores (wasting up to 37% of the dot FLOPs for D = 80). D > 128 or float64 fall back to the reference.
- The backward recomputes p (one extra matmul) instead of storing it: O(T) memory for 25% more FLOPs.
- Atomic dq (default) vs the separate dq kernel: chosen on static evidence, per 32 x 128 score tile at D = 128:
  one ~421-instruction step with 5 matmuls and no spills, against ~300 (dk/dv) + ~256 (dq) instructions and 7
  matmuls for the two-kernel path. The price: dq's fp32 atomics (16 KB of red.add per step, served by L2: one
  head's dq buffer is T*D*4 bytes), an extra zeroed fp32 buffer of B*H*T*D*4 bytes, one scale-and-cast pass over it,
  and run-to-run dq bits. The dq matmul (M = 32 rows) runs on mma.sync, not wgmma: a transposed wgmma form
  (dq^T = k^T ds^T) compiled to 28-byte spills at the same register cap.
- No warp specialization in the forward: Triton 3.9's Hopper pass leaves the 8-warp loops unchanged and fails on
  the 4-warp ones, so the WARP_SPECIALIZE constexpr (tl.range(..., warp_specialize=...)) is in no config; the
  overlap of softmax and matmuls is left to the software pipeliner (num_stages K/V buffers, async wgmma).
- Decode (T <= 16 over a long KV cache with few kv heads) goes to kernels/flash_decoding.py, which splits the KV
  length over programs and merges the partial softmaxes; otherwise it is this kernel with a mostly-masked q tile.
- An explicit `attn_mask` is not fused: `attention(..., attn_mask=m)` runs `attention_ref` (materialises scores).

Dispatch (see kernels/_dispatch.py): CUDA tensors run compiled, autotuned Triton; CPU tensors run `attention_ref`
unless TRITON_INTERPRET=1, in which case the same Triton kernels run in Triton's interpreter with one fixed config.
Triton is optional: the kernels are plain functions decorated with `triton.jit` on first use, so importing this
module never decides interpreter-vs-compiler and works without Triton installed.
"""
from __future__ import annotations

import functools
import types
from typing import Any, Callable, Optional

import torch
from torch import Tensor
from torch.types import Device

from ._dispatch import interpreting, use_triton
from .flash_decoding import flash_decoding_forward, use_flash_decoding

__all__ = ["attention", "attention_ref", "attention_forward", "attention_backward"]

try:  # Triton is optional: without it every path is the reference.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only on machines without triton
    triton = None
    tl = None

_LOG2E = 1.4426950408889634
_MAX_HEAD_DIM = 128
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# One fixed launch config under the interpreter (tests read it to place block-boundary shapes).
INTERPRET_BLOCK_M = 32
INTERPRET_BLOCK_N = 32
# Output allocator used by every launcher; tests replace it with a NaN-filling one ("poisoned outputs").
_new_empty = torch.empty


# ---------------------------------------------------------------------------------------------------------------
# 1. Triton kernels (plain functions here; decorated with triton.jit on first use, see _kernels()).
# ---------------------------------------------------------------------------------------------------------------
if tl is not None:

    def _attn_fwd_kernel(  # type: ignore[no-untyped-def]  # Triton reads annotations: constexprs only
        q_src, k_src, v_src, o_dst, lse_ptr,  # q/k/v/o: 4-d TMA tensor descriptors if TMA, else pointers
        stride_qb, stride_qh, stride_qt, stride_qd,
        stride_kb, stride_kh, stride_ks, stride_kd,
        stride_vb, stride_vh, stride_vs, stride_vd,
        stride_ob, stride_oh, stride_ot, stride_od,
        H, GROUP, T, S, qk_scale,
        T_BUCKET, S_BUCKET,  # autotune keys only (powers of two), unused in the body
        CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
        TMA: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        if CAUSAL:  # the last query tiles see the most keys: launch them first (less tail imbalance)
            pid_m = tl.num_programs(0) - 1 - pid_m
        pid_bh = tl.program_id(1)
        off_b = pid_bh // H  # int32: TMA coordinates; pointer offsets below are int64
        off_h = pid_bh % H
        off_hk = off_h // GROUP
        start_m = pid_m * BLOCK_M
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        m_ok = offs_m < T
        d_ok = offs_d < HEAD_DIM

        # q tile (BLOCK_M, BLOCK_D), resident for the whole loop; rows past T read as 0 (never stored)
        if TMA:
            q = q_src.load([off_b, off_h, start_m, 0]).reshape(BLOCK_M, BLOCK_D)
        else:
            q = tl.load(q_src + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh
                        + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                        mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        if DOT_FP32:
            q = q.to(tl.float32)
        if not TMA:
            k_base = k_src + off_b.to(tl.int64) * stride_kb + off_hk.to(tl.int64) * stride_kh
            v_base = v_src + off_b.to(tl.int64) * stride_vb + off_hk.to(tl.int64) * stride_vh

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max of qk * qk_scale
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        # Key range [0, n_end) split at n_full: tiles below n_full are fully visible to every row of this query
        # tile and fully inside S (no mask at all); tiles in [n_full, n_end) are the causal diagonal and/or the
        # ragged last tile, masked. Row i sees key j iff j <= i + diag (causal, bottom-right aligned).
        diag = S - T
        s_full = S // BLOCK_N * BLOCK_N
        if CAUSAL:  # the last key each row sees: one compare per score in the masked loop
            last_key = tl.minimum(offs_m + diag, S - 1)
            n_end = tl.minimum(tl.maximum(start_m + BLOCK_M + diag, 0), S)
            n_full = tl.minimum(tl.maximum(start_m + diag + 1, 0) // BLOCK_N * BLOCK_N, s_full)
        else:
            n_end = S
            n_full = s_full
        for MASKED in tl.static_range(2):  # unrolled at compile time: two loops, MASKED a constexpr in each
            if MASKED:
                lo = n_full
                hi = n_end
            else:
                lo = 0
                hi = n_full
            for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
                cols = start_n + offs_n
                # K and V tiles (BLOCK_N, BLOCK_D); keys past S read as 0 and are masked below
                if TMA:
                    k = k_src.load([off_b, off_hk, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
                    v = v_src.load([off_b, off_hk, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
                else:
                    k_ptrs = k_base + cols[:, None] * stride_ks + offs_d[None, :] * stride_kd
                    v_ptrs = v_base + cols[:, None] * stride_vs + offs_d[None, :] * stride_vd
                    if MASKED:
                        kv_ok = (cols < S)[:, None] & d_ok[None, :]
                        k = tl.load(k_ptrs, mask=kv_ok, other=0.0)
                        v = tl.load(v_ptrs, mask=kv_ok, other=0.0)
                    elif HEAD_DIM == BLOCK_D:
                        k = tl.load(k_ptrs)
                        v = tl.load(v_ptrs)
                    else:
                        k = tl.load(k_ptrs, mask=d_ok[None, :], other=0.0)
                        v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
                if DOT_FP32:
                    k = k.to(tl.float32)
                    v = v.to(tl.float32)
                qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # (BLOCK_M, BLOCK_N), raw scores
                # scale > 0 (checked by the launcher), so max(qk) * qk_scale is the max of the scaled scores and
                # qk * qk_scale - m is one FFMA per score (a masked -inf stays -inf)
                if MASKED:
                    if CAUSAL:
                        qk = tl.where(cols[None, :] <= last_key[:, None], qk, float("-inf"))
                    else:
                        qk = tl.where((cols < S)[None, :], qk, float("-inf"))
                    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
                    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing seen yet: avoid inf - inf
                    p = tl.math.exp2(qk * qk_scale - m_use[:, None])
                    alpha = tl.math.exp2(m_i - m_use)
                else:
                    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
                    p = tl.math.exp2(qk * qk_scale - m_new[:, None])
                    alpha = tl.math.exp2(m_i - m_new)
                l_i = l_i * alpha + tl.sum(p, 1)
                acc = acc * alpha[:, None]
                acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
                m_i = m_new

        l_ok = l_i > 0.0  # False only for rows that attend nothing (causal, T > S)
        l_div = tl.where(l_ok, l_i, 1.0)
        o = acc * (1.0 / l_div)[:, None]  # rows that attend nothing: acc = 0 -> o = 0
        lse = tl.where(l_ok, (m_i + tl.math.log2(l_div)) * 0.6931471805599453, float("-inf"))
        if TMA:  # the descriptor clips rows past T
            o_dst.store([off_b, off_h, start_m, 0], o.to(o_dst.dtype).reshape(1, 1, BLOCK_M, BLOCK_D))
        else:
            tl.store(o_dst + off_b.to(tl.int64) * stride_ob + off_h.to(tl.int64) * stride_oh
                     + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od,
                     o.to(o_dst.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
        tl.store(lse_ptr + pid_bh.to(tl.int64) * T + offs_m, lse, mask=m_ok)

    def _attn_bwd_preprocess_kernel(  # type: ignore[no-untyped-def]  # Triton reads annotations: constexprs only
        o_ptr, do_ptr, lse_ptr, delta_ptr, lse2_ptr,
        stride_ob, stride_oh, stride_ot, stride_od,
        stride_dob, stride_doh, stride_dot, stride_dod,
        H, T,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    ):
        # delta = rowsum(o * do) and lse2 = lse * log2(e), both fp32 (B, H, T). lse2 is +inf for rows that attend
        # nothing (lse = -inf), so the backward's p = exp2(qk * qk_scale - lse2) is exactly 0 there.
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1).to(tl.int64)
        off_b = pid_bh // H
        off_h = pid_bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        m_ok = offs_m < T
        mask = m_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
        o = tl.load(o_ptr + off_b * stride_ob + off_h * stride_oh
                    + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od, mask=mask, other=0.0)
        do = tl.load(do_ptr + off_b * stride_dob + off_h * stride_doh
                     + offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod, mask=mask, other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        lse = tl.load(lse_ptr + pid_bh * T + offs_m, mask=m_ok, other=0.0)
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        tl.store(delta_ptr + pid_bh * T + offs_m, delta, mask=m_ok)
        tl.store(lse2_ptr + pid_bh * T + offs_m, lse2, mask=m_ok)

    def _attn_bwd_kv_step(  # type: ignore[no-untyped-def]  # Triton reads annotations: constexprs only
        dk, dv, k, v, start_m, offs_n,
        q_base, do_base, lse2_base, delta_base, dq_base,
        stride_qt, stride_qd, stride_dot, stride_dod, T, S, diag, qk_scale,
        MASKED: tl.constexpr, CAUSAL: tl.constexpr, ATOMIC_DQ: tl.constexpr,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
        DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    ):
        # One query tile (BLOCK_M rows) against the resident K/V tile (BLOCK_N keys): accumulate dk, dv (fp32,
        # unscaled dk) and, with ATOMIC_DQ, add this tile's dq (unscaled) into the fp32 buffer at dq_base.
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        m_ok = offs_m < T
        md_mask = m_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
        # q and do (BLOCK_M, BLOCK_D); the dots read their transposes as views of the same tiles
        q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd, mask=md_mask, other=0.0)
        do = tl.load(do_base + offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod, mask=md_mask, other=0.0)
        if DOT_FP32:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        # rows past T get lse2 = +inf, so their p (and ds) is exactly 0 without a mask
        lse2 = tl.load(lse2_base + offs_m, mask=m_ok, other=float("inf"))
        delta = tl.load(delta_base + offs_m, mask=m_ok, other=0.0)
        qkT = tl.dot(k, tl.trans(q), input_precision=PRECISION)  # (BLOCK_N, BLOCK_M) raw scores, transposed
        pT = tl.math.exp2(qkT * qk_scale - lse2[None, :])  # one FFMA + EX2 per score
        if MASKED:  # the causal diagonal, and keys past S in the last key tile
            keep = offs_n[:, None] < S
            if CAUSAL:
                keep = keep & (offs_n[:, None] <= offs_m[None, :] + diag)
            pT = tl.where(keep, pT, 0.0)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PRECISION)
        dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # (BLOCK_N, BLOCK_M)
        dsT = (pT * (dpT - delta[None, :])).to(q.dtype)
        dk = tl.dot(dsT, q, dk, input_precision=PRECISION)
        if ATOMIC_DQ:
            dq = tl.dot(tl.trans(dsT), k, input_precision=PRECISION)  # (BLOCK_M, BLOCK_D)
            tl.atomic_add(dq_base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], dq, mask=md_mask, sem="relaxed")
        return dk, dv

    def _attn_bwd_dkdv_kernel(  # type: ignore[no-untyped-def]  # Triton reads annotations: constexprs only
        q_ptr, k_ptr, v_ptr, do_ptr, lse2_ptr, delta_ptr, dk_ptr, dv_ptr, dq_acc_ptr,
        stride_qb, stride_qh, stride_qt, stride_qd,
        stride_kb, stride_kh, stride_ks, stride_kd,
        stride_vb, stride_vh, stride_vs, stride_vd,
        stride_dob, stride_doh, stride_dot, stride_dod,
        stride_dkb, stride_dkh, stride_dks, stride_dkd,
        stride_dvb, stride_dvh, stride_dvs, stride_dvd,
        H, H_KV, GROUP, T, S, scale, qk_scale,
        T_BUCKET, S_BUCKET,  # autotune keys only (powers of two), unused in the body
        CAUSAL: tl.constexpr, ATOMIC_DQ: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_bh = tl.program_id(1).to(tl.int64)
        off_b = pid_bh // H_KV
        off_hk = pid_bh % H_KV
        start_n = pid_n * BLOCK_N
        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        nd_mask = (offs_n < S)[:, None] & (offs_d < HEAD_DIM)[None, :]

        # K, V tiles (BLOCK_N, BLOCK_D), resident for the whole program
        k = tl.load(k_ptr + off_b * stride_kb + off_hk * stride_kh
                    + offs_n[:, None] * stride_ks + offs_d[None, :] * stride_kd, mask=nd_mask, other=0.0)
        v = tl.load(v_ptr + off_b * stride_vb + off_hk * stride_vh
                    + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd, mask=nd_mask, other=0.0)
        if DOT_FP32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        # Query tiles [lo, mid) need a mask, [mid, T) do not. Causal (row i sees key j iff j <= i + diag): rows
        # before lo see none of these keys; from mid on every row sees all of them. A key tile reaching past S
        # masks every query tile (its padded keys must not reach dq).
        diag = S - T
        if CAUSAL:
            lo = (tl.maximum(start_n - diag, 0) // BLOCK_M) * BLOCK_M
            mid = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - diag, 0), BLOCK_M) * BLOCK_M
            mid = tl.minimum(tl.maximum(mid, lo), T)
        else:
            lo = 0
            mid = 0
        if start_n + BLOCK_N > S:
            mid = T
        for g in range(0, GROUP):
            off_h = off_hk * GROUP + g
            q_base = q_ptr + off_b * stride_qb + off_h * stride_qh
            do_base = do_ptr + off_b * stride_dob + off_h * stride_doh
            row_base = (off_b * H + off_h) * T
            dq_base = dq_acc_ptr + row_base * HEAD_DIM
            for start_m in range(lo, mid, BLOCK_M):
                dk, dv = _attn_bwd_kv_step(
                    dk, dv, k, v, start_m, offs_n, q_base, do_base, lse2_ptr + row_base, delta_ptr + row_base,
                    dq_base, stride_qt, stride_qd, stride_dot, stride_dod, T, S, diag, qk_scale,
                    True, CAUSAL, ATOMIC_DQ, HEAD_DIM, BLOCK_D, BLOCK_M, DOT_FP32, PRECISION)
            for start_m in range(mid, T, BLOCK_M):  # steady state: no mask
                dk, dv = _attn_bwd_kv_step(
                    dk, dv, k, v, start_m, offs_n, q_base, do_base, lse2_ptr + row_base, delta_ptr + row_base,
                    dq_base, stride_qt, stride_qd, stride_dot, stride_dod, T, S, diag, qk_scale,
                    False, CAUSAL, ATOMIC_DQ, HEAD_DIM, BLOCK_D, BLOCK_M, DOT_FP32, PRECISION)
        dk = dk * scale
        tl.store(dk_ptr + off_b * stride_dkb + off_hk * stride_dkh
                 + offs_n[:, None] * stride_dks + offs_d[None, :] * stride_dkd,
                 dk.to(dk_ptr.dtype.element_ty), mask=nd_mask)
        tl.store(dv_ptr + off_b * stride_dvb + off_hk * stride_dvh
                 + offs_n[:, None] * stride_dvs + offs_d[None, :] * stride_dvd,
                 dv.to(dv_ptr.dtype.element_ty), mask=nd_mask)

    def _attn_bwd_q_step(  # type: ignore[no-untyped-def]  # Triton reads annotations: constexprs only
        dq, q, do, lse2, delta, start_n, offs_m, k_base, v_base,
        stride_ks, stride_kd, stride_vs, stride_vd, S, diag, qk_scale,
        MASKED: tl.constexpr, CAUSAL: tl.constexpr,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
        DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    ):
        # One key tile (BLOCK_N keys) against the resident query tile: accumulate dq (fp32, unscaled).
        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        nd_mask = (offs_n < S)[:, None] & (offs_d < HEAD_DIM)[None, :]
        k = tl.load(k_base + offs_n[:, None] * stride_ks + offs_d[None, :] * stride_kd, mask=nd_mask, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd, mask=nd_mask, other=0.0)
        if DOT_FP32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # (BLOCK_M, BLOCK_N)
        p = tl.math.exp2(qk * qk_scale - lse2[:, None])
        if MASKED:
            keep = offs_n[None, :] < S
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m[:, None] + diag)
            p = tl.where(keep, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = (p * (dp - delta[:, None])).to(k.dtype)
        return tl.dot(ds, k, dq, input_precision=PRECISION)

    def _attn_bwd_dq_kernel(  # type: ignore[no-untyped-def]  # Triton reads annotations: constexprs only
        q_ptr, k_ptr, v_ptr, do_ptr, lse2_ptr, delta_ptr, dq_ptr,
        stride_qb, stride_qh, stride_qt, stride_qd,
        stride_kb, stride_kh, stride_ks, stride_kd,
        stride_vb, stride_vh, stride_vs, stride_vd,
        stride_dob, stride_doh, stride_dot, stride_dod,
        stride_dqb, stride_dqh, stride_dqt, stride_dqd,
        H, GROUP, T, S, scale, qk_scale,
        T_BUCKET, S_BUCKET,  # autotune keys only (powers of two), unused in the body
        CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1).to(tl.int64)
        off_b = pid_bh // H
        off_h = pid_bh % H
        off_hk = off_h // GROUP
        start_m = pid_m * BLOCK_M
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        m_ok = offs_m < T
        md_mask = m_ok[:, None] & (offs_d < HEAD_DIM)[None, :]

        # q, do tiles (BLOCK_M, BLOCK_D), resident
        q = tl.load(q_ptr + off_b * stride_qb + off_h * stride_qh
                    + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd, mask=md_mask, other=0.0)
        do = tl.load(do_ptr + off_b * stride_dob + off_h * stride_doh
                     + offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod, mask=md_mask, other=0.0)
        if DOT_FP32:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        lse2 = tl.load(lse2_ptr + pid_bh * T + offs_m, mask=m_ok, other=float("inf"))
        delta = tl.load(delta_ptr + pid_bh * T + offs_m, mask=m_ok, other=0.0)
        k_base = k_ptr + off_b * stride_kb + off_hk * stride_kh
        v_base = v_ptr + off_b * stride_vb + off_hk * stride_vh
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        # Key tiles [0, mid) are seen by every row of this tile and lie inside S: no mask. [mid, hi) are masked.
        diag = S - T
        if CAUSAL:
            hi = tl.minimum(S, tl.maximum(start_m + BLOCK_M + diag, 0))
            mid = tl.minimum((tl.maximum(start_m + diag + 1, 0) // BLOCK_N) * BLOCK_N, (S // BLOCK_N) * BLOCK_N)
        else:
            hi = S
            mid = (S // BLOCK_N) * BLOCK_N
        for start_n in range(0, mid, BLOCK_N):  # steady state: no mask
            dq = _attn_bwd_q_step(dq, q, do, lse2, delta, start_n, offs_m, k_base, v_base,
                                  stride_ks, stride_kd, stride_vs, stride_vd, S, diag, qk_scale,
                                  False, CAUSAL, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_FP32, PRECISION)
        for start_n in range(mid, hi, BLOCK_N):
            dq = _attn_bwd_q_step(dq, q, do, lse2, delta, start_n, offs_m, k_base, v_base,
                                  stride_ks, stride_kd, stride_vs, stride_vd, S, diag, qk_scale,
                                  True, CAUSAL, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_FP32, PRECISION)
        dq = dq * scale
        tl.store(dq_ptr + off_b * stride_dqb + off_h * stride_dqh
                 + offs_m[:, None] * stride_dqt + offs_d[None, :] * stride_dqd,
                 dq.to(dq_ptr.dtype.element_ty), mask=md_mask)


# Autotune lists for Hopper (BLOCK_M 64/128, BLOCK_N 32/64/128, 4/8 warps, 2-4 stages), (BLOCK_M, BLOCK_N, num_warps,
# num_stages); BLOCK_M tiles queries, BLOCK_N keys. Kept short on purpose: every config is compiled per (head dim,
# causal, dtype), and compiling one takes seconds (bf16, D = 128: ~5-15 s on a 2-core VM; fp32 IEEE dots far longer).
# Forward: (BLOCK_M, BLOCK_N, num_warps, num_stages, warp_specialize), chosen from sm_90a compiles (fp16/bf16 on
# the TMA path: 107-199 registers at D 64-128, no spills). Pruned per launch by the shared memory the compiled
# kernel uses (SMEM_ESTIMATES).
# warp_specialize stays off: in Triton 3.9 Hopper's warp-specialization pass ignores these 8-warp loops (same SASS)
# and fails to compile the 4-warp ones ("descriptor block and tensor must have the same number of elements"), as it
# does for a minimal tutorial-style loop with 2-d descriptors.
_FWD_CONFIGS = [(128, 64, 8, 3, False), (128, 64, 8, 2, False), (128, 128, 8, 2, False), (128, 128, 8, 3, False),
                (64, 64, 4, 3, False)]
_AUTOTUNE_KEY = ["T_BUCKET", "S_BUCKET", "HEAD_DIM", "CAUSAL", "DOT_FP32", "PRECISION"]
_TINY_PROBLEM = 512 * 512  # T_BUCKET * S_BUCKET at or below this: no benchmarking, first fitting config


_FWD_AUTOTUNE_KEY = _AUTOTUNE_KEY + ["TMA"]
_FWD_FALLBACK_CONFIG = (64, 32, 4, 2, False)  # fits shared memory for every supported dtype and head dim
# fp32 inputs run IEEE FMA dots (no tensor cores), whose operands live in registers: at D = 128 every 16-bit
# config spills tens of KB (64 x 32 / 4 warps: 32 KB); 32 x 32 tiles spill 1.7 KB. Correctness path, not speed.
_FWD_FP32_CONFIG = (32, 32, 4, 2, False)
_SMEM_LIMIT = 227 * 1024  # the most dynamic shared memory one block may use on an H100/H200


def _fwd_block_shapes(nargs: dict[str, Any]) -> None:
    """Autotune pre_hook: give the TMA descriptors this config's box (the block shape is part of the compiled
    signature, so it must be set before the launch binds the arguments)."""
    if nargs.get("TMA"):
        for name, rows in (("q_src", "BLOCK_M"), ("o_dst", "BLOCK_M"), ("k_src", "BLOCK_N"), ("v_src", "BLOCK_N")):
            nargs[name].block_shape = [1, 1, nargs[rows], nargs["BLOCK_D"]]


def _fwd_configs(entries=None):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "WARP_SPECIALIZE": ws}, num_warps=w, num_stages=s,
                          pre_hook=_fwd_block_shapes)
            for m, n, w, s, ws in (entries or _FWD_CONFIGS)]


def _fwd_smem_bytes(named_args: dict[str, Any], config: Any) -> int:
    """Shared memory the compiled forward uses (an upper bound, checked against sm_90a compiles of every config
    at D 64/128, fp16/bf16/fp32): the q tile, num_stages buffers of K and V tiles, and the layout-conversion
    scratch of the epilogue/reductions, which never exceeds one BLOCK_M x BLOCK_D fp32 tile's share."""
    elem = named_args["q_src"].element_size() if isinstance(named_args["q_src"], Tensor) \
        else named_args["q_src"].base.element_size()
    bm, bn, bd = named_args["BLOCK_M"], named_args["BLOCK_N"], named_args["BLOCK_D"]
    stages = max(config.num_stages, 1)
    return elem * bd * (bm + 2 * bn * stages) + 1024


def _prune_fwd_configs(configs, named_args, **kwargs):
    """Keep the forward configs whose compiled shared memory fits the 227 KB a Hopper block may use, and on the
    pointer path only tiles up to 128 x 64 (its per-element addresses take 255 registers and spill at 128 x 128);
    fp32 inputs get one small-tile config (_FWD_FP32_CONFIG);
    prefer BLOCK_M = 64 for short query blocks (decode); skip benchmarking entirely for tiny problems."""
    t, s = named_args["T_BUCKET"], named_args["S_BUCKET"]
    if kwargs.get("PRECISION") == "ieee":
        return _fwd_configs([_FWD_FP32_CONFIG])
    est = SMEM_ESTIMATES["_attn_fwd_kernel"]

    def fits(c):
        small = c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 128 * 64
        return est({**named_args, **kwargs, **c.all_kwargs()}, c) <= _SMEM_LIMIT and (kwargs.get("TMA") or small)

    kept = [c for c in configs if fits(c)] or _fwd_configs([_FWD_FALLBACK_CONFIG])
    if t <= 64:
        kept = [c for c in kept if c.kwargs["BLOCK_M"] == 64] or kept
    if t * s <= _TINY_PROBLEM:
        kept = kept[:1]
    return kept


def _jit_with_helpers(jit: Any, fn: Any, **helpers: Any) -> Any:
    """jit(fn), with the given jitted helpers bound to their names in the kernel's globals. The helpers' plain
    module-level functions stay undecorated (kernels are decorated lazily), so the kernel gets its own scope."""
    scope = {**fn.__globals__, **helpers}
    bound = types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__, fn.__closure__)
    for attr in ("__module__", "__qualname__", "__doc__", "__annotations__", "__kwdefaults__"):
        setattr(bound, attr, getattr(fn, attr))  # Triton reads the constexpr annotations
    return jit(bound)


# Backward autotune lists, (BLOCK_M, BLOCK_N, num_warps, num_stages, maxnreg). The dk/dv(+dq) kernel keeps 128-key
# K/V tiles resident and streams 32-row query tiles: at D = 128 its fp32 dk, dv accumulators alone take 128 of the
# 232 registers a thread may use (2 warpgroups, 256 threads), so 64-row query tiles spill (measured: 255 registers,
# 200+ bytes of spills). maxnreg=232 caps ptxas (it lands at 224-228 registers, no spills; uncapped it picks 234-236).
# The separate dq kernel (deterministic=True) keeps q/do/dq resident and streams key tiles.
_BWD_DKDV_CONFIGS = [(32, 128, 8, 2, 232), (32, 128, 8, 3, 232)]
_BWD_DQ_CONFIGS = [(128, 32, 8, 2, 232), (128, 64, 8, 2, 232)]
_BWD_FALLBACK_CONFIG = (32, 32, 4, 1, None)  # fits shared memory for fp32 at D = 128
_BWD_AUTOTUNE_KEY = _AUTOTUNE_KEY


def _bwd_configs(entries):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s, maxnreg=r)
            for m, n, w, s, r in entries]


def _dkdv_smem(named_args: dict, config: Any) -> int:
    """Shared memory of _attn_bwd_dkdv_kernel: resident K and V, `num_stages` buffers of the q and do tiles and,
    with ATOMIC_DQ, a second copy of K in the layout of the dq dot plus the transposed ds tile (measured on sm_90a:
    exact to the byte for bf16/fp16 up to the 256-byte barrier area, covered by the slack)."""
    elem = named_args["q_ptr"].element_size()
    m, n, d = named_args["BLOCK_M"], named_args["BLOCK_N"], named_args["BLOCK_D"]
    smem = elem * d * (2 * n + 2 * m * config.num_stages)
    if named_args.get("ATOMIC_DQ", True):
        smem += elem * (d * n + m * n)
    return smem + 1024


def _dq_smem(named_args: dict, config: Any) -> int:
    """Shared memory of _attn_bwd_dq_kernel: resident q and do, `num_stages` buffers of the K and V tiles."""
    elem = named_args["q_ptr"].element_size()
    m, n, d = named_args["BLOCK_M"], named_args["BLOCK_N"], named_args["BLOCK_D"]
    return elem * d * (2 * m + 2 * n * config.num_stages) + 1024


# Shared memory each autotuned kernel is assumed to use, by kernel name: (launch args by name merged with the
# config's kwargs, config) -> bytes. Pruning uses the same functions; the budget tests check them against compiles.
SMEM_ESTIMATES: dict[str, Callable[[dict[str, Any], Any], int]] = {
    "_attn_fwd_kernel": _fwd_smem_bytes,
    "_attn_bwd_dkdv_kernel": _dkdv_smem,
    "_attn_bwd_dq_kernel": _dq_smem,
}


def _prune_bwd_configs(name, configs, named_args, **kwargs):
    """Keep the configs of kernel `name` whose estimated shared memory fits a block (fp32 inputs at D = 128 fall
    back to small tiles); tiny problems take the first fitting config without benchmarking."""
    est = SMEM_ESTIMATES[name]
    kept = [c for c in configs if est({**named_args, **kwargs, **c.all_kwargs()}, c) <= _SMEM_LIMIT]
    kept = kept or _bwd_configs([_BWD_FALLBACK_CONFIG])
    if named_args["T_BUCKET"] * named_args["S_BUCKET"] <= _TINY_PROBLEM:
        kept = kept[:1]
    return kept


@functools.cache
def _kernels(interpret: bool) -> tuple[Any, Any, Any, Any]:
    """Decorate the kernels (once per mode). `interpret` is `interpreting()` at the call: Triton reads
    TRITON_INTERPRET when `triton.jit` runs, so this happens lazily, never at import."""
    jit = triton.jit
    fwd = jit(_attn_fwd_kernel)
    dkdv = _jit_with_helpers(jit, _attn_bwd_dkdv_kernel, _attn_bwd_kv_step=jit(_attn_bwd_kv_step))
    dq = _jit_with_helpers(jit, _attn_bwd_dq_kernel, _attn_bwd_q_step=jit(_attn_bwd_q_step))
    pre = jit(_attn_bwd_preprocess_kernel)
    if not interpret:
        fwd = triton.autotune(_fwd_configs(), key=_FWD_AUTOTUNE_KEY,
                              prune_configs_by={"early_config_prune": _prune_fwd_configs})(fwd)
        tune_bwd = lambda cfgs, name, key: triton.autotune(  # noqa: E731
            _bwd_configs(cfgs), key=key,
            prune_configs_by={"early_config_prune": functools.partial(_prune_bwd_configs, name)})
        dkdv = tune_bwd(_BWD_DKDV_CONFIGS, "_attn_bwd_dkdv_kernel", _BWD_AUTOTUNE_KEY + ["ATOMIC_DQ"])(dkdv)
        dq = tune_bwd(_BWD_DQ_CONFIGS, "_attn_bwd_dq_kernel", _BWD_AUTOTUNE_KEY)(dq)
    return fwd, dkdv, dq, pre


# ---------------------------------------------------------------------------------------------------------------
# 2. Launchers: tensors in, tensors out, no autograd.
# ---------------------------------------------------------------------------------------------------------------
def _launch_params(q: Tensor, T: int, S: int) -> tuple[bool, dict[str, Any], tuple[int, int]]:
    """(interpreting?, the constexprs every kernel takes, the power-of-two autotune buckets of T and S)."""
    interpret = interpreting()
    D = q.shape[-1]
    block_d = max(16, triton.next_power_of_2(D))
    dot_fp32 = interpret and q.dtype == torch.bfloat16  # interpreter bf16 tl.dot returns garbage
    precision = "ieee" if q.dtype == torch.float32 else "tf32"  # "tf32" is ignored for fp16/bf16 operands
    common = dict(HEAD_DIM=D, BLOCK_D=block_d, DOT_FP32=dot_fp32, PRECISION=precision)
    if interpret:
        common.update(BLOCK_M=INTERPRET_BLOCK_M, BLOCK_N=INTERPRET_BLOCK_N)
    buckets = (triton.next_power_of_2(max(T, 1)), triton.next_power_of_2(max(S, 1)))
    return interpret, common, buckets


def _check_triton_inputs(q: Tensor, k: Tensor, v: Tensor) -> None:
    if triton is None:
        raise RuntimeError("triton is not installed (pip install triton, or use CPU tensors for the reference)")
    if q.dtype not in _TRITON_DTYPES or q.shape[-1] > _MAX_HEAD_DIM:
        raise ValueError(f"Triton attention supports fp16/bf16/fp32 and head dim <= {_MAX_HEAD_DIM}, "
                         f"got {q.dtype} and D={q.shape[-1]}")


def _tma_ok(*tensors: Tensor) -> bool:
    """TMA descriptors need 16-bit elements here (wgmma dots; fp32 IEEE dots gain nothing), a contiguous last dim
    that is a power of two (no padding in the box), 16-byte aligned base and strides, and no empty dimension."""
    return all(t.dtype in (torch.float16, torch.bfloat16) and t.stride(-1) == 1 and t.shape[-1] >= 16
               and t.shape[-1] & (t.shape[-1] - 1) == 0 and t.data_ptr() % 16 == 0 and min(t.shape) > 0
               and all(st * t.element_size() % 16 == 0 for st in t.stride()[:-1]) for t in tensors)


def attention_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    """Triton forward. q (B, H, T, D), k/v (B, H_kv, S, D) -> o (B, H, T, D) in q.dtype, lse (B, H, T) fp32."""
    if use_flash_decoding(q, k):  # few new tokens, long KV, small B * H_kv: split the KV length (flash_decoding.py)
        return flash_decoding_forward(q, k, v, causal, scale)
    _check_triton_inputs(q, k, v)
    B, H, T, D = q.shape
    H_kv, S = k.shape[1], k.shape[2]
    if scale <= 0:  # the kernel takes the row max before scaling, which needs scale > 0
        return _attention_fwd_ref(q, k, v, causal, scale)
    o = _new_empty((B, H, T, D), dtype=q.dtype, device=q.device)  # (B, H, T, D)
    lse = _new_empty((B, H, T), dtype=torch.float32, device=q.device)  # (B, H, T)
    if o.numel() == 0:
        return o, lse
    interpret, common, (t_bucket, s_bucket) = _launch_params(q, T, S)
    fwd, _, _, _ = _kernels(interpret)
    tma = _tma_ok(q, k, v, o)
    srcs: tuple[Any, ...] = (q, k, v, o)
    if tma:  # 4-d descriptors: out-of-range rows of a (b, h) slice read as 0 and are never written
        from triton.tools.tensor_descriptor import TensorDescriptor

        # the box is set per autotune config by _fwd_block_shapes; the interpreter's fixed one is set here
        bm, bn = (INTERPRET_BLOCK_M, INTERPRET_BLOCK_N) if interpret else (16, 16)
        srcs = tuple(TensorDescriptor(x, list(x.shape), list(x.stride()), [1, 1, rows, common["BLOCK_D"]])
                     for x, rows in ((q, bm), (k, bn), (v, bn), (o, bm)))
    extra = dict(WARP_SPECIALIZE=False) if interpret else {}
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H)  # noqa: E731
    fwd[grid](
        *srcs, lse,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(),
        H, H // H_kv, T, S, scale * _LOG2E, t_bucket, s_bucket,
        CAUSAL=causal, TMA=tma, **common, **extra,
    )
    return o, lse


def attention_backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
                       causal: bool, scale: float, *, deterministic: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Triton backward: (dq, dk, dv) shaped like (q, k, v); grouped heads' dk/dv summed over their group.

    Default: one pass over K/V tiles computing dk, dv and adding dq into an fp32 buffer with atomic adds (five
    matmuls per tile; dq's bits depend on the order the adds land). deterministic=True computes dq in a separate
    kernel instead (seven matmuls per tile pair, bitwise reproducible)."""
    _check_triton_inputs(q, k, v)
    B, H, T, D = q.shape
    H_kv, S = k.shape[1], k.shape[2]
    lse = lse.contiguous()
    dq = _new_empty(q.shape, dtype=q.dtype, device=q.device)  # (B, H, T, D)
    dk = _new_empty(k.shape, dtype=k.dtype, device=k.device)  # (B, H_kv, S, D)
    dv = _new_empty(v.shape, dtype=v.dtype, device=v.device)  # (B, H_kv, S, D)
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    interpret, common, (t_bucket, s_bucket) = _launch_params(q, T, S)
    _, dkdv_kernel, dq_kernel, pre = _kernels(interpret)
    delta = _new_empty((B, H, T), dtype=torch.float32, device=q.device)  # (B, H, T)
    lse2 = _new_empty((B, H, T), dtype=torch.float32, device=q.device)  # (B, H, T), log2 units
    pre_block = 64
    pre[(triton.cdiv(T, pre_block), B * H)](
        o, do, lse, delta, lse2, *o.stride(), *do.stride(), H, T,
        HEAD_DIM=D, BLOCK_D=common["BLOCK_D"], BLOCK_M=pre_block,
    )
    atomic = not deterministic
    # fp32 dq accumulator (B, H, T, D) for the atomic path (unscaled); a 1-element dummy otherwise
    dq_acc = torch.zeros((B, H, T, D) if atomic else (1,), dtype=torch.float32, device=q.device)
    dkdv_kernel[lambda meta: (triton.cdiv(S, meta["BLOCK_N"]), B * H_kv)](
        q, k, v, do, lse2, delta, dk, dv, dq_acc,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
        H, H_kv, H // H_kv, T, S, scale, scale * _LOG2E, t_bucket, s_bucket,
        CAUSAL=causal, ATOMIC_DQ=atomic, **common,
    )
    if atomic:
        dq.copy_(dq_acc.mul_(scale))
    else:
        dq_kernel[lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H)](
            q, k, v, do, lse2, delta, dq,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
            H, H // H_kv, T, S, scale, scale * _LOG2E, t_bucket, s_bucket,
            CAUSAL=causal, **common,
        )
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------------------------
# Reference pieces used by the op on CPU (and as the ground truth in tests).
# ---------------------------------------------------------------------------------------------------------------
def _keep_mask(T: int, S: int, causal: bool, attn_mask: Optional[Tensor], device: Device) -> Optional[Tensor]:
    """Bool mask broadcastable to (B, H, T, S), True = attend; None = attend everything."""
    keep = None
    if causal:
        i = torch.arange(T, device=device)[:, None]
        j = torch.arange(S, device=device)[None, :]
        keep = j <= i + (S - T)  # (T, S), bottom-right aligned
    if attn_mask is not None:
        keep = attn_mask if keep is None else (attn_mask & keep)
    return keep


def _expand_kv(x: Tensor, H: int) -> Tensor:
    # (B, H_kv, S, D) -> (B, H, S, D)
    return x if x.shape[1] == H else x.repeat_interleave(H // x.shape[1], dim=1)


def _scores(q: Tensor, k: Tensor, causal: bool, scale: float,
            attn_mask: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
    """Masked scores (B, H, T, S) in q's dtype (already upcast by the caller) and the keep mask."""
    T, S = q.shape[2], k.shape[2]
    s = torch.matmul(q, _expand_kv(k, q.shape[1]).transpose(-2, -1)) * scale  # (B, H, T, S)
    keep = _keep_mask(T, S, causal, attn_mask, q.device)
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    return s, keep


def _safe_softmax(s: Tensor) -> tuple[Tensor, Tensor]:
    """softmax over the last dim with all -inf rows -> 0 (not NaN); also returns lse (-inf for those rows)."""
    m = s.amax(dim=-1, keepdim=True).detach()
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    e = torch.exp(s - m)
    l = e.sum(dim=-1, keepdim=True)  # noqa: E741
    p = e / torch.where(l == 0, torch.ones_like(l), l)
    lse = (torch.log(l) + m).squeeze(-1)  # log(0) = -inf for rows that attend nothing
    return p, lse


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)  # fp16/bf16 -> fp32; fp32 and fp64 stay


def attention_ref(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True, scale: Optional[float] = None,
                  attn_mask: Optional[Tensor] = None) -> Tensor:
    """Plain-PyTorch attention with the same semantics as `attention` (differentiable, exportable).

    Materialises the (B, H, T, S) scores; computes in fp32 for fp16/bf16 inputs (float64 stays float64) and returns
    the input dtype. attn_mask: optional bool tensor broadcastable to (B, H, T, S), True = attend; combined with the
    causal mask. Rows that attend nothing give 0.
    """
    _check_shapes(q, k, v)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    ct = _compute_dtype(q.dtype)
    s, _ = _scores(q.to(ct), k.to(ct), causal, scale, attn_mask)
    p, _ = _safe_softmax(s)
    o = torch.matmul(p, _expand_kv(v.to(ct), q.shape[1]))  # (B, H, T, D)
    return o.to(q.dtype)


def _attention_fwd_ref(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    ct = _compute_dtype(q.dtype)
    s, _ = _scores(q.to(ct), k.to(ct), causal, scale, None)
    p, lse = _safe_softmax(s)
    o = torch.matmul(p, _expand_kv(v.to(ct), q.shape[1]))
    return o.to(q.dtype).contiguous(), lse.float().contiguous()


def _attention_bwd_ref(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
                       causal: bool, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """The backward formulas of the kernels, in plain PyTorch (p recomputed from lse)."""
    B, H, T, D = q.shape
    H_kv, S = k.shape[1], k.shape[2]
    ct = _compute_dtype(q.dtype)
    qf, kf, vf, dof = q.to(ct), k.to(ct), v.to(ct), do.to(ct)
    s, keep = _scores(qf, kf, causal, scale, None)
    lse = lse.to(ct)[..., None]
    p = torch.exp(s - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse))
    if keep is not None:
        p = torch.where(keep, p, torch.zeros_like(p))  # (B, H, T, S)
    delta = (o.to(ct) * dof).sum(-1, keepdim=True)  # (B, H, T, 1)
    dp = torch.matmul(dof, _expand_kv(vf, H).transpose(-2, -1))
    ds = p * (dp - delta)
    dq = torch.matmul(ds, _expand_kv(kf, H)) * scale
    G = H // H_kv
    dk = (torch.matmul(ds.transpose(-2, -1), qf) * scale).view(B, H_kv, G, S, D).sum(2)
    dv = torch.matmul(p.transpose(-2, -1), dof).view(B, H_kv, G, S, D).sum(2)
    return dq.to(q.dtype).contiguous(), dk.to(k.dtype).contiguous(), dv.to(v.dtype).contiguous()


# ---------------------------------------------------------------------------------------------------------------
# 3. torch.library ops (traceable by torch.compile / torch.export; exported to ONNX via kernels/onnx.py)
# ---------------------------------------------------------------------------------------------------------------
def _runs_triton(q: Tensor) -> bool:
    return use_triton(q) and q.dtype in _TRITON_DTYPES and q.shape[-1] <= _MAX_HEAD_DIM


@torch.library.custom_op("hotpath::attention_fwd", mutates_args=())
def attention_fwd_op(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    """(o (B, H, T, D) in q.dtype, lse (B, H, T) fp32)."""
    if _runs_triton(q):
        return attention_forward(q, k, v, causal, scale)
    return _attention_fwd_ref(q, k, v, causal, scale)


@attention_fwd_op.register_fake
def _attention_fwd_fake(q, k, v, causal, scale):
    B, H, T, D = q.shape
    return q.new_empty((B, H, T, D)), q.new_empty((B, H, T), dtype=torch.float32)


@torch.library.custom_op("hotpath::attention_bwd", mutates_args=())
def attention_bwd_op(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
                     causal: bool, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    if _runs_triton(q):
        return attention_backward(do, q, k, v, o, lse, causal, scale)
    return _attention_bwd_ref(do, q, k, v, o, lse, causal, scale)


@attention_bwd_op.register_fake
def _attention_bwd_fake(do, q, k, v, o, lse, causal, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _attention_setup_context(ctx, inputs, output):
    q, k, v, causal, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.causal = causal
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def _attention_backward_autograd(ctx, do, dlse):
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = attention_bwd_op(do.contiguous(), q, k, v, o, lse, ctx.causal, ctx.scale)
    return dq, dk, dv, None, None


attention_fwd_op.register_autograd(_attention_backward_autograd, setup_context=_attention_setup_context)


# ---------------------------------------------------------------------------------------------------------------
# 4. Public functional API
# ---------------------------------------------------------------------------------------------------------------
def _check_shapes(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"expected q (B, H, T, D), k/v (B, H_kv, S, D); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, H, T, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k and v must be (B={B}, H_kv, S, D={D}); got {tuple(k.shape)} and {tuple(v.shape)}")
    H_kv = k.shape[1]
    if H_kv == 0 or H % H_kv != 0:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({H_kv})")
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        raise ValueError("q, k, v must share dtype and device")


def attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True, scale: Optional[float] = None,
              attn_mask: Optional[Tensor] = None) -> Tensor:
    """Fused attention. q (B, H, T, D), k/v (B, H_kv, S, D), H % H_kv == 0 -> (B, H, T, D) in q's dtype.

    causal: bottom-right aligned (query i attends key j iff j <= i + S - T; rows attending nothing give 0).
    scale: defaults to 1/sqrt(D). attn_mask: optional bool (B or 1, 1, T, S), True = attend; when given, the
    plain-PyTorch reference runs (masks are not fused). Differentiable in q, k, v.

    Matches the model's `attn_fn(q, k, v, *, causal, attn_mask, scale)` hook signature.
    """
    _check_shapes(q, k, v)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if attn_mask is not None:
        return attention_ref(q, k, v, causal=causal, scale=scale, attn_mask=attn_mask)
    o, _ = attention_fwd_op(q, k, v, bool(causal), float(scale))
    return o
