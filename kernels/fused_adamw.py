"""FusedAdamW: AdamW (decoupled weight decay) updating every parameter of a group in a few multi-tensor launches.

Math (per element, fp32 whatever the parameter dtype; ``t`` is the parameter's step count *after* increment)::

    g  = grad * (1 / grad_scale)            (grad_scale: set by GradScaler, else 1); g = -g if maximize
    w  = w * (1 - lr * weight_decay)
    m  = m + (1 - beta1) * (g - m)          (torch's exp_avg.lerp_(g, 1 - beta1))
    v  = beta2 * v + (1 - beta2) * g * g
    v_hat = max(v_max, v) if amsgrad else v (v_max stored back)
    w  = w - lr / (1 - beta1^t) * m / (sqrt(v_hat) / sqrt(1 - beta2^t) + eps)

which is ``torch.optim.AdamW``'s single-tensor algorithm term for term. ``1 - beta^t`` is computed on the device
as ``-expm1(t * ln beta)`` (a short series for small arguments) so ``1 - 0.999^1`` keeps full fp32 precision.

Memory traffic per parameter: read g, m, v, w and write m, v, w: 28 B for fp32 parameters (+8 B with amsgrad).
bf16/fp16 parameters with fp32 master weights: read g (2) + master (4) + m + v, write master + param (2) + m + v:
30 B. bf16 parameters without master weights: 24 B, the update rounded to the parameter dtype every step.

Design:
- Multi-tensor apply with large chunks (as apex's multi_tensor_apply): one launch per (device, parameter dtype,
  gradient dtype, master weights) bucket of a group -- one or two launches for a whole model. Each program owns
  a ``_CHUNK`` (32768) element slice of one tensor and loops over it in ``_BLOCK`` (512) element pieces: every
  full piece without a bounds mask, the chunk's partial tail (at most one piece) masked. GPT-2 124M is 3,892
  programs (it was ~30k with one 4096-element program each), each amortising its table reads, pointer set-up and
  bias corrections over 64 pieces.
- Vector width and registers: 4 warps, 4 elements per thread and piece, so every fp32 stream (grad, param, m, v,
  v_max, master) is one 16-byte access per thread; 16-bit params and grads are 8-byte accesses (8 elements per
  thread would give them 16 bytes, but Triton then lays the fp32 streams out differently and converts through
  shared memory: 76+ registers and 4 KB, measured). Compiled for sm_90a on the CPU (a static prediction: no GPU
  has run it): 40 registers fp32, 44 bf16 + master, 45-46 with AMSGrad and GradScaler (was 118-153), no spills,
  no shared memory (bf16 was 8 KB); the unmasked inner loop is 237 SASS instructions per 512-element piece fp32,
  266 bf16 + master (tests/kernels/test_adamw.py's slow test and the kernel report check the budget). Addresses
  are hinted 16-byte aligned with ``tl.multiple_of`` when the host has checked they are.
- The launch table (int64): each tensor's param / grad / exp_avg / exp_avg_sq / max_exp_avg_sq / master addresses
  and length, then a (tensor, chunk) pair per program. Built once per bucket; only the gradient row can change
  between steps, and a device copy is kept per set of gradient addresses (`_Bucket.table`), so a steady-state
  step, and a CUDA-graph capture after warm-up, copies nothing to the device.
- Host cost: `FusedAdamW` caches a plan per parameter group (buckets, tables, packed step counts) and each step
  only checks that it still fits (see the class docstring, "Caching"): about 0.2 ms for GPT-2's 148 tensors on
  this project's 2-core CPU VM, launches recorded instead of run (bench/adamw_host.py; ~0.9 ms before, or ~11 ms
  when gradient addresses changed and the ~30k-entry table was rebuilt).
- Step counts are fp32 on the parameter's device (as torch's fused/capturable AdamW keeps them), packed in one
  tensor per bucket that a single ``add_`` advances (``state["step"]`` is a 0-dim view of it; a ``_foreach_add_``
  over 148 0-dim tensors cost ~0.3 ms of host time on the CPU), so nothing syncs with the host and the step can be
  captured in a CUDA graph (after warm-up steps have built the plan; a rebuild afterwards makes new packed
  counts and tables, so re-capture then). ``lr`` and the other hyper-parameters are read from the group at each
  ``step()`` (schedulers work); inside a captured graph they are frozen at capture time.
- GradScaler: ``_step_supports_amp_scaling = True``; the scaler hands us ``grad_scale`` and ``found_inf`` tensors.
  Gradients are unscaled in registers (never written back) and, when ``found_inf`` is set, every program's
  element count is set to 0 (nothing is loaded or stored) and the step counts are not advanced -- on the device,
  without a host sync.
- The state dict uses ``torch.optim.AdamW``'s keys (``step``, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``)
  plus ``master_param`` for master weights, so state dicts load into ``torch.optim.AdamW`` and back.

Dispatch: CUDA -> the Triton kernel; CPU -> the PyTorch reference (``_adamw_ref``), unless TRITON_INTERPRET=1,
then the Triton kernel runs in Triton's interpreter.
"""
from __future__ import annotations

