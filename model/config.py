"""The GPT's configuration, :class:`GPTConfig`: shape and options as plain data, with no torch, so the runtimes
that read a config from an exported file (ONNX Runtime, TensorRT) need not import torch. :mod:`model.gpt`
re-exports it."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Optional


@dataclass
class GPTConfig:
    vocab_size: int = 4096
    block_size: int = 256  # context length
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: Optional[int] = None  # None = n_head (multi-head); 1 = multi-query
    n_embd: int = 256
    head_dim: Optional[int] = None  # None = n_embd // n_head; explicit after structured head pruning
    mlp_hidden: Optional[int] = None  # None = 4*n_embd (gelu) or ~8/3*n_embd rounded to 64 (swiglu)
    norm: str = "layernorm"  # layernorm | rmsnorm
    norm_eps: float = 1e-5
    pos: str = "learned"  # learned | rope
    rope_theta: float = 10000.0
    mlp: str = "gelu"  # gelu (tanh approximation, as GPT-2) | swiglu
    bias: bool = True
    tie_embeddings: bool = True
    dropout: float = 0.0

    PRESETS = {
        # trains on a CPU in seconds; for tests
        "tiny": dict(block_size=64, n_layer=2, n_head=4, n_embd=64),
        # ~3M parameters; trains on 2 CPU cores in minutes
        "small": dict(block_size=256, n_layer=4, n_head=6, n_embd=192),
        # the 124M GPT-2 shape
        "gpt2": dict(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768),
    }

    def __post_init__(self) -> None:
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.head_dim is None:
            if self.n_embd % self.n_head:
                raise ValueError(f"n_embd={self.n_embd} is not a multiple of n_head={self.n_head}")
            self.head_dim = self.n_embd // self.n_head
        if self.mlp_hidden is None:
            self.mlp_hidden = 4 * self.n_embd if self.mlp == "gelu" else 64 * math.ceil(8 * self.n_embd / 3 / 64)
        checks = [
            (self.n_head % self.n_kv_head == 0,
             f"n_head={self.n_head} is not a multiple of n_kv_head={self.n_kv_head}"),
            (self.norm in ("layernorm", "rmsnorm"), f"norm={self.norm!r} (use layernorm or rmsnorm)"),
            (self.pos in ("learned", "rope"), f"pos={self.pos!r} (use learned or rope)"),
            (self.mlp in ("gelu", "swiglu"), f"mlp={self.mlp!r} (use gelu or swiglu)"),
            (self.pos != "rope" or self.head_dim % 2 == 0, "rotary positions need an even head dimension"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> GPTConfig:
        if name not in cls.PRESETS:
            raise ValueError(f"unknown preset {name!r} (choose from {', '.join(cls.PRESETS)})")
        return cls(**{**cls.PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GPTConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown config keys {sorted(unknown)}")
        return cls(**d)
