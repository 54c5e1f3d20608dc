"""Row softmax over the last dimension, with fused scaling and an optional causal mask; forward and backward.

Math (per row ``x`` of length N, fp32 arithmetic whatever the input dtype)::

    z_j = scale * x_j          if column j is visible, else -inf
    y_j = exp(z_j - m) / sum_k exp(z_k - m),     m = max_k z_k
    dx_j = scale * y_j * (dy_j - sum_k dy_k * y_k)          (backward, from the saved output y)

Causal mask: for ``x`` of shape (..., T, S) query row i sees column j iff ``j <= i + S - T`` (bottom-right
aligned, as with a KV cache; T == S is the usual lower triangle). A row that sees nothing (T > S, top rows), or a
row whose visible entries are all -inf, returns zeros and a zero gradient instead of torch's NaN.

Memory traffic per element, with b = bytes of the input dtype:
- forward: read x once, write y once (2b), when the row fits one block (N <= 32768 columns; causal: 16384).
  Longer rows take the online path: one pass over 8192-column chunks (fp32: 4096) keeps a running max and a
  rescaled running sum (Milakov & Gimelshein, "Online normalizer calculation for softmax"), a second pass re-reads
  x and writes y (3b, but the re-read of the row the program has just streamed should hit L2: one program per SM,
  so 132 rows are in flight, 17 MB of 64k-column bf16 rows against the H100's 50 MB L2; rows of ~100k columns
  and more would re-read from memory).
- backward: read y and dy, write dx (3b) for rows up to 16384 columns; longer rows re-read y and dy (5b, L2:
  34 MB in flight for 32k-column fp32 rows).
- causal rows skip the loads of masked columns (they are written as zeros).

Design (GPU speed is a static prediction from sm_90a compiles, never measured here):
- Persistent grid: as many programs as are resident at once (SMs x programs per SM; the SM count from
  torch.cuda for CUDA tensors, 132 otherwise, so a launch recorded with CPU tensors is the H100 / H200 one), each
  looping over row tiles p, p + P, ... with ``tl.range(num_stages=3)``: Triton stages the next two tiles' loads in
  shared memory with 16-byte cp.async, so they stream in while this tile reduces. More programs than fit would run
  as a second wave (a tail where most SMs idle), so the launcher's programs-per-SM figure is checked against the
  compiled registers and shared memory (tests/kernels/test_softmax.py).
- A tile holds ``_EPT`` = 32 fp32 values per thread (backward: 16 of y and 16 of dy): one warp per 1024 values,
  so a 1k row is one warp (reductions by shuffles only) and 32k rows take 32 warps. Short rows share a tile
  (``ROWS`` x ``BLOCK``, e.g. 16 rows of 64). Every one-block config compiles to <= 64 registers, so 1024 threads
  of tiles fit an SM: 32 / num_warps programs per SM (two at 16k columns for the forward). Per-element masks (causal,
  rows not 16-divisible) make ptxas keep a column index per element in a register, so those tiles hold half as many
  values (the causal forward at 16k: one 32-warp program per SM). The backward at 16k is one 32-warp program per
  SM too: 16k fp32 pairs of (y, dy) are half the register file.
- Pipeline buffers (two tiles) take shared memory; where they do not fit the programs per SM, fewer programs run
  pipelined if at least two still fit, else the loop runs unpipelined and the second program on the SM overlaps
  (fp32 forward at 16k-32k, fp32 backward at 8k-16k).
- exp2(x * scale * log2(e) - m) is one FFMA: the max is taken on the unscaled x (scale < 0 negates x, a
  constexpr; scale == 0 runs softmax(zeros)). The backward is dx = y * (scale * dy - scale * s): FFMA + multiply.
- Rows with N == BLOCK and no causal mask load and store without column masks; other rows load masked-off columns
  as -inf (the causal ``where`` only covers the 16-column rounding of the load bound).
- The backward saves the output y, not x: y is usually kept anyway, and dx needs only y and dy, never the mask.

Layering (see DESIGN.md): ``_softmax_*_kernel`` (Triton, built on first use) -> ``softmax_forward`` /
``softmax_backward`` launchers -> ``hotpath::softmax`` / ``hotpath::softmax_backward`` custom ops (fake
kernels + autograd, so torch.compile / torch.export / ONNX export trace them) -> ``softmax`` and ``softmax_ref``.
Dispatch by ``kernels._dispatch.use_triton``: CUDA -> compiled Triton, CPU -> ``softmax_ref`` unless
TRITON_INTERPRET=1, then the Triton kernels run in Triton's interpreter.
"""
from __future__ import annotations

