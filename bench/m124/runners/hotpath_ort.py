"""hotpath's ONNX decoders (fp32, int8, int4, fp16) through `export.onnx_runtime.OnnxDecoder`, without torch."""
from __future__ import annotations

from typing import Any

import numpy as np


def greedy_with_past(dec: Any, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Greedy generation through `OnnxDecoder.forward` and its returned past (equal-length prompts, no padding)."""
    logits, past = dec.forward(np.asarray(prompts, dtype=np.int64), logits_to_keep=1)
    out = []
    for i in range(new_tokens):
        token = logits[:, -1].argmax(-1).astype(np.int64)[:, None]  # (B, 1)
        out.append(token)
        if i + 1 < new_tokens:
            logits, past = dec.forward(token, past=past, logits_to_keep=1)
    return np.concatenate(out, axis=1).tolist()


class OrtEngine:
    def __init__(self, path: str, threads: int):
        from export.onnx_runtime import OnnxDecoder

        self.decoder = OnnxDecoder(path, providers=["CPUExecutionProvider"], threads=threads)
        self.note = "OnnxDecoder.forward with its past"
        # the one line to switch when OnnxDecoder.generate_batch (shared KV buffer) lands:
        self._generate = lambda prompts, n: greedy_with_past(self.decoder, prompts, n)

    def generate(self, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        return self._generate(prompts, new_tokens)


def load(options: dict, threads: int) -> OrtEngine:
    return OrtEngine(options["path"], threads)
