"""How each inference variant is made from the one benchmark checkpoint.

A variant is prepared in the parent process (its artifact written to the work folder by the command-line tool's own
Python API: export, quantize, prune) and returns a `Spec`; a fresh worker process then loads the spec behind a
serving backend and measures it, so no variant's memory or thread pools leak into another's numbers. A variant that
cannot run on this machine raises `Unsupported` with the reason, which the report lists.
"""
from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from .common import Context


class Unsupported(Exception):
    """This variant cannot run on this machine; the message says why."""


@dataclass
class Spec:
    kind: str  # "torch" | "onnxruntime"
    path: str
    quantize: Optional[str] = None  # torch backend: int8-weight | int8-dynamic
    compile: bool = False
    kernels: bool = False
    device: str = "cpu"
    note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def load_backend(spec: Spec, threads: int):
    """The serving backend for a spec (called in the worker)."""
    if spec.kind == "onnxruntime":
        from serve.backends.onnxruntime_backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend(spec.path, threads=threads)
    from serve.backends.torch_backend import TorchBackend

    if spec.compile:
        from model import load_checkpoint

        model, tokenizer, _ = load_checkpoint(spec.path, device=spec.device)
        return TorchBackend(spec.path, model=torch.compile(model, dynamic=True), tokenizer=tokenizer)
    return TorchBackend(spec.path, device=spec.device, quantize=spec.quantize, kernels=spec.kernels)


def file_bytes(spec: Spec) -> Optional[int]:
    if spec.quantize:  # quantized at load time: no file of its own
        return None
    path = Path(spec.path)
    data = Path(str(path) + ".data")  # external weights, for models over 2 GB
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def inference_variants(ctx: Context) -> dict[str, Callable[[], Spec]]:
    work = ctx.workdir

    @functools.cache
    def weights() -> str:
        """The model alone (weights, config, tokenizer) as safetensors: the training checkpoint also holds the
        optimizer state, which would double its size in the file-size column."""
        from model import save_safetensors

        return str(save_safetensors(work / "model.safetensors", ctx.model, ctx.tokenizer, ctx.meta))

    @functools.cache
    def onnx_fp32(target: str = "ort") -> Path:
        """The checkpoint exported for ONNX Runtime: the ort target (GroupQueryAttention, what `python -m
        export.to_onnx` writes and the server runs in place), or the generic graph (standard ops) for comparison."""
        from export.to_onnx import export_onnx

        path = work / ("model.onnx" if target == "ort" else f"model.{target}.onnx")
        export_onnx(ctx.checkpoint, path, validate=False, target=target)
        return path

    def quantized(mode: str, note: str = "", target: str = "ort", **opts) -> Callable[[], Spec]:
        def prepare() -> Spec:
            from quantize import quantize_onnx

            stem = "model" if target == "ort" else f"model.{target}"
            out = quantize_onnx(onnx_fp32(target), mode, out=work / f"{stem}.{mode}.onnx", **opts)
            return Spec("onnxruntime", str(out), note=note)
        return prepare

    def pruned(method: str, sparsity: float, finetune: int, note: str) -> Callable[[], Spec]:
        def prepare() -> Spec:
            from export.to_onnx import export_onnx
            from quantize.prune import prune_checkpoint

            stem = work / f"pruned-{method.replace(':', 'of')}"
            prune_checkpoint(ctx.checkpoint, method=method, sparsity=sparsity, finetune_steps=finetune,
                             out=stem.with_suffix(".pt"))
            export_onnx(stem.with_suffix(".pt"), stem.with_suffix(".onnx"), validate=False, target="ort")
            return Spec("onnxruntime", str(stem.with_suffix(".onnx")), note=note)
        return prepare

    def fp16() -> Spec:
        note = "CPU provider: few fp16 kernels, so ONNX Runtime casts around them" if ctx.device == "cpu" else ""
        return quantized("fp16", note)()

    def kernels_patched() -> Spec:
        if not torch.cuda.is_available():
            raise Unsupported("Triton kernels need a CUDA GPU (on CPU, patch() runs the PyTorch references)")
        return Spec("torch", weights(), kernels=True, device="cuda", note="kernels.patch()")

    def tensorrt() -> Spec:
        raise Unsupported("TensorRT is not installable here (needs NVIDIA's package index and a GPU)")

    finetune = 0 if ctx.quick else 60  # steps of masked fine-tuning after structured pruning
    return {
        "torch eager fp32": lambda: Spec("torch", weights()),
        "torch.compile": lambda: Spec("torch", weights(), compile=True, note="inductor, dynamic shapes"),
        "torch int8 weight-only": lambda: Spec("torch", weights(), quantize="int8-weight", note="quantized at load"),
        "torch int8 dynamic": lambda: Spec("torch", weights(), quantize="int8-dynamic", note="quantized at load"),
        "torch + Triton kernels": kernels_patched,
        "ort fp32": lambda: Spec("onnxruntime", str(onnx_fp32()), note="graph optimizations: all"),
        "ort fp16": fp16,
        "ort int8 dynamic": quantized("int8-dynamic"),
        "ort int8 dynamic, generic graph": quantized("int8-dynamic", "standard ONNX ops, concatenated KV cache (the "
                                                    "TensorRT export's graph)", target="generic"),
        "ort int8 static (Q/DQ)": quantized("int8-static"),
        "ort int4 weight-only": quantized("int4-weight"),
        "ort pruned 2:4": pruned("2:4", 0.5, 0, "no fine-tune; dense CPU kernels: 2:4 pays off on sparse tensor cores"),
        "ort pruned heads 25%": pruned("heads", 0.25, finetune, f"structured, {finetune} fine-tune steps"),
        "tensorrt": tensorrt,
    }
