"""TensorRT backend: a thin adapter over `export.trt_runtime.TrtEngine` (a `.plan` built by `python -m export.to_trt`).

The engine takes the same tensors as the exported ONNX decoder, by name: `input_ids`, `attention_mask`,
`position_ids`, `past_key_values.{i}.key|value` -> `logits`, `present.{i}.key|value` (torch CUDA tensors). The model
config comes from the plan's JSON (`model.plan.json`, written by export); the tokenizer, which a plan does not hold,
from the ONNX file the plan was built from (recorded in that JSON), or `--tokenizer-from MODEL.onnx|ckpt.pt`.

TensorRT has never run on hotpath's development machines (no NVIDIA index, no GPU): constructing this backend there
fails with one clear `UserError` from `TrtEngine` (missing JSON, TensorRT not installed, no GPU), never a traceback.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from tokenizers import Tokenizer

from common.cli import UserError

from .base import BaseBackend, KVCache, eos_of


def _tokenizer(plan: Path, meta: dict, given: Optional[str]) -> Tokenizer:
    recorded = (meta.get("onnx") or {}).get("path")
    for cand in [Path(given)] if given else [Path(recorded) if recorded else None, plan.with_suffix(".onnx")]:
        if cand is None or not cand.exists():
            continue
        if cand.suffix == ".onnx":
            from export.onnx_meta import read_hotpath_metadata, tokenizer_of

            return tokenizer_of(read_hotpath_metadata(cand))
        from model.checkpoint import read_checkpoint

        return Tokenizer.from_str(read_checkpoint(cand)["tokenizer"])
    raise UserError(f"no tokenizer for {plan.name}: the ONNX it was built from ({recorded}) is gone "
                    "(pass --tokenizer-from MODEL.onnx or a .pt checkpoint)")


class TensorRTBackend(BaseBackend):
    name = "tensorrt"

    def __init__(self, path: str | Path, *, tokenizer_from: Optional[str] = None):
        path = Path(path)
        try:
            from export.onnx_meta import gpt_config
            from export.trt_runtime import TrtEngine
        except ImportError as e:
            raise UserError(f"the TensorRT backend needs export.trt_runtime ({e}); update hotpath, or serve the "
                            ".onnx with --backend onnxruntime") from e
        try:
            self.engine = TrtEngine(str(path))  # export's runner: UserError without its JSON, tensorrt or a GPU
        except UserError:
            raise
        except (ImportError, OSError, RuntimeError) as e:
            raise UserError(f"cannot load TensorRT engine {path} ({type(e).__name__}: {e}); it needs the tensorrt "
                            "package and a CUDA GPU (serve the .onnx with --backend onnxruntime instead)") from e
        meta = self.engine.metadata
        cfg = gpt_config(meta)
        self.tokenizer = _tokenizer(path, meta, tokenizer_from)
        self._dtype = torch.float16 if (meta.get("onnx") or {}).get("dtype") == "fp16" else torch.float32
        assert cfg.n_kv_head is not None and cfg.head_dim is not None  # GPTConfig.__post_init__ fills them
        self.n_layer, self.kv_heads, self.head_dim = cfg.n_layer, cfg.n_kv_head, cfg.head_dim
        self.vocab_size, self.max_context = cfg.vocab_size, cfg.block_size
        self.eos_id = eos_of(self.tokenizer)
        self.kv_dtype = self._dtype
        self.device = self.engine.device
        gpu = meta.get("gpu", {}).get("name", "?")
        self.description = f"tensorrt ({meta.get('precision', '?')}, {gpu}, {path.name})"

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                past: Optional[KVCache], logits_to_keep: int = 0) -> tuple[torch.Tensor, KVCache]:
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
        logits = out["logits"]  # every position: the engine is built with logits_to_keep frozen to 0 (export.to_trt)
        return (logits[:, -logits_to_keep:] if logits_to_keep else logits).float(), present
