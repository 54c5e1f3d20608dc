"""The reference GPT: GPT-2 layout with Llama-style options, in plain PyTorch.

Readable and exportable first. Options: LayerNorm or RMSNorm, learned or rotary positions, GELU or SwiGLU MLP,
grouped-query attention (``n_kv_head``), tied embeddings, biases on or off.

Attention goes through one swappable function, the instance attribute ``CausalSelfAttention.attn_fn``
(default :func:`sdpa_attention`). Its contract, which ``kernels.patch()`` relies on::

    attn_fn(q, k, v, *, causal: bool, attn_mask: Tensor | None, scale: float) -> Tensor
        q: (B, H, T, D); k, v: (B, H_kv, S, D) with H % H_kv == 0; returns (B, H, T, D)
        causal: query i (of T) sees key j (of S) iff j <= i + S - T (bottom-right aligned, as in a KV cache)
        attn_mask: None, or bool (B, 1, T, S) with True = may attend (padding), applied on top of `causal`

The KV cache is a list of per-layer ``(key, value)`` tuples, each ``(B, H_kv, past_len, D)``: the layout ONNX
Runtime GenAI and Optimum use, so the exported decoder takes and returns the same tensors.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.types import Device

from .config import GPTConfig  # re-exported: model.gpt.GPTConfig is its public name

KV = tuple[Tensor, Tensor]  # one layer's (key, value), each (B, H_kv, past_len, D)
KVCache = list[KV]
AttnFn = Callable[..., Tensor]  # attn_fn(q, k, v, *, causal, attn_mask, scale) -> (B, H, T, D)


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool, attn_mask: Optional[Tensor],
                   scale: float) -> Tensor:
    """Default ``attn_fn``: PyTorch's scaled_dot_product_attention, with the bottom-right causal rule."""
    T, S = q.shape[-2], k.shape[-2]
    if k.shape[1] != q.shape[1]:  # grouped-query: repeat K/V heads (exports to plain ONNX ops)
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    if attn_mask is None and (not causal or T == 1):
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    if attn_mask is None and T == S:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    mask = causal_mask(T, S, q.device) if causal else None
    if attn_mask is not None:
        mask = attn_mask if mask is None else (mask & attn_mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def causal_mask(T: int, S: int, device: Device = None) -> Tensor:
    """(T, S) bool, True where query i may see key j: j <= i + S - T (bottom-right aligned)."""
    i = torch.arange(T, device=device).unsqueeze(1)
    j = torch.arange(S, device=device).unsqueeze(0)
    return j <= i + (S - T)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.to(x.dtype) * self.weight


def make_norm(cfg: GPTConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.n_embd, cfg.norm_eps)
    return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)


