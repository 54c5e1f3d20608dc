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
- Multi-tensor apply: the launcher builds one int64 table per launch on the host -- the addresses of each
  tensor's param / grad / state / step, its length, and a (tensor, chunk) pair per program -- copies it to the
  device in one transfer and launches one program per ``BLOCK`` chunk of any tensor. The table is cached by its
  addresses, so a steady-state step (or a CUDA-graph capture after warm-up) does no host-to-device copy.
  Per (device, parameter dtype, gradient dtype, master) bucket of a group: one launch for every full chunk
  (no bounds mask, so with 16-byte aligned tensors -- hinted with ``tl.multiple_of`` on the table's addresses --
  every access is a 16-byte vector) and one for the partial tail chunks, plus one ``_foreach_add_`` for the step
  counts: a few launches for a whole model.
- Host cost: a step walks the parameters in Python (~200 tensors for GPT-2) to build the buckets and the table
  key; when that approaches the kernel time, capture the step in a CUDA graph (see docs/kernels.md).
- Step counts are fp32 0-dim tensors on the parameter's device (as torch's fused/capturable AdamW keeps them), so
  nothing syncs with the host and the step can be captured in a CUDA graph. ``lr`` and the other
  hyper-parameters are read from the group at each ``step()`` (schedulers work); inside a captured graph they are
  frozen at capture time.
- GradScaler: ``_step_supports_amp_scaling = True``; the scaler hands us ``grad_scale`` and ``found_inf`` tensors.
  Gradients are unscaled in registers (never written back) and, when ``found_inf`` is set, every store is masked
  off and the step counts are not advanced -- on the device, without a host sync.
- The state dict uses ``torch.optim.AdamW``'s keys (``step``, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``)
  plus ``master_param`` for master weights, so state dicts load into ``torch.optim.AdamW`` and back.

