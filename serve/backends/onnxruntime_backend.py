"""ONNX Runtime backend: adapts `export.onnx_runtime.OnnxDecoder` (the exported KV-cache decoder, fp32, fp16 or
int8) to the `Backend` protocol. The decoder picks the CUDA (or TensorRT) execution provider when onnxruntime-gpu
offers it, the CPU one otherwise; `description` says which it chose.

Caches cross the boundary as torch tensors sharing memory with ONNX Runtime's NumPy outputs (`torch.from_numpy`,
no copy); inputs go back as NumPy views of the engine's tensors.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch

from common.cli import UserError

from .base import BaseBackend, KVCache, eos_of


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().contiguous().numpy()


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
        self.description = f"onnxruntime ({self.decoder.provider}, {self.decoder.dtype.name}, {Path(path).name})"

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                past: Optional[KVCache], logits_to_keep: int = 0) -> tuple[torch.Tensor, KVCache]:
        B = input_ids.shape[0]
        np_past = self.decoder.empty_past(B) if past is None else [(_np(k), _np(v)) for k, v in past]
        logits, present = self.decoder.forward(_np(input_ids.long()), _np(attention_mask.long()),
                                               _np(position_ids.long()), np_past, logits_to_keep=logits_to_keep)
        assert present is not None  # a KV-cache export (checked when opened) always returns one
        return (torch.from_numpy(np.ascontiguousarray(logits)).float(),
                [(torch.from_numpy(k), torch.from_numpy(v)) for k, v in present])
