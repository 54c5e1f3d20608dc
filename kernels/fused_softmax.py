"""Row softmax over the last dimension, with fused scaling and an optional causal mask; forward and backward.

Math (per row ``x`` of length N, fp32 arithmetic whatever the input dtype)::

    z_j = scale * x_j          if column j is visible, else -inf
    y_j = exp(z_j - m) / sum_k exp(z_k - m),     m = max_k z_k
    dx_j = scale * y_j * (dy_j - sum_k dy_k * y_k)          (backward, from the saved output y)

Causal mask: for ``x`` of shape (..., T, S) query row i sees column j iff ``j <= i + S - T`` (bottom-right
aligned, as with a KV cache; T == S is the usual lower triangle). A row that sees nothing (T > S, top rows), or a
row whose visible entries are all -inf, returns zeros and a zero gradient instead of torch's NaN.

Memory traffic per element, with b = bytes of the input dtype:
- forward: read x once, write y once (2b), when the row fits one block (N <= ``_MAX_BLOCK``, 32768 columns).
  Longer rows take the online path: one pass computes the running max and the rescaled running sum per lane
  (Milakov & Gimelshein, "Online normalizer calculation for softmax"), a second pass re-reads x and writes y
  (3b; the re-read of a row a program has just streamed usually hits L2).
- backward: read y and dy, write dx (3b); long rows re-read y and dy (5b).
- causal rows skip the loads of masked columns (they are written as zeros).

Design trade-offs:
- One program per row: rows of 1k-32k fill the GPU with independent work and need no cross-program reduction.
  Rows up to 32k are held in registers in one block (num_warps grows with the block) so the common case is a
  single read; longer rows trade a second read for unbounded length.
- The backward saves the output y, not x: y is usually kept anyway, and dx needs only y and dy, never the mask.
- exp2 with ``scale * log2(e)`` folded into one multiply.

Layering (see DESIGN.md): ``_softmax_*_kernel`` (Triton, built on first use) -> ``softmax_forward`` /
``softmax_backward`` launchers -> ``hotpath::softmax`` / ``hotpath::softmax_backward`` custom ops (fake
kernels + autograd, so torch.compile / torch.export / ONNX export trace them) -> ``softmax`` and ``softmax_ref``.
Dispatch by ``kernels._dispatch.use_triton``: CUDA -> compiled Triton, CPU -> ``softmax_ref`` unless
TRITON_INTERPRET=1, then the Triton kernels run in Triton's interpreter.
"""
from __future__ import annotations

import functools
from types import SimpleNamespace

import torch
from torch.types import Device

from ._dispatch import interpreting, use_triton

__all__ = ["softmax", "softmax_ref", "softmax_backward_ref", "softmax_forward", "softmax_backward"]