import functools
from types import SimpleNamespace
from typing import NamedTuple

import torch
from torch.types import Device

from ._dispatch import interpreting, sm_count, use_triton

__all__ = ["softmax", "softmax_ref", "softmax_backward_ref", "softmax_forward", "softmax_backward"]

_MAX_BLOCK = 32768  # rows up to this length run in one block (backward and causal forward: half as long)
_ONLINE_BLOCK = 8192  # chunk of the online (two-pass) path for longer rows (16-bit; 32-bit: half)
_EPT = 32  # fp32 values per thread in a tile (forward: of x; backward: of y and dy together)
_REGS = 64  # registers per thread every one-block config fits in (so 1024 threads of tiles fit an SM)
_SMEM_PER_SM = 228 * 1024  # H100 / H200 shared memory per SM
_CTA_SMEM_OVERHEAD = 2048  # per program: 1 KB the driver reserves, <= 1 KB of reduction scratch
_MAX_PROGRAMS: int | None = None  # cap on the persistent grid (tests set it small: several tiles per program)
_LOG2E = 1.4426950408889634
# Output allocator used by the launchers; tests replace it with a NaN-filling one ("poisoned outputs").
_new_empty = torch.empty


try:  # Triton is optional: without it every path is the reference.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only on machines without triton
    triton = None
    tl = None


