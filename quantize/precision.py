"""quantize's `hotpath.onnx_precision` plugins (registered in pyproject.toml): how `python -m export.to_trt` gets an
fp16 or int8 ONNX from an fp32 export without export/ importing quantize/ (which builds on export/).

Each follows `export.to_trt.PrecisionPreparer`: an fp32 hotpath `.onnx` in, the path of the converted model out,
written beside it with quantize's default name and the hotpath metadata kept.
"""
from __future__ import annotations

from pathlib import Path

from . import quantize_onnx


def prepare_fp16(fp32_onnx: Path, /) -> Path:
    """fp16 weights, activations and KV cache (`<stem>.fp16.onnx`), as `python -m quantize MODEL --mode fp16`."""
    return Path(quantize_onnx(fp32_onnx, "fp16"))


def prepare_int8(fp32_onnx: Path, /) -> Path:
    """int8 symmetric Q/DQ, calibrated on the built-in corpus (`<stem>.int8-static.onnx`), as `python -m quantize
    MODEL --mode int8-static`: the form TensorRT builds int8 engines from."""
    return Path(quantize_onnx(fp32_onnx, "int8-static"))
