"""Thin module wrappers and ``patch(model)`` / ``unpatch(model)`` / ``with patched(model):``.

``patch`` makes one model instance run its attention and its explicit softmax modules on the fused kernels, and
changes nothing else: no class is modified, other instances are untouched, the state dict is unchanged, and
``unpatch`` restores exactly what was there.

What gets patched (found by the documented hooks, never by importing a project package):

- **hotpath's reference GPT** (and any module following the same contract): every module whose *instance*
  attribute ``attn_fn`` holds the attention function, called as
  ``attn_fn(q, k, v, *, causal, attn_mask, scale) -> (B, H, T, D)``. It is replaced by a ``KernelAttnFn`` that calls
  ``kernels.attention`` when ``attn_mask`` is None and the original function otherwise (masks are not fused).
- **Hugging Face transformers models** (``PreTrainedModel``): through transformers' own registries. The function
  ``hf_attention`` is registered once as attention implementation ``"hotpath"`` (``AttentionInterface``) with
  SDPA's mask builder (``AttentionMaskInterface``), so causal-only batches reach it with ``attention_mask=None``.
  The patched model gets a private copy of its config with ``set_attn_implementation("hotpath")``: configs can be
  shared by several models built from one config object, and the copy keeps the others untouched. ``unpatch``
  puts the original config objects back (edits made to the config while patched are dropped with the copy).
- **``nn.Softmax`` modules** over the last dimension: their instance ``forward`` calls ``kernels.softmax``
  (other dims keep the original forward). Calls to ``torch.softmax`` / ``F.softmax`` inside a model's code cannot be
  patched per instance and are left alone.
"""
from __future__ import annotations

import contextlib
import copy
import sys
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from .flash_attention import attention
from .fused_softmax import softmax

__all__ = ["patch", "unpatch", "patched", "is_patched", "Softmax", "Attention", "KernelAttnFn", "hf_attention",
           "HF_ATTN_IMPLEMENTATION"]

HF_ATTN_IMPLEMENTATION = "hotpath"  # the name registered with transformers' AttentionInterface
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ---------------------------------------------------------------------------------------------------------------
# Thin nn.Module wrappers around the functional kernels.
# ---------------------------------------------------------------------------------------------------------------
class Softmax(nn.Module):
    """``kernels.softmax`` over the last dimension as a module (``scale`` and ``causal`` fixed at construction)."""

    def __init__(self, scale: float = 1.0, causal: bool = False):
        super().__init__()
        self.scale, self.causal = float(scale), bool(causal)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return softmax(x, scale=self.scale, causal=self.causal)

    def extra_repr(self) -> str:
        return f"scale={self.scale}, causal={self.causal}"


class Attention(nn.Module):
    """``kernels.attention`` as a module: forward(q (B,H,T,D), k/v (B,H_kv,S,D)) -> (B,H,T,D)."""

    def __init__(self, causal: bool = True, scale: Optional[float] = None):
        super().__init__()
        self.causal, self.scale = bool(causal), scale

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return attention(q, k, v, causal=self.causal, scale=self.scale)

    def extra_repr(self) -> str:
        return f"causal={self.causal}, scale={self.scale}"


# ---------------------------------------------------------------------------------------------------------------
# The reference model's hook: the instance attribute `attn_fn`.
# ---------------------------------------------------------------------------------------------------------------
class KernelAttnFn:
    """Drop-in ``attn_fn``: ``kernels.attention`` when there is no mask, else the original function."""

    def __init__(self, original: Callable):
        self.original = original

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
                 attn_mask: Optional[torch.Tensor] = None, scale: float) -> torch.Tensor:
        if attn_mask is not None or q.dtype not in _KERNEL_DTYPES:
            return self.original(q, k, v, causal=causal, attn_mask=attn_mask, scale=scale)
        return attention(q, k, v, causal=causal, scale=scale)

    def __repr__(self) -> str:
        return f"KernelAttnFn(original={self.original!r})"


class _SoftmaxForward:
    """Instance ``forward`` for an ``nn.Softmax``: the kernel when it reduces the last dim, else the original."""

    def __init__(self, module: nn.Softmax, previous: Optional[Callable]):
        self.module, self.previous = module, previous  # previous: an instance-level forward there before us

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        dim = self.module.dim
        if dim is not None and x.dim() > 0 and dim % x.dim() == x.dim() - 1 and x.dtype in _KERNEL_DTYPES:
            return softmax(x)
        if self.previous is not None:
            return self.previous(x)
        return type(self.module).forward(self.module, x)


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face transformers: its attention-function registry.
# ---------------------------------------------------------------------------------------------------------------
_hf_registered = False
_HF_UNSUPPORTED_KWARGS = ("sliding_window", "softcap", "s_aux", "position_bias", "head_mask")


def _is_hf_model(model: nn.Module) -> bool:
    if "transformers" not in sys.modules:  # a transformers model implies transformers is imported
        return False
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel)