import contextlib
import functools
import math
import operator
from itertools import chain
from typing import Any, Callable, Iterator, Optional, Union

import torch
from torch.optim.optimizer import ParamsT

from ._dispatch import interpreting, use_triton

__all__ = ["FusedAdamW", "adamw_multi_tensor"]

try:  # Triton is optional: without it every path is the reference.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only on machines without triton
    triton = None
    tl = None

_CHUNK = 32768  # elements per program (work item); each loops over pieces of _BLOCK elements
_NUM_WARPS = 4
# four elements per thread: one 16-byte vector per fp32 stream (8 bytes for 16-bit params and grads, see above)
_BLOCK = 4 * 32 * _NUM_WARPS
_TABLES_PER_BUCKET = 4  # device tables kept per bucket, one per set of gradient addresses
_STATE_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "master_param")


# ---------------------------------------------------------------------------------------------------------------
# 1. Triton kernel (a plain function here; decorated with triton.jit on first use, see _kernels()).
# ---------------------------------------------------------------------------------------------------------------
if tl is not None:

    def _adamw_multi_tensor_kernel(  # type: ignore[no-untyped-def]  # Triton reads annotations: constexprs only
        table_ptr,  # int64: 7 rows of n_tensors (param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, master
        # addresses, numel), then the tensor id of each of the n_items work items, then its chunk index
        steps_ptr,  # fp32 (n_tensors,): each tensor's step count, already advanced
        param_like_ptr, grad_like_ptr,  # any tensor of the parameter / gradient dtype (types the raw addresses)
        found_inf_ptr, grad_scale_ptr,  # fp32 scalars (GradScaler), read only when HAS_* is set
        n_tensors, n_items,
        lr, decay, beta1, beta2, one_minus_beta1, one_minus_beta2, log_beta1, log_beta2, eps,
        AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, MASTER: tl.constexpr,
        HAS_FOUND_INF: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, ALIGNED: tl.constexpr,
        CHUNK: tl.constexpr,  # elements per work item (one program), a multiple of BLOCK
        BLOCK: tl.constexpr,  # elements per inner-loop iteration
    ):
        item = tl.program_id(0)
        t = tl.load(table_ptr + 7 * n_tensors + item)  # which tensor
        start = tl.load(table_ptr + 7 * n_tensors + n_items + item) * CHUNK  # where this chunk starts in it
        # elements of this chunk (int32: the inner loop indexes from the chunk's start)
        n = tl.minimum(tl.load(table_ptr + 6 * n_tensors + t) - start, CHUNK).to(tl.int32)
        if HAS_FOUND_INF:  # GradScaler saw inf/NaN: the program touches nothing (a uniform branch, no mask)
            n = tl.where(tl.load(found_inf_ptr) == 0.0, n, 0)
        # the chunk's slice of every tensor; start is a multiple of CHUNK, so 16-byte alignment carries over
        p_ptr = tl.load(table_ptr + 0 * n_tensors + t).to(param_like_ptr.dtype) + start
        g_ptr = tl.load(table_ptr + 1 * n_tensors + t).to(grad_like_ptr.dtype) + start
        m_ptr = tl.load(table_ptr + 2 * n_tensors + t).to(tl.pointer_type(tl.float32)) + start
        v_ptr = tl.load(table_ptr + 3 * n_tensors + t).to(tl.pointer_type(tl.float32)) + start
        if ALIGNED:  # every address is 16-byte aligned (checked on the host): lets accesses vectorise
            p_ptr = tl.multiple_of(p_ptr, 16)
            g_ptr = tl.multiple_of(g_ptr, 16)
            m_ptr = tl.multiple_of(m_ptr, 16)
            v_ptr = tl.multiple_of(v_ptr, 16)
        if AMSGRAD:
            vmax_ptr = tl.load(table_ptr + 4 * n_tensors + t).to(tl.pointer_type(tl.float32)) + start
            if ALIGNED:
                vmax_ptr = tl.multiple_of(vmax_ptr, 16)
        if MASTER:
            w_ptr = tl.load(table_ptr + 5 * n_tensors + t).to(tl.pointer_type(tl.float32)) + start
            if ALIGNED:
                w_ptr = tl.multiple_of(w_ptr, 16)

        # bias corrections 1 - beta^step = -expm1(step * ln beta): a series near 0 (where exp(x) - 1 cancels),
        # exp(x) - 1 below -0.1 (relative error < 1e-6); x <= 0 always. Once per program, not per element.
        step = tl.load(steps_ptr + t)
        x1 = step * log_beta1
        x2 = step * log_beta2
        e1 = x1 * (1.0 + x1 * (0.5 + x1 * (1.0 / 6 + x1 * (1.0 / 24 + x1 * (1.0 / 120 + x1 * (1.0 / 720))))))
        e2 = x2 * (1.0 + x2 * (0.5 + x2 * (1.0 / 6 + x2 * (1.0 / 24 + x2 * (1.0 / 120 + x2 * (1.0 / 720))))))
        bc1 = -tl.where(x1 > -0.1, e1, tl.exp(x1) - 1.0)
        bc2 = -tl.where(x2 > -0.1, e2, tl.exp(x2) - 1.0)
        step_size = tl.div_rn(lr, bc1)
        bc2_sqrt = tl.sqrt_rn(bc2)
        if HAS_GRAD_SCALE:
            inv_scale = 1.0 / tl.load(grad_scale_ptr)

        n_full = n // BLOCK * BLOCK
        # Two copies of the loop body: PHASE 0 runs every full BLOCK without a mask (so, with aligned tensors,
        # every access is a 16-byte vector), PHASE 1 the chunk's partial tail (at most one iteration), masked.
        for PHASE in tl.static_range(2):
            if PHASE == 0:
                lo = 0
                hi = n_full
            else:
                lo = n_full
                hi = n
            for off in tl.range(lo, hi, BLOCK):
                offs = off + tl.arange(0, BLOCK)
                if PHASE == 0:
                    mask = None
                else:
                    mask = offs < n  # masked-off lanes compute garbage that is never stored
                g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
                if HAS_GRAD_SCALE:
                    g = g * inv_scale
                if MAXIMIZE:
                    g = -g
                if MASTER:
                    w = tl.load(w_ptr + offs, mask=mask)
                else:
                    w = tl.load(p_ptr + offs, mask=mask).to(tl.float32)
                m = tl.load(m_ptr + offs, mask=mask)
                v = tl.load(v_ptr + offs, mask=mask)

                w = w * decay
                m = m + one_minus_beta1 * (g - m)
                v = v * beta2 + one_minus_beta2 * (g * g)
                if AMSGRAD:
                    vmax = tl.maximum(tl.load(vmax_ptr + offs, mask=mask), v)
                    tl.store(vmax_ptr + offs, vmax, mask=mask)
                    denom = tl.div_rn(tl.sqrt_rn(vmax), bc2_sqrt) + eps
                else:
                    denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
                w = w - step_size * tl.div_rn(m, denom)

                tl.store(m_ptr + offs, m, mask=mask)
                tl.store(v_ptr + offs, v, mask=mask)
                if MASTER:
                    tl.store(w_ptr + offs, w, mask=mask)
                if param_like_ptr.dtype.element_ty == tl.bfloat16:
                    # round to nearest even with integer ops: bit-exact with torch's .to(bfloat16) on the GPU and
                    # in the interpreter (whose float->bf16 cast truncates)
                    bits = w.to(tl.uint32, bitcast=True)
                    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
                    rounded = tl.where(w != w, 0x7FC0, rounded)  # keep NaN a NaN
                    tl.store(p_ptr + offs, rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
                else:
                    tl.store(p_ptr + offs, w.to(param_like_ptr.dtype.element_ty), mask=mask)


@functools.cache
def _kernels(interpret: bool) -> Any:
    """Decorate the kernel once per mode: Triton reads TRITON_INTERPRET when `triton.jit` runs. The table sizes are
    not specialised on (a model with 148 or 149 tensors runs the same binary)."""
    return triton.jit(_adamw_multi_tensor_kernel, do_not_specialize=["n_tensors", "n_items"])


# ---------------------------------------------------------------------------------------------------------------
# 2. Launcher (tensors in, updated in place; no autograd) and the PyTorch reference.
# ---------------------------------------------------------------------------------------------------------------
class _Bucket:
    """The tensors of one launch (one device, parameter dtype, gradient dtype, master weights or not), with their
    launch table.

    The table -- every tensor's addresses and length, then a (tensor, chunk) pair per program -- is built once on
    the host; only the gradient row depends on the step. A device copy is kept per set of gradient addresses (a
    few, least recently used first out), so a step whose gradients sit where they sat before (the caching
    allocator usually puts them there; a CUDA graph requires it) uploads nothing.
    """

    def __init__(
        self, params: list[torch.Tensor], exp_avgs: list[torch.Tensor], exp_avg_sqs: list[torch.Tensor],
        max_exp_avg_sqs: Optional[list[torch.Tensor]], masters: Optional[list[torch.Tensor]], steps: torch.Tensor,
        grad_dtype: torch.dtype, chunk: Optional[int] = None, block: Optional[int] = None,
    ):
        # held here because the table points at them
        self.params, self.exp_avgs, self.exp_avg_sqs = params, exp_avgs, exp_avg_sqs
        self.max_exp_avg_sqs, self.masters, self.steps = max_exp_avg_sqs, masters, steps
        self.grad_dtype = grad_dtype
        self.device = params[0].device
        self.block = block or _BLOCK
        chunk = chunk or _CHUNK  # read at call time: tests shrink it to cross chunk boundaries cheaply
        if chunk % self.block:
            raise ValueError(f"chunk ({chunk}) must be a multiple of the block ({self.block})")
        self.chunk = chunk
        n = self.n = len(params)
        numels = [p.numel() for p in params]
        rows = [
            [p.data_ptr() for p in params],
            [0] * n,  # gradient addresses: filled per step (table())
            [m.data_ptr() for m in exp_avgs],
            [v.data_ptr() for v in exp_avg_sqs],
            [v.data_ptr() for v in max_exp_avg_sqs] if max_exp_avg_sqs is not None else [0] * n,
            [w.data_ptr() for w in masters] if masters is not None else [0] * n,
            numels,
        ]
        items = [(i, c) for i, numel in enumerate(numels) for c in range(-(-numel // chunk))]
        self.n_items = len(items)
        self.head = torch.tensor(
            list(chain.from_iterable(rows)) + [i for i, _ in items] + [c for _, c in items], dtype=torch.int64)
        self.aligned = all(a % 16 == 0 for row in rows[:6] for a in row)
        self.tables: dict[tuple[int, ...], tuple[torch.Tensor, bool]] = {}
        self.captured: list[torch.Tensor] = []

    def table(self, grads: list[torch.Tensor]) -> tuple[torch.Tensor, bool]:
        """The device table for these gradients (contiguous, of this bucket's dtype), and whether every address
        in it is 16-byte aligned."""
        ptrs = tuple(map(torch.Tensor.data_ptr, grads))
        entry = self.tables.pop(ptrs, None)
        if entry is None:
            head = self.head.clone()
            head[self.n: 2 * self.n] = torch.tensor(ptrs, dtype=torch.int64)
            entry = (head.to(self.device, non_blocking=True), self.aligned and all(a % 16 == 0 for a in ptrs))
        if self.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            self.captured.append(entry[0])  # a CUDA graph reads it at every replay: never free it
        self.tables[ptrs] = entry  # most recent last
        if len(self.tables) > _TABLES_PER_BUCKET:
            del self.tables[next(iter(self.tables))]
        return entry

    def launch(
        self, grads: list[torch.Tensor], *, lr: float, beta1: float, beta2: float, eps: float,
        weight_decay: float, maximize: bool, found_inf: Optional[torch.Tensor] = None,
        grad_scale: Optional[torch.Tensor] = None,
    ) -> None:
        """One launch updating every tensor of the bucket; the step counts must already be advanced."""
        if self.n_items == 0:
            return
        table, aligned = self.table(grads)
        interpret = interpreting()
        _kernels(interpret)[(self.n_items,)](
            table, self.steps, self.params[0], grads[0],
            self.steps if found_inf is None else found_inf, self.steps if grad_scale is None else grad_scale,
            self.n, self.n_items,
            float(lr), 1.0 - lr * weight_decay, float(beta1), float(beta2), 1.0 - beta1, 1.0 - beta2,
            _log(beta1), _log(beta2), float(eps),
            AMSGRAD=self.max_exp_avg_sqs is not None, MAXIMIZE=bool(maximize), MASTER=self.masters is not None,
            HAS_FOUND_INF=found_inf is not None, HAS_GRAD_SCALE=grad_scale is not None,
            ALIGNED=aligned and not interpret, CHUNK=self.chunk, BLOCK=self.block, num_warps=_NUM_WARPS,
        )


def adamw_multi_tensor(
    params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor], max_exp_avg_sqs: Optional[list[torch.Tensor]],
    masters: Optional[list[torch.Tensor]], steps: Union[torch.Tensor, list[torch.Tensor]], *,
    lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, maximize: bool,
    found_inf: Optional[torch.Tensor] = None, grad_scale: Optional[torch.Tensor] = None,
    chunk: Optional[int] = None, block: Optional[int] = None,
) -> None:
    """Update every tensor in place with one Triton launch; the step counts must already be advanced.

    All params share one device and dtype, all grads one dtype; every tensor is contiguous; states (``exp_avgs``,
    ``exp_avg_sqs``, ``max_exp_avg_sqs`` with AMSGrad, fp32 ``masters`` for master weights) are fp32 like the
    params. ``steps``: a 1-D fp32 tensor (one count per param) or a list of 0-dim fp32 tensors (copied). One
    program per ``chunk`` elements of a tensor, looping over ``block``-element pieces. This builds the launch
    table on every call; `FusedAdamW` keeps it between steps.
    """
    if not params:
        return
    flat = steps if torch.is_tensor(steps) else torch.stack(list(steps))
    if flat.shape != (len(params),) or flat.dtype != torch.float32:
        raise ValueError("steps must hold one fp32 count per parameter")
    bucket = _Bucket(params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters, flat.contiguous(), grads[0].dtype,
                     chunk, block)
    bucket.launch(grads, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, maximize=maximize,
                  found_inf=found_inf, grad_scale=grad_scale)


def _log(beta: float) -> float:
    return math.log(beta) if beta > 0 else float("-inf")


def _adamw_ref(
    params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor], max_exp_avg_sqs: Optional[list[torch.Tensor]],
    masters: Optional[list[torch.Tensor]], steps: Union[torch.Tensor, list[torch.Tensor]], *,
    lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, maximize: bool,
    found_inf: Optional[torch.Tensor] = None, grad_scale: Optional[torch.Tensor] = None,
) -> None:
    """Plain-PyTorch reference with the kernel's semantics (torch.optim.AdamW's single-tensor algorithm in
    fp32 on fp32 state); steps must already be incremented; skips everything when ``found_inf`` is set."""
    if found_inf is not None and found_inf.item() != 0:
        return
    inv_scale = None if grad_scale is None else grad_scale.double().reciprocal().float()
    for i, p in enumerate(params):
        g = grads[i].float()
        if inv_scale is not None:
            g = g * inv_scale.to(g.device)
        if maximize:
            g = -g
        w = masters[i] if masters is not None else (p if p.dtype == torch.float32 else p.float())
        m, v = exp_avgs[i], exp_avg_sqs[i]
        step = steps[i].item()
        w.mul_(1 - lr * weight_decay)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        step_size = lr / (1 - beta1**step)
        bc2_sqrt = math.sqrt(1 - beta2**step)
        if max_exp_avg_sqs is not None:
            torch.maximum(max_exp_avg_sqs[i], v, out=max_exp_avg_sqs[i])
            denom = (max_exp_avg_sqs[i].sqrt() / bc2_sqrt).add_(eps)
        else:
            denom = (v.sqrt() / bc2_sqrt).add_(eps)
        w.addcdiv_(m, denom, value=-step_size)
        if w is not p:
            p.copy_(w)


# ---------------------------------------------------------------------------------------------------------------
# 3. The optimizer.
# ---------------------------------------------------------------------------------------------------------------
_FORCE_TRITON = False  # see _triton_path_on_cpu
_dtype_of = operator.attrgetter("dtype")


@contextlib.contextmanager
def _triton_path_on_cpu() -> Iterator[None]:
    """Private hook for bench/adamw_host.py and the kernel report: inside the block, `FusedAdamW.step` takes the
    Triton path for CPU tensors too (without TRITON_INTERPRET), so `bench.sm90.capture_launches` records the
    launches a GPU step would make (they must not run: a compiled kernel needs a GPU)."""
    global _FORCE_TRITON
    old, _FORCE_TRITON = _FORCE_TRITON, True
    try:
        yield
    finally:
        _FORCE_TRITON = old


class _Plan:
    """What one parameter group's step launches, kept between steps: the group's tensors split into buckets,
    each with its step counts packed in one fp32 tensor and its launch table. `matches` says whether it still
    describes the group (see FusedAdamW's docstring, "Caching"). It holds no gradient: a gradient freed by
    ``zero_grad(set_to_none=True)`` is really freed, and the next backward can reuse its memory and address."""

    def __init__(self, group: dict[str, Any], state: Any, grads: list[Optional[torch.Tensor]],
                 buckets: list[tuple[list[int], _Bucket, bool]]):
        self.group, self.state = group, state
        self.params = list(group["params"])
        self.param_ptrs = [p.data_ptr() for p in self.params]
        self.amsgrad, self.master_weights = group["amsgrad"], group["master_weights"]
        self.has_grad = [g is not None for g in grads]
        self.buckets = buckets  # (indices into the group's params, bucket, layout fit for the Triton kernel)

    def matches(self, group: dict[str, Any], state: Any, grads: list[Optional[torch.Tensor]]) -> bool:
        params = group["params"]
        if not (
            self.group is group and self.state is state
            and self.amsgrad == group["amsgrad"] and self.master_weights == group["master_weights"]
            and len(params) == len(self.params) and all(map(operator.is_, params, self.params))
            and list(map(torch.Tensor.data_ptr, params)) == self.param_ptrs  # `p.data = other` moves it
            and [g is not None for g in grads] == self.has_grad
        ):
            return False
        # the same gradient dtype per bucket (a parameter's grad_dtype can be changed)
        return all(set(map(_dtype_of, (grads[i] for i in idx))) == {bucket.grad_dtype}
                   for idx, bucket, _ in self.buckets)

    def step(self, grads: list[Optional[torch.Tensor]], hyper: dict[str, Any],
             grad_scale: Optional[torch.Tensor], found_inf: Optional[torch.Tensor]) -> None:
        for idx, bucket, contiguous in self.buckets:
            gs: list[torch.Tensor] = [grads[i] for i in idx]  # type: ignore[misc]
            if not all(map(torch.Tensor.is_contiguous, gs)):
                if any(g.is_sparse for g in gs):
                    raise RuntimeError("FusedAdamW does not support sparse gradients")
                gs = [g.contiguous() for g in gs]
            device = bucket.device
            fi = None if found_inf is None else found_inf.to(device=device, dtype=torch.float32)
            gsc = None if grad_scale is None else grad_scale.to(device=device, dtype=torch.float32)
            # advance the step counts on the device (not at all when GradScaler found inf/NaN): one op per bucket
            bucket.steps.add_(1.0 if fi is None else 1.0 - fi)
            if contiguous and (_FORCE_TRITON or use_triton(bucket.params[0])):
                bucket.launch(gs, **hyper, found_inf=fi, grad_scale=gsc)
            else:
                _adamw_ref(bucket.params, gs, bucket.exp_avgs, bucket.exp_avg_sqs, bucket.max_exp_avg_sqs,
                           bucket.masters, bucket.steps, **hyper, found_inf=fi, grad_scale=gsc)


class FusedAdamW(torch.optim.Optimizer):
    """AdamW with a multi-tensor Triton kernel: fp32 state, optional fp32 master weights, device-side step counts,
    GradScaler-aware (skips the step on inf/NaN without a host sync), state dicts compatible with
    ``torch.optim.AdamW``.

    Args mirror ``torch.optim.AdamW``. ``master_weights=True`` keeps an fp32 copy of every fp16/bf16 parameter
    (state ``master_param``), updates it and writes the rounded value to the parameter; without it, half
    parameters are updated in fp32 and rounded every step. fp32 parameters never get a master copy.

    Caching: the first step of a group builds a plan -- buckets, launch tables, step counts packed into one fp32
    tensor per bucket (``state["step"]`` becomes a 0-dim view of it) -- and later steps reuse it. Each step checks,
    in O(number of tensors) Python with no tensor op: the group and ``self.state`` are the same objects
    (`load_state_dict` replaces both), the group holds the same parameter objects in the same order, each
    parameter's ``data_ptr()`` is unchanged (``p.data = other`` and ``module.to(...)`` move it), ``amsgrad`` and
    ``master_weights`` are unchanged, and the same parameters have a gradient, of the same dtype per bucket. Any
    difference rebuilds the plan. New gradient addresses only pick another launch table (cached per address set);
    a non-contiguous gradient is copied contiguous for the launch. Not detected, so call `invalidate()` after
    them: replacing or deleting state tensors by hand (``opt.state[p]["exp_avg"] = t``), and in-place metadata
    changes that keep a parameter's address (``p.data = p.data[:k]``, ``p.resize_()``, ``p.set_()``).
    """

    _step_supports_amp_scaling = True  # GradScaler passes grad_scale / found_inf instead of unscaling

    def __init__(
        self, params: ParamsT, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
        weight_decay: float = 1e-2, *, amsgrad: bool = False, maximize: bool = False, master_weights: bool = False,
    ):
        if isinstance(lr, torch.Tensor):
            raise TypeError("lr must be a float (a tensor lr is not supported)")
        if not 0.0 <= lr:
            raise ValueError(f"invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"invalid epsilon value: {eps}")
        if not 0.0 <= betas[0] < 1.0 or not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"invalid beta parameters: {betas}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"invalid weight_decay value: {weight_decay}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, master_weights=master_weights)
        super().__init__(params, defaults)
        self._plans: list[Optional[_Plan]] = []
        self._n_builds = 0  # plans built so far (tests count rebuilds)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("amsgrad", False)
            group.setdefault("maximize", False)
            group.setdefault("master_weights", self.defaults.get("master_weights", False))
        self._plans = []
        self._n_builds = getattr(self, "_n_builds", 0)

    def invalidate(self) -> None:
        """Forget the cached plans: the next step rebuilds them (needed only after the changes listed in the class
        docstring that a step cannot see)."""
        self._plans = []

    # -- state ----------------------------------------------------------------------------------------------
    def _init_state(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, Any]:
        state = self.state[p]
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
            state["exp_avg_sq"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        if group["amsgrad"] and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        if group["master_weights"] and p.dtype != torch.float32 and "master_param" not in state:
            state["master_param"] = p.detach().to(torch.float32, memory_format=torch.contiguous_format).clone()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict of this class or of ``torch.optim.AdamW``; state is kept fp32 on the param's device
        (read from the saved tensors, not from torch's cast to the parameter dtype). Rebuilds the cached plans."""
        saved_state = state_dict["state"]
        saved_ids = list(chain.from_iterable(g["params"] for g in state_dict["param_groups"]))
        super().load_state_dict(state_dict)
        params = list(chain.from_iterable(g["params"] for g in self.param_groups))
        id_to_param = dict(zip(saved_ids, params))
        for pid, saved in saved_state.items():
            p = id_to_param[pid]
            state = self.state[p]
            for key in _STATE_KEYS:
                if key in saved and torch.is_tensor(saved[key]):
                    state[key] = saved[key].to(device=p.device, dtype=torch.float32, copy=True).contiguous()
            if "step" in saved:
                step = saved["step"]
                step = step.detach() if torch.is_tensor(step) else torch.tensor(float(step))
                state["step"] = step.to(device=p.device, dtype=torch.float32, copy=True).reshape(())
        self.invalidate()

    # -- step -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(  # type: ignore[override]  # torch declares step() as two overloads; this one signature covers both
        self, closure: Optional[Callable[[], float]] = None,
    ) -> Optional[float]:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)  # set by GradScaler.step (None once unscale_ ran)
        found_inf = getattr(self, "found_inf", None)
        groups, plans = self.param_groups, self._plans
        del plans[len(groups):]
        plans.extend([None] * (len(groups) - len(plans)))
        for i, group in enumerate(groups):
            grads = [p.grad for p in group["params"]]
            plan = plans[i]
            if plan is None or not plan.matches(group, self.state, grads):
                plan = plans[i] = self._build(group, grads)
            beta1, beta2 = group["betas"]
            lr = group["lr"]
            hyper = dict(lr=lr.item() if isinstance(lr, torch.Tensor) else lr, beta1=beta1, beta2=beta2,
                         eps=group["eps"], weight_decay=group["weight_decay"], maximize=group["maximize"])
            plan.step(grads, hyper, grad_scale, found_inf)
        return loss

    def _build(self, group: dict[str, Any], grads: list[Optional[torch.Tensor]]) -> _Plan:
        """Bucket the group's parameters that have a gradient by (device, dtype, gradient dtype, master weights,
        kernel-ready layout), create missing state, pack each bucket's step counts and build its launch table."""
        params = group["params"]
        kinds: dict[tuple, list[int]] = {}
        for i, (p, g) in enumerate(zip(params, grads)):
            if g is None:
                continue
            if g.is_sparse:
                raise RuntimeError("FusedAdamW does not support sparse gradients")
            if p.is_complex():
                raise RuntimeError("FusedAdamW does not support complex parameters")
            state = self._init_state(p, group)
            contiguous = p.is_contiguous() and all(state[k].is_contiguous() for k in _STATE_KEYS if k in state)
            kinds.setdefault((p.device, p.dtype, g.dtype, "master_param" in state, contiguous), []).append(i)
        buckets = []
        for (device, _, grad_dtype, master, contiguous), idx in kinds.items():
            ps = [params[i] for i in idx]
            states = [self.state[p] for p in ps]
            # one fp32 tensor of step counts per bucket, advanced by one op per step; the state keeps 0-dim views
            steps = torch.stack([s["step"].detach().to(device, torch.float32).reshape(()) for s in states])
            for j, s in enumerate(states):
                s["step"] = steps[j]
            bucket = _Bucket(
                ps, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                [s["max_exp_avg_sq"] for s in states] if group["amsgrad"] else None,
                [s["master_param"] for s in states] if master else None, steps, grad_dtype)
            buckets.append((idx, bucket, contiguous))
        self._n_builds += 1
        return _Plan(group, self.state, grads, buckets)
