"""Serving backends behind one protocol (`base.Backend`): eager PyTorch, ONNX Runtime, TensorRT.

`load_backend(path, backend="auto")` picks by file type: `.pt`/`.safetensors` -> torch, `.onnx` -> onnxruntime,
`.plan`/`.engine` -> tensorrt. Backends are imported lazily, so a missing optional runtime only matters when asked for.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from common.cli import UserError, existing_file

from .base import Backend, BaseBackend, KVCache

BACKENDS = ("torch", "onnxruntime", "tensorrt")
_SUFFIXES = {".pt": "torch", ".safetensors": "torch", ".onnx": "onnxruntime", ".plan": "tensorrt",
             ".engine": "tensorrt"}

__all__ = ["Backend", "BaseBackend", "KVCache", "BACKENDS", "load_backend", "backend_for"]


def backend_for(path: str | Path) -> str:
    """The backend a model file needs, from its suffix."""
    suffix = Path(path).suffix.lower()
    if suffix not in _SUFFIXES:
        raise UserError(f"cannot tell the backend of {path} (pass a .pt, .safetensors, .onnx or .plan file)")
    return _SUFFIXES[suffix]


def load_backend(path: str | Path, backend: str = "auto", *, kernels: bool = False, quantize: Optional[str] = None,
                 device: str = "cpu", providers: Optional[list[str]] = None, threads: Optional[int] = None,
                 tokenizer_from: Optional[str] = None) -> Backend:
    """Open `path` on `backend` ("auto" = by file type). Raises UserError with a one-line reason."""
    path = existing_file(path, "model")
    wanted = backend_for(path)
    if backend not in ("auto", *BACKENDS):
        raise UserError(f"unknown backend {backend!r} (choose auto, {', '.join(BACKENDS)})")
    if backend != "auto" and backend != wanted:
        hint = {"onnxruntime": "export it first: python -m export.to_onnx CKPT --out model.onnx",
                "tensorrt": "build a plan first: python -m export.to_trt model.onnx",
                "torch": "the torch backend serves .pt/.safetensors checkpoints"}[backend]
        raise UserError(f"--backend {backend} cannot serve {path.name}, a {wanted} model ({hint})")
    if (kernels or quantize) and wanted != "torch":
        raise UserError("--kernels and --quantize apply to the torch backend only "
                        "(quantize ONNX models with quantize/)")
    if wanted == "torch":
        from .torch_backend import TorchBackend

        return TorchBackend(path, device=device, kernels=kernels, quantize=quantize)
    if wanted == "onnxruntime":
        from .onnxruntime_backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend(path, providers=providers, threads=threads)
    from .tensorrt_backend import TensorRTBackend

    return TensorRTBackend(path, tokenizer_from=tokenizer_from)
