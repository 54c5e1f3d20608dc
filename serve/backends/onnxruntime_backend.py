"""ONNX Runtime backend: adapts `export.onnx_runtime.OnnxDecoder` (the exported KV-cache decoder, fp32, fp16 or
int8) to the `Backend` protocol. The decoder picks the CUDA (or TensorRT) execution provider when onnxruntime-gpu
offers it, the CPU one otherwise; `description` says which it chose.

Two kinds of export, two cache paths:
- generic target (standard ONNX ops, left padding, past in / present out): `BaseBackend`'s slot calls on `forward`.
  Caches cross the boundary as torch tensors sharing memory with ONNX Runtime's NumPy outputs (`torch.from_numpy`,
  no copy); inputs go back as NumPy views of the engine's tensors.
- ort target (GroupQueryAttention, right padding, `decoder.shared_cache`): the engine's cache is a `SharedSlotCache`,
  a pinned `SlotCache` whose tensors are views of the decoder's own `KVCache` buffers, and the slot calls are
  `decoder.step`, which binds those buffers as both past and present: a decode step writes one column per row in
  place instead of concatenating and copying the cache back.
`forward` serves both kinds; on an ort export a first pass (no past) whose mask is not right-padded (KServe's
left-padded batches) is compacted to right padding and its logits put back where the tokens were.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch

from common.cli import UserError

from .base import BaseBackend, KVCache, eos_of
from .slot_cache import SlotCache

if TYPE_CHECKING:
    from export.onnx_runtime import KVCache as SharedKV, OnnxDecoder


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().contiguous().numpy()


class SharedSlotCache(SlotCache):
    """A pinned `SlotCache` over an ort-target decoder's `KVCache` (`kv`): `layers` are `torch.from_numpy` views of
    `kv.keys` / `kv.values`, so the engine's `fit` / `move` and the decoder's in-place `step` share one buffer.

    Memory: the buffers are (slots, kv_heads, max_len, head_dim) from `export.onnx_runtime.lazy_zeros` (an anonymous
    mapping of 4 KiB pages: untouched pages cost address space, not RSS), and a slot's columns of one head are
    contiguous, so resident memory follows the columns the requests have written, as the growing generic cache's
    does; an idle engine's `fit(0, 0, 0)` frees the buffers (the next request maps fresh ones)."""

    def __init__(self, decoder: "OnnxDecoder", slots: int, max_len: int):
        self.decoder = decoder
        self.kv: Optional["SharedKV"] = None  # the decoder's KVCache, made by the first fit
        super().__init__(decoder.num_layers, slots, decoder.kv_heads, decoder.head_dim, max_len,
                         dtype=torch.from_numpy(np.empty(0, dtype=decoder.dtype)).dtype, pinned=True)

    def fit(self, columns: int, rows: int, used: int) -> None:
        if rows == 0:  # idle: give the buffers back (or keep holding none)
            if self.kv is not None:
                self._resize(0, 0, 0, 0)
            return
        super().fit(columns, rows, used)

    def _resize(self, slots: int, capacity: int, rows: int, used: int) -> None:
        # pinned: called empty at creation and on release, full size (and with nothing to keep) by the first fit
        if slots == 0 or capacity == 0:
            self.kv = None
            empty = torch.zeros(0, self.kv_heads, 0, self.head_dim, dtype=self.dtype)
            self.layers = [(empty, empty) for _ in range(self.n_layer)]
            return
        kv = self.kv = self.decoder.new_cache(slots, capacity)
        self.layers = [(torch.from_numpy(k), torch.from_numpy(v)) for k, v in zip(kv.keys, kv.values)]