def hf_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: Optional[torch.Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
                 is_causal: Optional[bool] = None, **kwargs: Any) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """transformers attention function (registered as ``"hotpath"``): ``kernels.attention`` for causal or full
    attention without a mask, dropout or extras; otherwise the model's original implementation (SDPA by default).

    query (B, H, T, D), key/value (B, H_kv, S, D) -> ((B, T, H, D), None), as transformers expects.
    """
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    extras = any(kwargs.get(name) is not None for name in _HF_UNSUPPORTED_KWARGS)
    if (attention_mask is None and (dropout == 0.0 or not module.training) and not extras
            and query.dtype in _KERNEL_DTYPES and query.dtype == key.dtype == value.dtype):
        out = attention(query, key, value, causal=bool(causal), scale=scaling)  # (B, H, T, D)
        return out.transpose(1, 2).contiguous(), None
    return _hf_fallback(module)(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                is_causal=is_causal, **kwargs)


def _hf_fallback(module: nn.Module) -> Callable:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    name = module.__dict__.get("_hotpath_fallback_attn")  # the implementation the model had before patch()
    if name in (None, "eager", HF_ATTN_IMPLEMENTATION) or name not in ALL_ATTENTION_FUNCTIONS:
        return sdpa_attention_forward  # eager and SDPA compute the same function
    return ALL_ATTENTION_FUNCTIONS[name]


def _register_hf() -> None:
    global _hf_registered
    if _hf_registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(HF_ATTN_IMPLEMENTATION, hf_attention)
    # SDPA's mask builder returns None for causal-only batches (so the kernel runs) and a bool mask with padding
    AttentionMaskInterface.register(HF_ATTN_IMPLEMENTATION, sdpa_mask)
    _hf_registered = True


def _config_tree(config: Any) -> list[Any]:
    """The config and its sub-configs (depth first), for a parallel walk of a config and its deep copy."""
    out, stack = [], [config]
    while stack:
        c = stack.pop()
        out.append(c)
        for key in getattr(c, "sub_configs", {}) or {}:
            sub = getattr(c, key, None)
            if sub is not None:
                stack.append(sub)
    return out


def _patch_hf(model: Any) -> None:
    _register_hf()
    old = model.config
    new = copy.deepcopy(old)
    mapping = {id(a): b for a, b in zip(_config_tree(old), _config_tree(new))}
    for module in model.modules():
        cfg = module.__dict__.get("config")
        if cfg is not None and id(cfg) in mapping:
            module._hotpath_original_config = cfg
            module._hotpath_fallback_attn = getattr(cfg, "_attn_implementation", None)
            module.config = mapping[id(cfg)]
    model.set_attn_implementation(HF_ATTN_IMPLEMENTATION)


def _unpatch_hf(model: nn.Module) -> None:
    for module in model.modules():
        if "_hotpath_original_config" in module.__dict__:
            module.config = module.__dict__.pop("_hotpath_original_config")
            module.__dict__.pop("_hotpath_fallback_attn", None)


# ---------------------------------------------------------------------------------------------------------------
# patch / unpatch / patched
# ---------------------------------------------------------------------------------------------------------------
def patch(model: nn.Module) -> nn.Module:
    """Run this model instance's attention and ``nn.Softmax`` modules on the fused kernels; returns ``model``.

    Idempotent, instance-scoped, reversible with ``unpatch``; the state dict is unchanged.
    """
    if _is_hf_model(model) and "_hotpath_original_config" not in model.__dict__:
        _patch_hf(model)
    for module in model.modules():
        fn = module.__dict__.get("attn_fn")
        # setattr: the hooks are plain instance attributes, found by name on any module
        if fn is not None and callable(fn) and not isinstance(fn, KernelAttnFn):
            setattr(module, "attn_fn", KernelAttnFn(fn))
        if isinstance(module, nn.Softmax) and not isinstance(module.__dict__.get("forward"), _SoftmaxForward):
            setattr(module, "forward", _SoftmaxForward(module, module.__dict__.get("forward")))
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo ``patch``: restore every original ``attn_fn``, softmax ``forward`` and (Hugging Face) config."""
    if _is_hf_model(model):
        _unpatch_hf(model)
    for module in model.modules():
        fn = module.__dict__.get("attn_fn")
        if isinstance(fn, KernelAttnFn):
            setattr(module, "attn_fn", fn.original)
        fwd = module.__dict__.get("forward")
        if isinstance(fwd, _SoftmaxForward):
            if fwd.previous is None:
                del module.forward
            else:
                setattr(module, "forward", fwd.previous)
    return model


def is_patched(model: nn.Module) -> bool:
    """Does any part of ``model`` currently run on the kernels through ``patch``?"""
    for module in model.modules():
        if isinstance(module.__dict__.get("attn_fn"), KernelAttnFn):
            return True
        if isinstance(module.__dict__.get("forward"), _SoftmaxForward):
            return True
        if "_hotpath_original_config" in module.__dict__:
            return True
    return False


@contextlib.contextmanager
def patched(model: nn.Module) -> Iterator[nn.Module]:
    """``with patched(model):`` runs the body with ``model`` patched, then unpatches it (if it was not patched
    already on entry, in which case it is left as it was)."""
    if is_patched(model):
        yield model
        return
    patch(model)
    try:
        yield model
    finally:
        unpatch(model)
