"""The one interface every serving backend implements: a forward step over a batch with a KV cache.

A backend is a model behind three calls the engine needs, whatever runs it (eager PyTorch, ONNX Runtime, TensorRT):

    forward(input_ids, attention_mask, position_ids, past, logits_to_keep=0) -> (logits, present)
        input_ids       int64 (B, T)           new tokens (T = prompt length at prefill, 1 at decode)
        attention_mask  int64 (B, P + T)       1 = real token, 0 = left padding (over past and new tokens)
        position_ids    int64 (B, T)           each new token's position, counting real tokens only
        past            KVCache or None        per layer (key, value), each (B, H_kv, P, D); None = empty
        logits_to_keep  int                    0 = logits for every position (evaluation: KServe infer, bench
                                               quality); k > 0 = the last k only (generation: prefill asks for 1)
        logits          float32 (B, T, V), or (B, min(k, T), V) for logits_to_keep k > 0
        present         KVCache                per layer (key, value), each (B, H_kv, P + T, D)

All tensors at this boundary are **torch tensors**: inputs may come on the CPU (the backend moves them), logits
and caches come back on `backend.device` (the backend converts from its runtime: zero-copy NumPy for ONNX Runtime,
device tensors for TensorRT), so the engine can cut, pad and join KV caches of different requests with torch ops,
without knowing which runtime made them. The cache layout is the reference model's and the exported
decoder's (`model/gpt.py`), so no backend reshapes it.

`prefill` and `decode` are the two steps continuous batching is made of; `BaseBackend` derives them from
`forward`. A backend also carries what the server needs to speak text: the tokenizer, the vocabulary size, the
context length, and the end-of-text id.
"""
from __future__ import annotations

from typing import Optional, Protocol, runtime_checkable

import torch
from tokenizers import Tokenizer

KVCache = list[tuple[torch.Tensor, torch.Tensor]]


@runtime_checkable
class Backend(Protocol):
    name: str  # "torch" | "onnxruntime" | "tensorrt"
    description: str  # one line for logs and /v2/models: runtime, provider, precision
    tokenizer: Tokenizer
    vocab_size: int
    max_context: int  # the model's context length (block_size)
    eos_id: Optional[int]
    device: torch.device  # where logits and caches live

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                past: Optional[KVCache], logits_to_keep: int = 0) -> tuple[torch.Tensor, KVCache]: ...

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, KVCache]: ...

    def decode(self, tokens: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
               past: KVCache) -> tuple[torch.Tensor, KVCache]: ...

    def close(self) -> None: ...


class BaseBackend:
    """`prefill` and `decode` on top of a subclass's `forward`; subclasses set the attributes of `Backend`."""

    name = "base"
    description = ""
    tokenizer: Tokenizer
    vocab_size = 0
    max_context = 0
    eos_id: Optional[int] = None
    device = torch.device("cpu")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                past: Optional[KVCache], logits_to_keep: int = 0
                ) -> tuple[torch.Tensor, KVCache]:  # pragma: no cover - abstract
        raise NotImplementedError

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, KVCache]:
        """Left-padded prompts (B, T) -> (last-position logits (B, V) float32, cache of length T).

        Only the last position's logits are computed (logits_to_keep 1): with left padding it is every row's last
        real token, and the LM head over the whole prompt would be wasted work and a (B, T, V) buffer."""
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        logits, present = self.forward(input_ids, attention_mask, position_ids, None, logits_to_keep=1)
        return logits[:, -1].float(), present

    def decode(self, tokens: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
               past: KVCache) -> tuple[torch.Tensor, KVCache]:
        """One token per row: tokens (B,), mask (B, P + 1), positions (B,) -> (logits (B, V), cache P + 1)."""
        logits, present = self.forward(tokens.view(-1, 1), attention_mask, position_ids.view(-1, 1), past,
                                       logits_to_keep=1)
        return logits[:, -1].float(), present

    def close(self) -> None:
        pass


def eos_of(tokenizer: Tokenizer) -> Optional[int]:
    """The end-of-text id of a hotpath tokenizer (None when it has none)."""
    try:
        return tokenizer.token_to_id("<|endoftext|>")
    except Exception:  # noqa: BLE001 - a foreign tokenizer object may raise anything; it just has no EOS id
        return None