Dispatch: CUDA -> the Triton kernel; CPU -> the PyTorch reference (``_adamw_ref``), unless TRITON_INTERPRET=1,
then the Triton kernel runs in Triton's interpreter.
"""
from __future__ import annotations

import functools
import math
from itertools import chain
from typing import Any, Callable, Optional

import torch
from torch.optim.optimizer import ParamsT

from ._dispatch import interpreting, use_triton

__all__ = ["FusedAdamW"]

try:  # Triton is optional: without it every path is the reference.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only on machines without triton
    triton = None
    tl = None

_BLOCK = 4096  # elements per program
_NUM_WARPS = 8
_STATE_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "master_param")


# ---------------------------------------------------------------------------------------------------------------
# 1. Triton kernel (a plain function here; decorated with triton.jit on first use, see _kernels()).
# ---------------------------------------------------------------------------------------------------------------
if tl is not None:

    def _adamw_multi_tensor_kernel(  # type: ignore[no-untyped-def]  # Triton reads annotations: constexprs only
        table_ptr,  # int64 (8, n_tensors): param, grad, m, v, vmax, master, step addresses and numel; then the
        # tensor id and the chunk index of every chunk entry (built by adamw_multi_tensor)
        param_like_ptr, grad_like_ptr,  # any tensor of the parameter / gradient dtype (types the raw addresses)
        found_inf_ptr, grad_scale_ptr,  # fp32 scalars (GradScaler), read only when HAS_* is set
        n_tensors, n_chunks, chunk_base,  # this launch runs chunk entries chunk_base .. chunk_base + grid - 1
        lr, decay, beta1, beta2, one_minus_beta1, one_minus_beta2, log_beta1, log_beta2, eps,
        AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, MASTER: tl.constexpr,
        HAS_FOUND_INF: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
        EVEN: tl.constexpr,  # every chunk of this launch is a full BLOCK: no bounds mask, vectorised accesses
    ):
        pid = chunk_base + tl.program_id(0)
        t = tl.load(table_ptr + 8 * n_tensors + pid)  # which tensor
        chunk = tl.load(table_ptr + 8 * n_tensors + n_chunks + pid)  # which chunk of it
        numel = tl.load(table_ptr + 7 * n_tensors + t)
        p_ptr = tl.load(table_ptr + 0 * n_tensors + t).to(param_like_ptr.dtype)
        g_ptr = tl.load(table_ptr + 1 * n_tensors + t).to(grad_like_ptr.dtype)
        m_ptr = tl.load(table_ptr + 2 * n_tensors + t).to(tl.pointer_type(tl.float32))
        v_ptr = tl.load(table_ptr + 3 * n_tensors + t).to(tl.pointer_type(tl.float32))
        step_ptr = tl.load(table_ptr + 6 * n_tensors + t).to(tl.pointer_type(tl.float32))
        if ALIGNED:  # every address is 16-byte aligned (checked on the host): lets loads vectorise
            p_ptr = tl.multiple_of(p_ptr, 16)
            g_ptr = tl.multiple_of(g_ptr, 16)
            m_ptr = tl.multiple_of(m_ptr, 16)
            v_ptr = tl.multiple_of(v_ptr, 16)

        offs = chunk * BLOCK + tl.arange(0, BLOCK)
        if EVEN:
            mask = tl.full([BLOCK], 1, tl.int1)  # uniform over the block, so it does not stop vectorisation
        else:
            mask = offs < numel
        if HAS_FOUND_INF:  # GradScaler saw inf/NaN: mask off every load and store (a uniform predicate)
            mask = mask & ((tl.zeros([BLOCK], tl.float32) + tl.load(found_inf_ptr)) == 0.0)

        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_GRAD_SCALE:
            g = g * (1.0 / tl.load(grad_scale_ptr))
        if MAXIMIZE:
            g = -g
        if MASTER:
            w_ptr = tl.load(table_ptr + 5 * n_tensors + t).to(tl.pointer_type(tl.float32))
            if ALIGNED:
                w_ptr = tl.multiple_of(w_ptr, 16)
            w = tl.load(w_ptr + offs, mask=mask, other=0.0)
        else:
            w = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + offs, mask=mask, other=0.0)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0)

        # bias corrections 1 - beta^step = -expm1(step * ln beta): a series near 0 (where exp(x) - 1 cancels),
        # exp(x) - 1 below -0.1 (relative error < 1e-6); x <= 0 always
        step = tl.load(step_ptr)
        x1 = step * log_beta1
        x2 = step * log_beta2
        e1 = x1 * (1.0 + x1 * (0.5 + x1 * (1.0 / 6 + x1 * (1.0 / 24 + x1 * (1.0 / 120 + x1 * (1.0 / 720))))))
        e2 = x2 * (1.0 + x2 * (0.5 + x2 * (1.0 / 6 + x2 * (1.0 / 24 + x2 * (1.0 / 120 + x2 * (1.0 / 720))))))
        bc1 = -tl.where(x1 > -0.1, e1, tl.exp(x1) - 1.0)
        bc2 = -tl.where(x2 > -0.1, e2, tl.exp(x2) - 1.0)
        step_size = tl.div_rn(lr, bc1)
        bc2_sqrt = tl.sqrt_rn(bc2)

        w = w * decay
        m = m + one_minus_beta1 * (g - m)
        v = v * beta2 + one_minus_beta2 * (g * g)
        if AMSGRAD:
            vmax_ptr = tl.load(table_ptr + 4 * n_tensors + t).to(tl.pointer_type(tl.float32))
            if ALIGNED:
                vmax_ptr = tl.multiple_of(vmax_ptr, 16)
            vmax = tl.maximum(tl.load(vmax_ptr + offs, mask=mask, other=0.0), v)
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
            # round to nearest even with integer ops: bit-exact with torch's .to(bfloat16) on the GPU and in the
            # interpreter (whose float->bf16 cast truncates)
            bits = w.to(tl.uint32, bitcast=True)
            rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            rounded = tl.where(w != w, 0x7FC0, rounded)  # keep NaN a NaN
            tl.store(p_ptr + offs, rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
        else:
            tl.store(p_ptr + offs, w.to(param_like_ptr.dtype.element_ty), mask=mask)


@functools.cache
def _kernels(interpret: bool) -> Any:
    """Decorate the kernel once per mode: Triton reads TRITON_INTERPRET when `triton.jit` runs."""
    return triton.jit(_adamw_multi_tensor_kernel)


# ---------------------------------------------------------------------------------------------------------------
# 2. Launcher (tensors in, updated in place; no autograd) and the PyTorch reference.
# ---------------------------------------------------------------------------------------------------------------
class _TableCache:
    """Device copies of launch tables, keyed by every address and length in them (small LRU)."""

    def __init__(self, size: int = 8):
        self.size = size
        self.tables: dict[tuple, torch.Tensor] = {}

    def get(self, key: tuple, device: torch.device, build: Callable[[], list[int]]) -> torch.Tensor:
        table = self.tables.pop(key, None)
        if table is None:
            table = torch.tensor(build(), dtype=torch.int64).to(device, non_blocking=True)
        self.tables[key] = table  # most recent last
        while len(self.tables) > self.size:
            self.tables.pop(next(iter(self.tables)))
        return table


def adamw_multi_tensor(
    params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor], max_exp_avg_sqs: Optional[list[torch.Tensor]],
    masters: Optional[list[torch.Tensor]], steps: list[torch.Tensor], *,
    lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, maximize: bool,
    found_inf: Optional[torch.Tensor] = None, grad_scale: Optional[torch.Tensor] = None,
    cache: Optional[_TableCache] = None, block: int = _BLOCK,
) -> None:
    """Update every tensor in place with two Triton launches: all full chunks (unmasked, vectorised), then the
    partial tail chunks (masked). Steps must already be incremented.

    All params share one device, dtype and gradient dtype; every tensor is contiguous; states are fp32.
    """
    n = len(params)
    if n == 0:
        return
    device = params[0].device
    numels = [p.numel() for p in params]
    chunks = [(numel + block - 1) // block for numel in numels]
    zeros = [0] * n
    rows = [
        [p.data_ptr() for p in params],
        [g.data_ptr() for g in grads],
        [m.data_ptr() for m in exp_avgs],
        [v.data_ptr() for v in exp_avg_sqs],
        [v.data_ptr() for v in max_exp_avg_sqs] if max_exp_avg_sqs is not None else zeros,
        [w.data_ptr() for w in masters] if masters is not None else zeros,
        [s.data_ptr() for s in steps],
        numels,
    ]
    key = (block, *chain.from_iterable(rows))

    def build():
        # chunk entries: every full chunk first (launched with EVEN), then the partial tail chunks
        full = [(i, c) for i, numel in enumerate(numels) for c in range(numel // block)]
        tail = [(i, numel // block) for i, numel in enumerate(numels) if numel % block]
        entries = full + tail
        return list(chain.from_iterable(rows)) + [i for i, _ in entries] + [c for _, c in entries]

    table = (cache or _TableCache()).get(key, device, build)
    n_chunks = sum(chunks)
    n_full = sum(numel // block for numel in numels)
    if n_chunks == 0:
        return
    aligned = all(a % 16 == 0 for row in rows[:6] for a in row if a)
    dummy = steps[0]  # typed stand-in for absent scalar tensors (never read)
    kernel = _kernels(interpreting())
    for grid, base, even in ((n_full, 0, True), (n_chunks - n_full, n_full, False)):
        if grid == 0:
            continue
        kernel[(grid,)](
            table, params[0], grads[0],
            found_inf if found_inf is not None else dummy, grad_scale if grad_scale is not None else dummy,
            n, n_chunks, base,
            float(lr), 1.0 - lr * weight_decay, float(beta1), float(beta2), 1.0 - beta1, 1.0 - beta2,
            _log(beta1), _log(beta2), float(eps),
            AMSGRAD=max_exp_avg_sqs is not None, MAXIMIZE=bool(maximize), MASTER=masters is not None,
            HAS_FOUND_INF=found_inf is not None, HAS_GRAD_SCALE=grad_scale is not None,
            ALIGNED=aligned and not interpreting(), BLOCK=block, EVEN=even, num_warps=_NUM_WARPS,
        )


def _log(beta: float) -> float:
    return math.log(beta) if beta > 0 else float("-inf")


def _adamw_ref(
    params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor], max_exp_avg_sqs: Optional[list[torch.Tensor]],
    masters: Optional[list[torch.Tensor]], steps: list[torch.Tensor], *,
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
class FusedAdamW(torch.optim.Optimizer):
    """AdamW with a multi-tensor Triton kernel: fp32 state, optional fp32 master weights, device-side step counts,
    GradScaler-aware (skips the step on inf/NaN without a host sync), state dicts compatible with
    ``torch.optim.AdamW``.

    Args mirror ``torch.optim.AdamW``. ``master_weights=True`` keeps an fp32 copy of every fp16/bf16 parameter
    (state ``master_param``), updates it and writes the rounded value to the parameter; without it, half
    parameters are updated in fp32 and rounded every step. fp32 parameters never get a master copy.
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
        self._tables = _TableCache()

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("amsgrad", False)
            group.setdefault("maximize", False)
            group.setdefault("master_weights", self.defaults.get("master_weights", False))
        if not hasattr(self, "_tables"):
            self._tables = _TableCache()

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
        (read from the saved tensors, not from torch's cast to the parameter dtype)."""
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
        for group in self.param_groups:
            self._step_group(group, grad_scale, found_inf)
        return loss

    def _step_group(self, group: dict[str, Any], grad_scale: Optional[torch.Tensor],
                    found_inf: Optional[torch.Tensor]) -> None:
        beta1, beta2 = group["betas"]
        hyper = dict(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                     weight_decay=group["weight_decay"], maximize=group["maximize"])
        if isinstance(hyper["lr"], torch.Tensor):
            hyper["lr"] = hyper["lr"].item()
        buckets: dict[tuple, list] = {}
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("FusedAdamW does not support sparse gradients")
            if p.is_complex():
                raise RuntimeError("FusedAdamW does not support complex parameters")
            state = self._init_state(p, group)
            key = (p.device, p.dtype, p.grad.dtype, "master_param" in state, p.is_contiguous())
            buckets.setdefault(key, []).append((p, state))

        for (device, _, _, master, contiguous), items in buckets.items():
            params = [p for p, _ in items]
            grads = [p.grad if p.grad.is_contiguous() else p.grad.contiguous() for p in params]
            states = [s for _, s in items]
            steps = [s["step"] for s in states]
            fi = None if found_inf is None else found_inf.to(device=device, dtype=torch.float32)
            gs = None if grad_scale is None else grad_scale.to(device=device, dtype=torch.float32)
            # advance the step counts on the device (not at all when GradScaler found inf/NaN)
            if fi is None:
                torch._foreach_add_(steps, 1.0)
            else:
                torch._foreach_add_(steps, 1.0 - fi)
            args = (
                params, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                [s["max_exp_avg_sq"] for s in states] if group["amsgrad"] else None,
                [s["master_param"] for s in states] if master else None, steps,
            )
            if use_triton(params[0]) and contiguous:
                adamw_multi_tensor(*args, **hyper, found_inf=fi, grad_scale=gs, cache=self._tables)
            else:
                _adamw_ref(*args, **hyper, found_inf=fi, grad_scale=gs)
