"""hotpath's reference model: GPT config and module, tokenizer, corpus, checkpoints, generation.

Names resolve lazily (PEP 562), so `import model` and torch-free submodules (:mod:`model.config`,
:mod:`model.prompt`, :mod:`model.next_token`) do not import torch; `model.GPT` and the checkpoint functions do.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the real names for type checkers; at run time they resolve on first use
    from .checkpoint import load_checkpoint, read_checkpoint, save_checkpoint, save_safetensors
    from .config import GPTConfig
    from .gpt import GPT

_LAZY = {
    "GPT": "gpt", "GPTConfig": "config",
    "load_checkpoint": "checkpoint", "read_checkpoint": "checkpoint", "save_checkpoint": "checkpoint",
    "save_safetensors": "checkpoint",
}

__all__ = ["GPT", "GPTConfig", "load_checkpoint", "read_checkpoint", "save_checkpoint", "save_safetensors"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