_MAX_BLOCK = 32768  # rows up to this length run in one block (one read); longer rows use the online path
_ONLINE_BLOCK = 4096  # block of the online (multi-block) path
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
        x_ptr, y_ptr, stride_x, stride_y, N, T, scale_log2e,
        CAUSAL: tl.constexpr, BLOCK: tl.constexpr, SINGLE: tl.constexpr, EVEN_N: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * stride_x
        y_row = y_ptr + row * stride_y
        if CAUSAL:  # visible columns of this row: j < limit = i + S - T + 1, clamped to [0, N]
            limit = tl.minimum(tl.maximum((row % T) + (N - T) + 1, 0), N)
        else:
            limit = N + row * 0
        if EVEN_N:  # N % 16 == 0: round the load bound up to 16 columns so the masked loads stay vectorised
            load_limit = tl.multiple_of(tl.minimum((limit + 15) // 16 * 16, N), 16)
        else:
            load_limit = limit
        cols = tl.arange(0, BLOCK)
        if SINGLE:
            vis = cols < limit
            z = tl.load(x_row + cols, mask=cols < load_limit, other=0.0).to(tl.float32) * scale_log2e
            z = tl.where(vis, z, float("-inf"))
            m = tl.max(z, axis=0)
            m = tl.where(m == float("-inf"), 0.0, m)  # fully masked row: exp2(-inf) = 0, no NaN
            p = tl.exp2(z - m)
            d = tl.sum(p, axis=0)
            inv = 1.0 / tl.where(d > 0.0, d, 1.0)  # d == 0: every p is 0 already
            tl.store(y_row + cols, (p * inv).to(y_ptr.dtype.element_ty), mask=cols < N)
        else:
            # pass 1: per-lane running max and rescaled running sum (online softmax)
            m_i = tl.full([BLOCK], float("-inf"), tl.float32)
            d_i = tl.zeros([BLOCK], tl.float32)
            for start in range(0, limit, BLOCK):
                c = start + cols
                vis = c < limit
                z = tl.load(x_row + c, mask=c < load_limit, other=0.0).to(tl.float32) * scale_log2e
                z = tl.where(vis, z, float("-inf"))
                m_new = tl.maximum(m_i, z)
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                d_i = d_i * tl.exp2(m_i - m_safe) + tl.exp2(z - m_safe)
                m_i = m_new
            m = tl.max(m_i, axis=0)
            m = tl.where(m == float("-inf"), 0.0, m)
            d = tl.sum(d_i * tl.exp2(m_i - m), axis=0)
            inv = 1.0 / tl.where(d > 0.0, d, 1.0)  # d == 0: every p is 0 already
            # pass 2: normalise and write every column (masked ones as 0)
            for start in range(0, N, BLOCK):
                c = start + cols
                vis = c < limit
                z = tl.load(x_row + c, mask=c < load_limit, other=0.0).to(tl.float32) * scale_log2e
                z = tl.where(vis, z, float("-inf"))
                tl.store(y_row + c, (tl.exp2(z - m) * inv).to(y_ptr.dtype.element_ty), mask=c < N)

    def _softmax_bwd_kernel(  # type: ignore[no-untyped-def]  # Triton reads annotations: constexprs only
        y_ptr, dy_ptr, dx_ptr, stride_y, stride_dy, stride_dx, N, T, scale,
        CAUSAL: tl.constexpr, BLOCK: tl.constexpr, SINGLE: tl.constexpr, EVEN_N: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        y_row = y_ptr + row * stride_y
        dy_row = dy_ptr + row * stride_dy
        dx_row = dx_ptr + row * stride_dx
        # masked columns have y == 0, so dx == 0: skip their loads
        if CAUSAL:  # visible columns of this row: j < limit = i + S - T + 1, clamped to [0, N]
            limit = tl.minimum(tl.maximum((row % T) + (N - T) + 1, 0), N)
        else:
            limit = N + row * 0
        if EVEN_N:  # N % 16 == 0: round the load bound up to 16 columns so the masked loads stay vectorised
            load_limit = tl.multiple_of(tl.minimum((limit + 15) // 16 * 16, N), 16)
        else:
            load_limit = limit
        cols = tl.arange(0, BLOCK)
        if SINGLE:
            vis = cols < limit
            y = tl.where(vis, tl.load(y_row + cols, mask=cols < load_limit, other=0.0).to(tl.float32), 0.0)
            dy = tl.where(vis, tl.load(dy_row + cols, mask=cols < load_limit, other=0.0).to(tl.float32), 0.0)
            s = tl.sum(y * dy, axis=0)
            dx = scale * y * (dy - s)
            tl.store(dx_row + cols, dx.to(dx_ptr.dtype.element_ty), mask=cols < N)
        else:
            acc = tl.zeros([BLOCK], tl.float32)
            for start in range(0, limit, BLOCK):
                c = start + cols
                vis = c < limit
                y = tl.where(vis, tl.load(y_row + c, mask=c < load_limit, other=0.0).to(tl.float32), 0.0)
                dy = tl.where(vis, tl.load(dy_row + c, mask=c < load_limit, other=0.0).to(tl.float32), 0.0)
                acc += y * dy
            s = tl.sum(acc, axis=0)
            for start in range(0, N, BLOCK):
                c = start + cols
                vis = c < limit
                y = tl.where(vis, tl.load(y_row + c, mask=c < load_limit, other=0.0).to(tl.float32), 0.0)
                dy = tl.where(vis, tl.load(dy_row + c, mask=c < load_limit, other=0.0).to(tl.float32), 0.0)
                dx = scale * y * (dy - s)
                tl.store(dx_row + c, dx.to(dx_ptr.dtype.element_ty), mask=c < N)


@functools.cache
def _kernels(interpret: bool) -> SimpleNamespace:
    """Decorate the kernels once per mode: Triton reads TRITON_INTERPRET when `triton.jit` runs."""
    return SimpleNamespace(fwd=triton.jit(_softmax_fwd_kernel), bwd=triton.jit(_softmax_bwd_kernel))


# ---------------------------------------------------------------------------------------------------------------
# 2. Launchers: tensors in, tensors out, no autograd.
# ---------------------------------------------------------------------------------------------------------------
def _launch_config(N: int) -> tuple[int, bool, int]:
    """(BLOCK, SINGLE, num_warps) for rows of length N."""
    if N <= _MAX_BLOCK:
        block = max(16, 1 << max(0, (N - 1).bit_length()))
        single = True
    else:
        block, single = _ONLINE_BLOCK, False
    num_warps = 4 if block <= 1024 else 8 if block <= 4096 else 16 if block <= 16384 else 32
    return block, single, num_warps


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


# ----------------------------------------------------------------------------------------------- launchers
def softmax_forward(x: torch.Tensor, scale: float = 1.0, causal: bool = False) -> torch.Tensor:
    """Launch the forward kernel: y = softmax(scale * x [causal-masked]) over the last dim, y contiguous, dtype of x."""
    _check(x, causal)
    N = x.shape[-1]
    T = x.shape[-2] if causal else 1
    y = _new_empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return y
    x2, y2 = _rows(x), y.view(-1, N)  # (R, N)
    block, single, num_warps = _launch_config(N)
    _kernels(interpreting()).fwd[(x2.shape[0],)](
        x2, y2, x2.stride(0), y2.stride(0), N, T, float(scale) * _LOG2E,
        CAUSAL=bool(causal), BLOCK=block, SINGLE=single, EVEN_N=N % 16 == 0, num_warps=num_warps,
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
    block, single, num_warps = _launch_config(N)
    _kernels(interpreting()).bwd[(y2.shape[0],)](
        y2, dy2, dx2, y2.stride(0), dy2.stride(0), dx2.stride(0), N, T, float(scale),
        CAUSAL=bool(causal), BLOCK=block, SINGLE=single, EVEN_N=N % 16 == 0, num_warps=num_warps,
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
