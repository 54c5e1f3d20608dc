"""TensorRT backend: a thin adapter over `export.trt_runtime.TrtEngine` (a built `.plan` of the exported decoder).

The engine takes the same tensors as the exported ONNX decoder, by name: `input_ids`, `attention_mask`,
`position_ids`, `past_key_values.{i}.key|value` -> `logits`, `present.{i}.key|value`. The plan holds no tokenizer or
config, so they come from the ONNX file the plan was built from (`--tokenizer-from model.onnx`, default: the
`.onnx` beside the plan with the same stem) or from a hotpath checkpoint.

TensorRT cannot be installed on a machine without NVIDIA's index and a GPU; constructing this backend there fails
with one clear `UserError` from `TrtEngine`, never a traceback.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from model.cli import UserError

from .base import BaseBackend, KVCache, eos_of


def _companion(plan: Path, given: Optional[str]) -> Path:
    if given:
        return Path(given)
    for cand in (plan.with_suffix(".onnx"), plan.with_suffix(".pt")):
        if cand.exists():
            return cand
    raise UserError(f"no tokenizer/config for {plan} (pass --tokenizer-from MODEL.onnx or a .pt checkpoint)")


class TensorRTBackend(BaseBackend):
    name = "tensorrt"

    def __init__(self, path: str | Path, *, tokenizer_from: Optional[str] = None):
        path = Path(path)
        try:
            from export.trt_runtime import TrtEngine
        except ImportError as e:
            raise UserError(f"the TensorRT backend needs export.trt_runtime and the tensorrt package ({e}); "
                            "install TensorRT from NVIDIA on a GPU machine, or serve the .onnx with "
                            "--backend onnxruntime") from e
        try:
            self.engine = TrtEngine(str(path))  # export's runner raises UserError without tensorrt / GPU / plan
        except UserError:
            raise
        except (ImportError, OSError, RuntimeError) as e:
            raise UserError(f"cannot load TensorRT engine {path} ({type(e).__name__}: {e}); it needs the tensorrt "
                            "package and a CUDA GPU (serve the .onnx with --backend onnxruntime instead)") from e
        src = _companion(path, tokenizer_from)
        if src.suffix == ".onnx":
            from export.onnx_runtime import OnnxDecoder

            dec = OnnxDecoder(str(src))
            cfg, self.tokenizer = dec.config, dec.tokenizer
            self._dtype = torch.float16 if "16" in str(dec.dtype) else torch.float32
        else:
            from model.checkpoint import load_checkpoint

            m, self.tokenizer, _ = load_checkpoint(src)
            cfg, self._dtype = m.config, torch.float32
        self.n_layer, self.kv_heads, self.head_dim = cfg.n_layer, cfg.n_kv_head, cfg.head_dim
        self.vocab_size, self.max_context = cfg.vocab_size, cfg.block_size
        self.eos_id = eos_of(self.tokenizer)
        self.device = torch.device("cuda")
        self.description = f"tensorrt ({path.name})"

    def forward(self, input_ids, attention_mask, position_ids, past: Optional[KVCache]):
        dev = self.device
        B = input_ids.shape[0]
        if past is None:
            empty = torch.zeros(B, self.kv_heads, 0, self.head_dim, dtype=self._dtype, device=dev)
            past = [(empty, empty)] * self.n_layer
        feeds = {"input_ids": input_ids.long().to(dev), "attention_mask": attention_mask.long().to(dev),
                 "position_ids": position_ids.long().to(dev)}
        for i, (k, v) in enumerate(past):
            feeds[f"past_key_values.{i}.key"] = k.to(dev).contiguous()
            feeds[f"past_key_values.{i}.value"] = v.to(dev).contiguous()
        out = self.engine.infer(feeds)
        present = [(out[f"present.{i}.key"], out[f"present.{i}.value"]) for i in range(self.n_layer)]
        return out["logits"].float(), present
