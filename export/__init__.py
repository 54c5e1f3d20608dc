"""hotpath export: ONNX (a KV-cache decoder, validated against PyTorch), its ONNX Runtime runner, TensorRT engines.

    from export import export_onnx, OnnxDecoder, read_hotpath_metadata
    report = export_onnx("ckpt.pt")            # -> ckpt.onnx, validated; report.summary()
    dec = OnnxDecoder("ckpt.onnx")             # config, tokenizer from the file's metadata
    dec.generate(dec.tokenizer.encode("def ").ids, 32)

Names resolve lazily, so `import export` stays light (no torch.onnx, onnxruntime or tensorrt until used).
See docs/export.md.
"""
from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "export_onnx": "to_onnx", "ExportReport": "to_onnx",
    "read_hotpath_metadata": "onnx_meta",
    "OnnxDecoder": "onnx_runtime",
    "build_engine": "to_trt",
    "TrtEngine": "trt_runtime",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
