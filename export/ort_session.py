"""One way to open an ONNX Runtime session over a file hotpath wrote, for every stage that runs one (export's
validation and OnnxDecoder, quantize's evaluator, serve's backend): provider choice, thread settings and a one-line
error when the file cannot be loaded."""
from __future__ import annotations

import os
from typing import Any, Optional, Sequence

from common.errors import UserError

# preferred execution providers, best first; the TensorRT EP is used only when asked for (it builds an engine per
# new shape on first use, minutes for a dynamic-shape decoder; export.to_trt builds one engine with profiles instead)
PREFERRED_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")


def choose_providers(providers: Optional[Sequence[str]] = None) -> list[str]:
    """The execution providers to ask for: `providers` as given (checked), else CUDA when available, then CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if providers:
        missing = [p for p in providers if p not in available]
        if missing:
            raise UserError(f"ONNX Runtime here lacks {', '.join(missing)} (available: {', '.join(available)}; "
                            "install onnxruntime-gpu for CUDA/TensorRT)")
        return list(providers)
    return [p for p in PREFERRED_PROVIDERS if p in available] or ["CPUExecutionProvider"]


def session_options(threads: Optional[int] = None, *, inter_op_threads: Optional[int] = None) -> Any:
    """ORT_ENABLE_ALL graph optimizations, errors-only logging, `threads` intra-op threads (default: ONNX
    Runtime's choice, one per core)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only
    if threads is not None:
        if threads < 1:
            raise UserError(f"threads={threads} must be at least 1")
        options.intra_op_num_threads = int(threads)
    if inter_op_threads is not None:
        options.inter_op_num_threads = int(inter_op_threads)
    return options


def open_session(path: str | os.PathLike, *, providers: Optional[Sequence[str]] = None,
                 threads: Optional[int] = None, inter_op_threads: Optional[int] = None) -> Any:
    """An `onnxruntime.InferenceSession` over `path`; a file ONNX Runtime cannot load, or whose external data lies
    outside its folder (:mod:`export.onnx_check`), is a one-line UserError."""
    import onnxruntime as ort

    from .onnx_check import check_onnx_file

    check_onnx_file(path)  # before ONNX Runtime reads any weight: a cut file, or external data outside its folder
    chosen = choose_providers(providers)
    options = session_options(threads, inter_op_threads=inter_op_threads)
    try:
        return ort.InferenceSession(str(path), options, providers=chosen)
    except Exception as e:  # onnxruntime raises its own exception types (InvalidProtobuf, Fail, ...)
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UserError(f"{path} is not a hotpath export ONNX Runtime can load ({first}); "
                        "export a checkpoint with python -m export.to_onnx") from e
