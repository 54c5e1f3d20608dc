"""Int8 quantization of the PyTorch model's linear layers, for the eager `torch` serving backend.

Two modes, both on every `nn.Linear` of the model (attention projections, MLP, and the language-model head):

- ``int8-weight``: weight-only. Each weight row (output channel) is stored as int8 with one fp32 scale,
  ``w ~ q * s`` with ``s = max|w_row| / 127`` (symmetric, per channel). Activations stay fp32; the weight is
  dequantized on the fly in `forward`. What it buys is memory (linear weights 4x smaller at rest), not CPU speed.
- ``int8-dynamic``: `torch.ao.quantization.quantize_dynamic` with per-channel int8 weights; activations are
  quantized per batch at run time and the matmul runs in int8 (fbgemm/onednn). This is the CPU speed mode.

`quantize_model` swaps submodules in place of a deep copy, so the model's
``forward(input_ids, past_key_values=..., attention_mask=..., position_ids=..., use_cache=...)`` is unchanged.

Saving: `save_quantized_checkpoint` writes an ordinary hotpath checkpoint whose weights are already rounded to the
int8 grid (so even a plain `load_checkpoint` computes what int8-weight computes) and whose ``meta["quantization"]``
says which mode to apply at load; `load_quantized(path)` loads it and re-applies the mode (`apply_quantization`
does the second half for a model you loaded yourself). Re-quantizing grid-rounded weights is exact.
"""
from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.errors import UserError

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from model.gpt import GPT

MODES = ("int8-weight", "int8-dynamic")
META_KEY = "quantization"


def quantize_weight_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: returns (q int8 (out, in), scale fp32 (out,))."""
    w = w.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.clamp(torch.round(w / scale[:, None]), -127, 127).to(torch.int8)
    return q, scale


class Int8WeightOnlyLinear(nn.Module):
    """A linear layer holding int8 weights and per-channel scales; computes in the input's dtype."""

    weight_int8: torch.Tensor  # (out, in) int8, a buffer
    weight_scale: torch.Tensor  # (out,) fp32, a buffer

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor]):
        super().__init__()
        self.in_features, self.out_features = q.shape[1], q.shape[0]
        self.register_buffer("weight_int8", q)
        self.register_buffer("weight_scale", scale)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8WeightOnlyLinear":
        q, scale = quantize_weight_int8(linear.weight)
        return cls(q, scale, linear.bias)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.weight_int8.to(dtype) * self.weight_scale.to(dtype)[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise UserError(f"unknown torch quantization mode {mode!r} (choose from {', '.join(MODES)})")


def quantize_model(model: nn.Module, mode: str = "int8-weight", *, inplace: bool = False) -> nn.Module:
    """A copy of `model` (or `model` itself with inplace=True) with its linear layers quantized to int8.

    The result keeps the model's forward signature and its `config`; it is meant for inference (eval mode, CPU
    for int8-dynamic)."""
    _check_mode(mode)
    model = model if inplace else copy.deepcopy(model)
    model.eval()
    if mode == "int8-weight":
        _swap_linears(model, Int8WeightOnlyLinear.from_linear)
    else:
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        with warnings.catch_warnings():  # torch.ao.quantization is deprecated in favour of torchao; still works
            warnings.simplefilter("ignore")
            quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)
    return model


def _swap_linears(module: nn.Module, make: Callable[[nn.Linear], nn.Module]) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, make(child))
        else:
            _swap_linears(child, make)


def linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


@torch.no_grad()
def round_to_int8_grid(model: nn.Module) -> nn.Module:
    """In place: every linear weight replaced by its int8 per-channel dequantization (fake quantization).

    Tied weights (lm_head = wte) are rounded once, so the embedding sees the same values as the head."""
    seen = set()
    for m in model.modules():
        if isinstance(m, nn.Linear) and id(m.weight) not in seen:
            seen.add(id(m.weight))
            q, s = quantize_weight_int8(m.weight)
            m.weight.copy_((q.float() * s[:, None]).to(m.weight.dtype))
    return model


def quantization_meta(mode: str) -> dict[str, Any]:
    return {"backend": "torch", "mode": mode, "weights": "int8 symmetric per output channel",
            "layers": "every nn.Linear", "apply": "quantize.torch_quant.load_quantized"}


def save_quantized_checkpoint(path: str | os.PathLike, model: GPT, tokenizer: Tokenizer, meta: Optional[dict],
                              mode: str) -> Path:
    """Write `model` (unquantized GPT) as a checkpoint marked for `mode`, weights rounded to the int8 grid."""
    from model.checkpoint import save_checkpoint

    _check_mode(mode)
    rounded = copy.deepcopy(model)
    round_to_int8_grid(rounded)
    meta = {**(meta or {}), META_KEY: quantization_meta(mode)}
    return save_checkpoint(Path(path), rounded, tokenizer, meta)


def apply_quantization(model: nn.Module, meta: Optional[dict]) -> nn.Module:
    """Quantize a freshly loaded model as its checkpoint's meta asks (unchanged when it asks nothing)."""
    q = (meta or {}).get(META_KEY)
    if not q or q.get("backend") != "torch":
        return model
    return quantize_model(model, q["mode"], inplace=True)


def load_quantized(path: str | os.PathLike, device: str = "cpu") -> tuple[nn.Module, Tokenizer, dict[str, Any]]:
    """`load_checkpoint` plus the quantization its meta records: (model, tokenizer, meta)."""
    from model.checkpoint import load_checkpoint

    model, tokenizer, meta = load_checkpoint(Path(path), device=device)
    return apply_quantization(model, meta), tokenizer, meta


def model_bytes(model: nn.Module) -> int:
    """Bytes of parameters and buffers (shared tensors once), including packed int8 dynamic weights."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    for m in model.modules():  # torch.ao dynamic linears keep packed weights outside parameters
        if hasattr(m, "_packed_params") and hasattr(m, "weight") and callable(m.weight):
            w = m.weight()
            total += w.numel() * 1 + (w.q_per_channel_scales().numel() * 8 if w.qscheme() in
                                      (torch.per_channel_affine, torch.per_channel_symmetric) else 8)
    return total