# ---------------------------------------------------------------------------------------------------------------
# 1. Triton kernels (plain functions here; decorated with triton.jit on first use, see _kernels()).
# ---------------------------------------------------------------------------------------------------------------
if tl is not None:

    def _softmax_fwd_kernel(  # type: ignore[no-untyped-def]  # Triton reads annotations: constexprs only
        x_ptr, y_ptr, stride_x, stride_y, n_rows, N, T, scale_log2e,
        CAUSAL: tl.constexpr, MASK_COLS: tl.constexpr, NEG: tl.constexpr, EVEN_N: tl.constexpr,
        BLOCK: tl.constexpr, ROWS: tl.constexpr, SINGLE: tl.constexpr, STAGES: tl.constexpr,
    ):
        # Persistent: program p takes the tiles of ROWS rows p, p + P, p + 2P, ... (P programs, a few per SM). The
        # loop is software-pipelined (STAGES - 1 tiles' loads in flight, staged in shared memory by cp.async)
        # so the next rows load while this tile reduces. scale_log2e = |scale| * log2(e); NEG: scale < 0, then
        # softmax(scale * x) = softmax(|scale| * -x). The max is taken on the unscaled (negated) x, so
        # exp2(x * scale_log2e - m) is one FFMA per element.
        rr = tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK)[None, :]  # (1, BLOCK)
        n_tiles = tl.cdiv(n_rows, ROWS)
        x_pad = float("inf") if NEG else float("-inf")  # loaded for masked-off columns: -inf once negated
        # (disable_licm: hoisting per-element mask terms out of the loop cost ~10 registers for causal tiles)
        for tile in tl.range(tl.program_id(0), n_tiles, tl.num_programs(0), num_stages=STAGES if SINGLE else 1,
                             disable_licm=True):
            row = tile * ROWS + rr  # (ROWS,) int32 (row indices fit); addresses below in int64
            row_ok = row < n_rows
            # visible columns: j < limit (causal: j <= i + S - T for query row i = row % T), 0 for rows past the end
            if CAUSAL:
                limit = tl.minimum(tl.maximum((row % T) + (N - T) + 1, 0), N)
            else:
                limit = tl.zeros_like(row) + N
            limit = tl.where(row_ok, limit, 0)
            if EVEN_N:  # 16-divisible rows: load bound rounded up to 16 columns, so loads stay 16-byte vectors
                load_limit = tl.multiple_of(tl.minimum((limit + 15) // 16 * 16, N), 16)
            else:
                load_limit = limit
            limit, load_limit = limit[:, None], load_limit[:, None]  # (ROWS, 1)
            x_row = x_ptr + row.to(tl.int64)[:, None] * stride_x  # (ROWS, 1)
            y_row = y_ptr + row.to(tl.int64)[:, None] * stride_y
            if SINGLE:  # whole rows in registers: read once, written once
                if MASK_COLS:  # columns past the load bound come in as -inf (after the negation)
                    x = tl.load(x_row + cols, mask=cols < load_limit, other=x_pad).to(tl.float32)
                else:  # N == BLOCK, no causal mask: only rows past the end are masked (uniform along a row)
                    x = tl.load(x_row + cols, mask=row_ok[:, None], other=0.0).to(tl.float32)
                if NEG:
                    x = -x
                if CAUSAL:  # columns in [limit, load_limit) were loaded (the 16-column rounding) but are not visible
                    x = tl.where(cols < limit, x, float("-inf"))
                m = tl.max(x, axis=1)[:, None] * scale_log2e
                m = tl.where(m == float("-inf"), 0.0, m)  # nothing visible: exp2(-inf) = 0, no NaN
                p = tl.exp2(x * scale_log2e - m)
                d = tl.sum(p, axis=1)[:, None]
                inv = 1.0 / tl.where(d > 0.0, d, 1.0)  # d == 0: every p is 0 already
                y = (p * inv).to(y_ptr.dtype.element_ty)
                if MASK_COLS:
                    tl.store(y_row + cols, y, mask=row_ok[:, None] & (cols < N))
                else:
                    tl.store(y_row + cols, y, mask=row_ok[:, None])
            else:  # rows longer than one block (ROWS == 1): online softmax over BLOCK chunks, then a second pass
                # pass 1: running max and rescaled running sum, one chunk at a time (online softmax)
                m = tl.full([ROWS, 1], float("-inf"), tl.float32)  # running max, scaled
                d = tl.zeros([ROWS, 1], tl.float32)  # running sum of exp2(x * scale_log2e - m)
                for start in tl.range(0, tl.max(limit), BLOCK, num_stages=STAGES):
                    c = start + cols
                    x = tl.load(x_row + c, mask=c < load_limit, other=x_pad).to(tl.float32)
                    if NEG:
                        x = -x
                    if CAUSAL:
                        x = tl.where(c < limit, x, float("-inf"))
                    m_new = tl.maximum(m, tl.max(x, axis=1)[:, None] * scale_log2e)
                    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing visible yet: all terms are 0
                    d = d * tl.exp2(m - m_safe) + tl.sum(tl.exp2(x * scale_log2e - m_safe), axis=1)[:, None]
                    m = m_new
                m = tl.where(m == float("-inf"), 0.0, m)
                inv = 1.0 / tl.where(d > 0.0, d, 1.0)
                # pass 2: normalise and write every column (masked ones as 0); the re-read usually hits L2
                for start in tl.range(0, N, BLOCK, num_stages=STAGES):
                    c = start + cols
                    x = tl.load(x_row + c, mask=c < load_limit, other=x_pad).to(tl.float32)
                    if NEG:
                        x = -x
                    if CAUSAL:
                        x = tl.where(c < limit, x, float("-inf"))
                    y = (tl.exp2(x * scale_log2e - m) * inv).to(y_ptr.dtype.element_ty)
                    tl.store(y_row + c, y, mask=row_ok[:, None] & (c < N))

    def _softmax_bwd_kernel(  # type: ignore[no-untyped-def]  # Triton reads annotations: constexprs only
        y_ptr, dy_ptr, dx_ptr, stride_y, stride_dy, stride_dx, n_rows, N, T, scale,
        CAUSAL: tl.constexpr, MASK_COLS: tl.constexpr, EVEN_N: tl.constexpr,
        BLOCK: tl.constexpr, ROWS: tl.constexpr, SINGLE: tl.constexpr, STAGES: tl.constexpr,
    ):
        # The forward's persistent, pipelined scheme. dx = y * (scale * dy - scale * s), s = sum(y * dy): one FFMA
        # and one multiply per element. Masked columns have y == 0, hence dx == 0: their loads are skipped (y and
        # dy are zeroed there, whatever the caller passed) and they are written as zeros.
        rr = tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK)[None, :]  # (1, BLOCK)
        n_tiles = tl.cdiv(n_rows, ROWS)
        for tile in tl.range(tl.program_id(0), n_tiles, tl.num_programs(0), num_stages=STAGES if SINGLE else 1,
                             disable_licm=True):
            row = tile * ROWS + rr  # (ROWS,)
            row_ok = row < n_rows
            if CAUSAL:
                limit = tl.minimum(tl.maximum((row % T) + (N - T) + 1, 0), N)
            else:
                limit = tl.zeros_like(row) + N
            limit = tl.where(row_ok, limit, 0)
            if EVEN_N:
                load_limit = tl.multiple_of(tl.minimum((limit + 15) // 16 * 16, N), 16)
            else:
                load_limit = limit
            limit, load_limit = limit[:, None], load_limit[:, None]  # (ROWS, 1)
            y_row = y_ptr + row.to(tl.int64)[:, None] * stride_y  # (ROWS, 1)
            dy_row = dy_ptr + row.to(tl.int64)[:, None] * stride_dy
            dx_row = dx_ptr + row.to(tl.int64)[:, None] * stride_dx
            if SINGLE:
                if MASK_COLS:
                    ld = cols < load_limit
                    y = tl.load(y_row + cols, mask=ld, other=0.0).to(tl.float32)
                    dy = tl.load(dy_row + cols, mask=ld, other=0.0).to(tl.float32)
                    if CAUSAL:  # columns in [limit, load_limit) were loaded but are not visible
                        y = tl.where(cols < limit, y, 0.0)
                        dy = tl.where(cols < limit, dy, 0.0)
                else:
                    y = tl.load(y_row + cols, mask=row_ok[:, None], other=0.0).to(tl.float32)
                    dy = tl.load(dy_row + cols, mask=row_ok[:, None], other=0.0).to(tl.float32)
                ss = tl.sum(y * dy, axis=1)[:, None] * scale
                dx = (y * (dy * scale - ss)).to(dx_ptr.dtype.element_ty)
                if MASK_COLS:
                    tl.store(dx_row + cols, dx, mask=row_ok[:, None] & (cols < N))
                else:
                    tl.store(dx_row + cols, dx, mask=row_ok[:, None])
            else:  # long rows: pass 1 accumulates sum(y * dy) over chunks, pass 2 re-reads y, dy (L2) and writes dx
                acc = tl.zeros([ROWS, BLOCK], tl.float32)
                for start in tl.range(0, tl.max(limit), BLOCK, num_stages=STAGES):
                    c = start + cols
                    ld = c < load_limit
                    y = tl.load(y_row + c, mask=ld, other=0.0).to(tl.float32)
                    dy = tl.load(dy_row + c, mask=ld, other=0.0).to(tl.float32)
                    if CAUSAL:
                        y = tl.where(c < limit, y, 0.0)
                        dy = tl.where(c < limit, dy, 0.0)
                    acc += y * dy
                ss = tl.sum(acc, axis=1)[:, None] * scale
                for start in tl.range(0, N, BLOCK, num_stages=STAGES):
                    c = start + cols
                    ld = c < load_limit
                    y = tl.load(y_row + c, mask=ld, other=0.0).to(tl.float32)
                    dy = tl.load(dy_row + c, mask=ld, other=0.0).to(tl.float32)
                    if CAUSAL:
                        y = tl.where(c < limit, y, 0.0)
                        dy = tl.where(c < limit, dy, 0.0)
                    dx = (y * (dy * scale - ss)).to(dx_ptr.dtype.element_ty)
                    tl.store(dx_row + c, dx, mask=row_ok[:, None] & (c < N))


@functools.cache
def _kernels(interpret: bool) -> SimpleNamespace:
    """Decorate the kernels once per mode: Triton reads TRITON_INTERPRET when `triton.jit` runs."""
    return SimpleNamespace(fwd=triton.jit(_softmax_fwd_kernel), bwd=triton.jit(_softmax_bwd_kernel))


# ---------------------------------------------------------------------------------------------------------------
# 2. Launchers: tensors in, tensors out, no autograd.
# ---------------------------------------------------------------------------------------------------------------
class _Config(NamedTuple):
    block: int  # columns per block (on the one-block path the power of two >= N)
    rows: int  # rows per tile (> 1 only for short rows)
    single: bool  # whole rows in registers (else the two-pass online path, one row per tile)
    num_warps: int
    stages: int  # software-pipelining depth of the tile loop (3: two tiles ahead; 1: none)
    ctas_per_sm: int  # resident programs per SM that registers, threads and shared memory allow


def _launch_config(N: int, elem_bytes: int, backward: bool, causal: bool = False) -> _Config:
    """Launch parameters for rows of N columns of `elem_bytes`-byte elements.

    A tile holds _EPT fp32 values per thread (the forward: x; the backward: y and dy, half each), so every
    one-block config needs <= _REGS registers per thread (checked by compiling, tests/kernels/test_softmax.py) and
    32 warps of tiles fit an SM at once (1024 threads): ctas_per_sm = 32 // num_warps. Short rows share a tile
    (rows = tile // block, one warp per tile for rows up to 1024 / 512 columns: reductions within a warp). Pipeline
    buffers (two tiles ahead) take shared memory; where they would not fit at that occupancy, fewer programs
    run pipelined if at least two still fit per SM, else the loop runs unpipelined (overlap then comes from the
    second program on the SM).
    """
    n_in = 2 if backward else 1
    # A mask per element (causal, or rows not 16-divisible: scalar accesses) costs a register per element (ptxas
    # keeps every column index live): such forward tiles, and backward tiles of odd rows, hold half as many values.
    ept = _EPT // 2 if (causal and not backward) or N % 16 else _EPT
    warp_tile = 32 * ept // n_in  # elements of one row-tile a warp holds
    if N > _MAX_BLOCK * ept // (_EPT * n_in):  # longer than 32 warps hold: the online path, BLOCK-column chunks
        block, rows, single = max(16, _ONLINE_BLOCK * 2 // elem_bytes), 1, False
        warps = 32  # with 8192 / 4096-column chunks: one 16-byte vector per thread per tensor
        ctas = 1  # one row per SM in flight: the pass-2 re-read stays in L2 (132 rows of up to 256 KB)
    else:
        block = max(16, 1 << max(0, (N - 1).bit_length()))
        rows = max(1, warp_tile // block)
        single = True
        warps = max(1, min(32, rows * block // warp_tile))
        ctas = max(1, 32 // warps)
    tile_bytes = rows * block * elem_bytes * n_in
    per_cta = 2 * tile_bytes + _CTA_SMEM_OVERHEAD  # stages = 3: two tiles staged in shared memory
    if ctas * per_cta <= _SMEM_PER_SM:
        stages = 3
    elif _SMEM_PER_SM // per_cta >= 2:
        stages, ctas = 3, _SMEM_PER_SM // per_cta
    else:
        stages = 1
    return _Config(block, rows, single, warps, stages, ctas)


def _grid(n_tiles: int, cfg: _Config, device: torch.device) -> tuple[int]:
    """Persistent grid: as many programs as are resident on the GPU at once (fewer if there are fewer tiles). More
    would run as a second wave: a tail where most SMs idle."""
    programs = sm_count(device) * cfg.ctas_per_sm
    if _MAX_PROGRAMS is not None:
        programs = min(programs, _MAX_PROGRAMS)
    return (max(1, min(n_tiles, programs)),)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., N) -> (R, N) with unit column stride (a view when possible)."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t.reshape(-1, t.shape[-1])


def _check(x: torch.Tensor, causal: bool) -> None:
    if x.dim() < 1:
        raise ValueError("softmax needs at least one dimension")
    if causal and x.dim() < 2:
        raise ValueError("causal softmax needs at least two dimensions (..., T, S)")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"softmax kernel takes float16/bfloat16/float32, got {x.dtype}")


def _meta(cfg: _Config, N: int, causal: bool) -> dict:
    """The constexprs and launch options both kernels take."""
    return dict(CAUSAL=causal, MASK_COLS=causal or N != cfg.block, EVEN_N=N % 16 == 0, BLOCK=cfg.block,
                ROWS=cfg.rows, SINGLE=cfg.single, STAGES=cfg.stages, num_warps=cfg.num_warps)


# ----------------------------------------------------------------------------------------------- launchers
def softmax_forward(x: torch.Tensor, scale: float = 1.0, causal: bool = False) -> torch.Tensor:
    """Launch the forward kernel: y = softmax(scale * x [causal-masked]) over the last dim, y contiguous, dtype of x."""
    _check(x, causal)
    N = x.shape[-1]
    T = x.shape[-2] if causal else 1
    y = _new_empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return y
    if scale == 0:  # softmax(0 * x) = softmax(zeros): the kernel's exp2(x * scale - m) would give NaN at -inf
        x, scale = torch.zeros_like(x), 1.0
    x2, y2 = _rows(x), y.view(-1, N)  # (R, N)
    R = x2.shape[0]
    cfg = _launch_config(N, x.element_size(), backward=False, causal=bool(causal))
    _kernels(interpreting()).fwd[_grid(triton.cdiv(R, cfg.rows), cfg, x.device)](
        x2, y2, x2.stride(0), y2.stride(0), R, N, T, abs(float(scale)) * _LOG2E,
        NEG=float(scale) < 0, **_meta(cfg, N, bool(causal)),
    )
    return y


def softmax_backward(y: torch.Tensor, dy: torch.Tensor, scale: float = 1.0, causal: bool = False) -> torch.Tensor:
    """Launch the backward kernel: dx = scale * y * (dy - sum(dy * y)), dtype of y."""
    N = y.shape[-1]
    T = y.shape[-2] if causal else 1
    dx = _new_empty(y.shape, dtype=y.dtype, device=y.device)
    if y.numel() == 0:
        return dx
    y2, dy2, dx2 = _rows(y), _rows(dy.to(y.dtype)), dx.view(-1, N)  # (R, N)
    R = y2.shape[0]
    cfg = _launch_config(N, y.element_size(), backward=True, causal=bool(causal))
    _kernels(interpreting()).bwd[_grid(triton.cdiv(R, cfg.rows), cfg, y.device)](
        y2, dy2, dx2, y2.stride(0), dy2.stride(0), dx2.stride(0), R, N, T, float(scale),
        **_meta(cfg, N, bool(causal)),
    )
    return dx


# ----------------------------------------------------------------------------------------------- references
def _causal_visible(T: int, S: int, device: Device) -> torch.Tensor:
    """(T, S) bool, True where row i sees column j: j <= i + S - T."""
    i = torch.arange(T, device=device).unsqueeze(1)
    j = torch.arange(S, device=device).unsqueeze(0)
    return j <= i + (S - T)


def softmax_ref(x: torch.Tensor, *, scale: float = 1.0, causal: bool = False) -> torch.Tensor:
    """Plain-PyTorch softmax with the kernel's exact semantics (fp32 math, or float64 for float64 input).

    Differentiable by autograd. Rows with nothing visible give zeros (torch.softmax would give NaN).
    """
    acc = torch.promote_types(x.dtype, torch.float32)
    z = x.to(acc) * scale
    if causal:
        vis = _causal_visible(x.shape[-2], x.shape[-1], x.device)
        z = z.masked_fill(~vis, float("-inf"))
    m = z.amax(dim=-1, keepdim=True).detach() if z.shape[-1] > 0 else z.sum(-1, keepdim=True)
    m = torch.where(m == float("-inf"), torch.zeros_like(m), m)
    p = torch.exp(z - m)
    d = p.sum(dim=-1, keepdim=True)
    y = p / torch.where(d > 0, d, torch.ones_like(d))
    return y.to(x.dtype)


def softmax_backward_ref(y: torch.Tensor, dy: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """dx = scale * y * (dy - sum(dy * y)) in fp32 (masked columns have y == 0, hence dx == 0)."""
    acc = torch.promote_types(y.dtype, torch.float32)
    yf, dyf = y.to(acc), dy.to(acc)
    dx = scale * yf * (dyf - (yf * dyf).sum(dim=-1, keepdim=True))
    return dx.to(y.dtype)


# ----------------------------------------------------------------------------------------------- custom ops
@torch.library.custom_op("hotpath::softmax", mutates_args=())
def _softmax_op(x: torch.Tensor, scale: float, causal: bool) -> torch.Tensor:
    if use_triton(x):
        return softmax_forward(x, scale, causal)
    return softmax_ref(x, scale=scale, causal=causal).contiguous()


@_softmax_op.register_fake
def _(x, scale, causal):
    return x.new_empty(x.shape)


@torch.library.custom_op("hotpath::softmax_backward", mutates_args=())
def _softmax_backward_op(y: torch.Tensor, dy: torch.Tensor, scale: float, causal: bool) -> torch.Tensor:
    if use_triton(y):
        return softmax_backward(y, dy, scale, causal)
    return softmax_backward_ref(y, dy, scale).contiguous()


@_softmax_backward_op.register_fake
def _(y, dy, scale, causal):
    return y.new_empty(y.shape)


def _setup_context(ctx, inputs, output):
    _, scale, causal = inputs
    ctx.save_for_backward(output)
    ctx.scale, ctx.causal = scale, causal


def _backward(ctx, dy):
    (y,) = ctx.saved_tensors
    return _softmax_backward_op(y, dy, ctx.scale, ctx.causal), None, None


_softmax_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------- public
def softmax(x: torch.Tensor, *, scale: float = 1.0, causal: bool = False) -> torch.Tensor:
    """softmax(scale * x) over the last dimension; ``causal`` masks column j of row i (of T) when j > i + S - T.

    Any leading shape, fp16/bf16/fp32 in (output in the same dtype, contiguous), fp32 math, differentiable.
    Fully masked rows give zeros. CUDA -> Triton; CPU -> reference (Triton interpreter with TRITON_INTERPRET=1).
    """
    _check(x, causal)
    return _softmax_op(x, float(scale), bool(causal))