def rope_cos_sin(position_ids: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos, sin of shape (B, 1, T, head_dim) for the rotate-half convention (Llama, GPT-NeoX)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device).float() / head_dim))
    angles = position_ids.float().unsqueeze(-1) * inv_freq  # (B, T, D/2)
    angles = torch.cat([angles, angles], dim=-1).unsqueeze(1)  # (B, 1, T, D)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        assert cfg.n_kv_head is not None and cfg.head_dim is not None  # GPTConfig.__post_init__ fills them
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_head * cfg.head_dim, bias=cfg.bias)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=cfg.bias)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=cfg.bias)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)
        self.attn_fn: AttnFn = sdpa_attention  # the documented hook: kernels.patch() swaps it per instance

    def forward(self, x: Tensor, rope: Optional[tuple[Tensor, Tensor]] = None, past: Optional[KV] = None,
                attn_mask: Optional[Tensor] = None) -> tuple[Tensor, KV]:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, H_kv, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)  # (B, H_kv, past + T, D)
            v = torch.cat([past[1], v], dim=2)
        y = self.attn_fn(q, k, v, causal=True, attn_mask=attn_mask, scale=1.0 / math.sqrt(self.head_dim))
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return self.dropout(self.o_proj(y)), (k, v)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        assert cfg.mlp_hidden is not None  # GPTConfig.__post_init__ fills it
        self.swiglu = cfg.mlp == "swiglu"
        self.up_proj = nn.Linear(cfg.n_embd, cfg.mlp_hidden, bias=cfg.bias)
        if self.swiglu:
            self.gate_proj = nn.Linear(cfg.n_embd, cfg.mlp_hidden, bias=cfg.bias)
        self.down_proj = nn.Linear(cfg.mlp_hidden, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        if self.swiglu:
            h = F.silu(self.gate_proj(x)) * self.up_proj(x)
        else:
            h = F.gelu(self.up_proj(x), approximate="tanh")
        return self.dropout(self.down_proj(h))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = make_norm(cfg)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, rope: Optional[tuple[Tensor, Tensor]] = None, past: Optional[KV] = None,
                attn_mask: Optional[Tensor] = None) -> tuple[Tensor, KV]:
        a, present = self.attn(self.ln_1(x), rope, past, attn_mask)
        x = x + a
        return x + self.mlp(self.ln_2(x)), present


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.pos == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)
        # GPT-2: scale the residual projections by 1/sqrt(2 * n_layer)
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(
        self,
        input_ids: Tensor,
        *,
        past_key_values: Optional[KVCache] = None,
        attention_mask: Optional[Tensor] = None,
        position_ids: Optional[Tensor] = None,
        use_cache: bool = False,
        logits_to_keep: int = 0,
    ) -> Tensor | tuple[Tensor, KVCache]:
        """Logits (B, T, vocab); with ``use_cache`` returns ``(logits, present_key_values)``.

        logits_to_keep: 0 = logits for every position (evaluation, training); k > 0 = only the last k positions,
        (B, min(k, T), vocab), so a generation prefill skips the LM head (and its T x vocab output) for the prompt.

        attention_mask: (B, past_len + T), 1 for real tokens and 0 for (left) padding.
        position_ids: (B, T); by default counted from the past length, skipping padding when a mask is given.
        """
        B, T = input_ids.shape
        past_len = past_key_values[0][0].shape[2] if past_key_values else 0
        if position_ids is None:
            position_ids = default_position_ids(attention_mask, past_len, T, input_ids.device)
        x = self.wte(input_ids)
        rope = None
        if self.wpe is not None:
            x = x + self.wpe(position_ids)
        else:
            assert self.config.head_dim is not None  # GPTConfig.__post_init__ fills it
            rope = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, x.dtype)
        x = self.drop(x)
        mask = None
        if attention_mask is not None:
            mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, S)
            mask = mask.expand(B, 1, T, past_len + T)
            # a fully padded query row would make softmax NaN; let such rows see themselves (outputs ignored)
            mask = mask | _diag(T, past_len, input_ids.device)
        presents = []
        for i, block in enumerate(self.blocks):
            x, present = block(x, rope, past_key_values[i] if past_key_values else None, mask)
            presents.append(present)
        logits = self.lm_head(self.ln_f(last_positions(x, logits_to_keep)))
        return (logits, presents) if use_cache else logits


def last_positions(x: Tensor, keep: Any) -> Tensor:
    """x (B, T, C) -> its last `keep` positions (B, min(keep, T), C); keep = 0 keeps all.

    Written as one slice start without branches so that torch.export traces `keep` as a symbolic int and the ONNX
    graph takes it as an input: start = (T - min(keep, T)) mod T is 0 for keep = 0 and for keep >= T."""
    if isinstance(keep, int) and keep < 0:
        raise ValueError(f"logits_to_keep={keep} must be 0 (all positions) or positive")
    T = x.shape[1]
    start = (T - torch.sym_min(keep, T)) % T
    return x[:, start:]


def _diag(T: int, past_len: int, device: Device) -> Tensor:
    """(T, past_len + T) bool: True only where query i meets its own key (past_len + i)."""
    i = torch.arange(T, device=device).unsqueeze(1)
    j = torch.arange(past_len + T, device=device).unsqueeze(0)
    return j == i + past_len


def default_position_ids(attention_mask: Optional[Tensor], past_len: int, T: int, device: Device) -> Tensor:
    """position_ids (1 or B, T) for the last T tokens after `past_len` cached ones (pads count as position 0)."""
    if attention_mask is None:
        return torch.arange(past_len, past_len + T, device=device).unsqueeze(0)
    # left padding: a token's position counts the real tokens before it
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.clamp(min=0)[:, -T:]
