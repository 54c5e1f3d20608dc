"""Next-token choice on NumPy logits, for the runtimes that hold no torch tensors (ONNX Runtime, TensorRT).

Greedy (temperature 0) is NumPy's argmax: the first maximal index, as ``torch.argmax``, so no torch is imported.
Sampling (temperature > 0, top-k, top-p) hands the logits to :func:`model.sampling.sample_next` with a
``torch.Generator`` seeded once, as :func:`model.generate.stream_tokens` does: torch is imported on the first
sampled token only, and the same seed yields the same tokens as the PyTorch model. (A NumPy sampler could not
promise that: torch.multinomial's draws are not NumPy's.)
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np


class NextToken:
    """Chooses token ids from (B, vocab) logits, step after step, with one random stream for the whole generation."""

    def __init__(self, *, temperature: float = 0.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                 seed: Optional[int] = None):
        self.temperature, self.top_k, self.top_p, self.seed = temperature, top_k, top_p, seed
        self._generator: Any = None  # the torch.Generator, made on the first sampled token

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        """logits (B, vocab) -> token ids (B,) int64."""
        if self.greedy:
            return np.asarray(logits).argmax(axis=-1).astype(np.int64)
        import torch

        from .sampling import sample_next

        if self._generator is None and self.seed is not None:
            self._generator = torch.Generator().manual_seed(self.seed)
        chosen = sample_next(torch.from_numpy(np.array(logits, dtype=np.float32)), temperature=self.temperature,
                             top_k=self.top_k, top_p=self.top_p, generator=self._generator)
        return chosen.numpy().astype(np.int64)
