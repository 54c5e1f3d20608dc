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

`prefill` and `decode` run a whole batch with the cache passed in and out (bench/ times them). The serving engine
uses the slot calls instead, on a preallocated `SlotCache` (one row per request, written in place; see
`slot_cache.py`):

    new_cache(slots, max_len) -> SlotCache     per layer (key, value), each (slots, kv_heads, capacity, head_dim),
                                               capacity growing in chunks up to max_len (`cache.fit`)
    prefill_slot(cache, slot, input_ids (1, T), offset=0) -> logits (V,)
                                               one request's prompt (or the next chunk of it, after `offset` tokens
                                               already in the slot), no padding; writes columns [offset, offset + T)
                                               of the slot; only the last position's logits
    decode_slots(cache, start, n, tokens (n,), lengths (n,)) -> logits (n, V)
                                               one token for each of the slots [start, start + n), whose caches hold
                                               `lengths` tokens; writes each row's new key/value at column length_b

`BaseBackend` derives all of them from `forward`. A backend whose runtime can write the cache in place (ONNX
Runtime with a shared past/present buffer) overrides the three slot calls and keeps the engine unchanged. A backend
also carries what the server needs to speak text: the tokenizer, the vocabulary size, the context length, and the
end-of-text id; and the cache's shape: layers, kv heads, head size, dtype.
"""
from __future__ import annotations

from typing import Optional, Protocol, runtime_checkable

import torch
from tokenizers import Tokenizer

from .slot_cache import SlotCache

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
    n_layer: int
    kv_heads: int
    head_dim: int
    kv_dtype: torch.dtype  # the cache's dtype (the runtime's past_key_values)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                past: Optional[KVCache], logits_to_keep: int = 0) -> tuple[torch.Tensor, KVCache]: ...

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, KVCache]: ...

    def decode(self, tokens: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
               past: KVCache) -> tuple[torch.Tensor, KVCache]: ...

    def new_cache(self, slots: int, max_len: int) -> SlotCache: ...

    def prefill_slot(self, cache: SlotCache, slot: int, input_ids: torch.Tensor, offset: int = 0) -> torch.Tensor: ...

    def decode_slots(self, cache: SlotCache, start: int, n: int, tokens: torch.Tensor,
                     lengths: torch.Tensor) -> torch.Tensor: ...

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
    n_layer = 0
    kv_heads = 0
    head_dim = 0
    kv_dtype = torch.float32

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

    # ------------------------------------------------------------------ slots (the serving engine's calls)
    def new_cache(self, slots: int, max_len: int) -> SlotCache:
        """An empty cache of `slots` rows and up to `max_len` columns (allocated as `fit` asks)."""
        return SlotCache(self.n_layer, slots, self.kv_heads, self.head_dim, max_len, dtype=self.kv_dtype,
                         device=self.device)

    def prefill_slot(self, cache: SlotCache, slot: int, input_ids: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """Run one request's prompt tokens (1, T) after the `offset` already in `slot`; store their keys/values in
        the slot's columns [offset, offset + T) (the caller made room with `cache.fit`); last-position logits (V,)."""
        T = input_ids.shape[1]
        past = cache.rows(slot, 1, offset) if offset else None
        mask = torch.ones(1, offset + T, dtype=torch.long)
        positions = torch.arange(offset, offset + T, dtype=torch.long).unsqueeze(0)
        logits, present = self.forward(input_ids, mask, positions, past, logits_to_keep=1)
        cache.write_span(slot, offset, present)
        return logits[0, -1].float()

    def decode_slots(self, cache: SlotCache, start: int, n: int, tokens: torch.Tensor,
                     lengths: torch.Tensor) -> torch.Tensor:
        """One token per slot in [start, start + n): tokens (n,), lengths (n,) tokens already cached -> logits (n, V).

        Generic, on `forward`'s concatenating interface: the past is the slots' whole rows (P = capacity columns,
        one contiguous block, so runtimes read it without a copy), masked after each row's length; the new token
        goes in at column P with position `length`, and its key/value is copied from `present` into column
        `length` of its slot. A mask with holes (right-padded past, then the new token) is what the model and the
        exported graph compute with: attention takes the explicit mask, positions come from `position_ids`."""
        lengths = lengths.long()
        if n and int(lengths.max()) >= cache.capacity:
            raise ValueError(f"no free column: a slot holds {int(lengths.max())} tokens, capacity {cache.capacity} "
                             "(cache.fit)")
        # past + the new token must fit the model's context: at full capacity, leave out the last column (no live
        # row uses it as past; a strided view, copied by runtimes that need contiguous input, only in that case)
        P = min(cache.capacity, self.max_context - 1)
        cols = torch.arange(P + 1).unsqueeze(0)
        mask = ((cols < lengths.unsqueeze(1)) | (cols == P)).long()  # (n, P + 1)
        past = cache.rows(start, n, None if P == cache.capacity else P)
        logits, present = self.forward(tokens.long().view(-1, 1), mask, lengths.view(-1, 1), past, logits_to_keep=1)
        cache.write(start, lengths, present, P)
        return logits[:, -1].float()

    def close(self) -> None:
        pass


def eos_of(tokenizer: Tokenizer) -> Optional[int]:
    """The end-of-text id of a hotpath tokenizer (None when it has none)."""
    try:
        return tokenizer.token_to_id("<|endoftext|>")
    except Exception:  # noqa: BLE001 - a foreign tokenizer object may raise anything; it just has no EOS id
        return None
