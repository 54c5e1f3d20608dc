"""hotpath quantization and pruning. See docs/quantize.md.

Public API (imported lazily, so `import quantize` stays cheap):

- `quantize_onnx(src_onnx, mode, out=None, **opts) -> Path`: fp16 | int8-dynamic | int8-static | int4-weight
- `run_quantization(model_path, mode, out=None, **opts) -> dict`: what `python -m quantize` does (export if needed,
  quantize, then perplexity before/after, top-1 agreement, size and latency ratio in the same run)
- `perplexity_onnx(path, windows=32, ...) -> {'loss', 'ppl', 'tokens'}`
- `quantize_model(model, mode="int8-weight"|"int8-dynamic") -> nn.Module`, `load_quantized(path)`,
  `apply_quantization(model, meta)`: the PyTorch backend's int8
- `prune_checkpoint(ckpt, method, sparsity, finetune_steps=0, out=None, ...) -> (model, report)`
"""
from __future__ import annotations

_EXPORTS = {
    "quantize_onnx": ".onnx_quant",
    "ONNX_MODES": ".onnx_quant",
    "run_quantization": ".api",
    "perplexity_onnx": ".api",
    "ALL_MODES": ".api",
    "quantize_model": ".torch_quant",
    "load_quantized": ".torch_quant",
    "apply_quantization": ".torch_quant",
    "prune_checkpoint": ".prune",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module 'quantize' has no attribute {name!r}")