class OnnxRuntimeBackend(BaseBackend):
    name = "onnxruntime"

    def __init__(self, path: str | Path, *, providers: Optional[list[str]] = None, threads: Optional[int] = None):
        from export.onnx_runtime import OnnxDecoder  # export's session opener and metadata reader

        self.decoder = OnnxDecoder(str(path), providers=providers, threads=threads)
        if not self.decoder.kv_cache:
            raise UserError(f"{Path(path).name} was exported without a KV cache, which serving needs "
                            "(re-export without --no-kv-cache)")
        cfg = self.decoder.config
        self.tokenizer = self.decoder.tokenizer
        self.vocab_size = cfg.vocab_size
        self.max_context = cfg.block_size
        self.eos_id = eos_of(self.tokenizer)
        self.device = torch.device("cpu")
        self.n_layer, self.kv_heads, self.head_dim = cfg.n_layer, self.decoder.kv_heads, self.decoder.head_dim
        self.kv_dtype = torch.from_numpy(np.empty(0, dtype=self.decoder.dtype)).dtype  # the graph's past dtype
        self.shared_cache: bool = self.decoder.shared_cache
        cache = "shared in-place KV cache" if self.shared_cache else "concatenated KV cache"
        self.description = (f"onnxruntime ({self.decoder.provider}, {self.decoder.dtype.name}, "
                            f"{self.decoder.target} target, {cache}, {Path(path).name})")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                past: Optional[KVCache], logits_to_keep: int = 0) -> tuple[torch.Tensor, KVCache]:
        B = input_ids.shape[0]
        ids, mask, pos = _np(input_ids.long()), _np(attention_mask.long()), _np(position_ids.long())
        if self.shared_cache and past is None:
            from export.onnx_runtime import is_right_padded

            if not is_right_padded(mask):
                return self._forward_compacted(ids, mask, logits_to_keep)
        np_past = self.decoder.empty_past(B) if past is None else [(_np(k), _np(v)) for k, v in past]
        logits, present = self.decoder.forward(ids, mask, pos, np_past, logits_to_keep=logits_to_keep)
        assert present is not None  # a KV-cache export (checked when opened) always returns one
        return (torch.from_numpy(np.ascontiguousarray(logits)).float(),
                [(torch.from_numpy(k), torch.from_numpy(v)) for k, v in present])

    def _forward_compacted(self, ids: np.ndarray, mask: np.ndarray,
                           logits_to_keep: int) -> tuple[torch.Tensor, KVCache]:
        """A first pass with left padding (or holes) on an ort graph, which takes right padding only: each row's real
        tokens move to the front (the same attention and positions: real tokens attend to the real tokens before
        them, positions count real tokens), then the logits go back to the tokens' own columns. Pad columns get zero
        logits (a generic graph's are meaningless there too). The present is right-padded (row b's tokens in columns
        [0, len_b)): a decode step after it must use right padding as well."""
        B, T = ids.shape
        real = mask != 0
        order = np.argsort(~real, axis=1, kind="stable")  # each row's real columns first, in order
        lens = real.sum(1)
        packed_ids = np.take_along_axis(ids, order, axis=1)
        packed_mask = (np.arange(T)[None, :] < lens[:, None]).astype(np.int64)
        pos = np.broadcast_to(np.arange(T, dtype=np.int64), (B, T)).copy()  # real tokens: 0..len_b - 1
        packed, present = self.decoder.forward(packed_ids, packed_mask, pos)
        assert present is not None
        logits = np.zeros((B, T, self.vocab_size), dtype=np.float32)
        rows = np.arange(B)[:, None]
        logits[rows, order] = packed * packed_mask[:, :, None]  # packed column j came from column order[b, j]
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return (torch.from_numpy(np.ascontiguousarray(logits)),
                [(torch.from_numpy(k), torch.from_numpy(v)) for k, v in present])

    # ------------------------------------------------------------------ slots: in place on an ort-target export
    def new_cache(self, slots: int, max_len: int) -> SlotCache:
        if not self.shared_cache:
            return super().new_cache(slots, max_len)
        return SharedSlotCache(self.decoder, slots, max_len)

    def prefill_slot(self, cache: SlotCache, slot: int, input_ids: torch.Tensor, offset: int = 0) -> torch.Tensor:
        if not isinstance(cache, SharedSlotCache):
            return super().prefill_slot(cache, slot, input_ids, offset)
        assert cache.kv is not None  # the engine fits the cache before each step
        logits = self.decoder.step(cache.kv, slot, _np(input_ids.long()), np.array([offset], dtype=np.int64))
        return torch.from_numpy(logits[0])

    def decode_slots(self, cache: SlotCache, start: int, n: int, tokens: torch.Tensor,
                     lengths: torch.Tensor) -> torch.Tensor:
        if not isinstance(cache, SharedSlotCache):
            return super().decode_slots(cache, start, n, tokens, lengths)
        assert cache.kv is not None
        logits = self.decoder.step(cache.kv, start, _np(tokens.long()).reshape(n, 1), _np(lengths.long()))
        return torch.from_numpy(logits)
