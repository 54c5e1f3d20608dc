"""Where a kernel call runs: compiled Triton, Triton's interpreter, or the PyTorch reference.

    use_triton(t)   True  -> launch the Triton kernel on `t`
                    False -> run the plain-PyTorch `*_ref` path

- CUDA tensor and Triton importable               -> compiled Triton
- CPU tensor and TRITON_INTERPRET=1 and Triton    -> Triton kernels in Triton's interpreter
- anything else (CPU without the flag, no Triton) -> reference

Everything is decided lazily, at call time. Importing `kernels` does import Triton when it is installed (the
kernel files bind `triton` and `tl` at module level: Triton resolves a kernel's globals, `tl` included, from its
module) but configures nothing: Triton decides interpreter-or-compiler when a function is decorated with
`triton.jit`, so kernel files decorate their kernels on first use (see `kernels/flash_attention.py`), and the
environment variable is read then.
"""
from __future__ import annotations

import functools
import importlib.util
import os

import torch

__all__ = ["triton_available", "interpreting", "use_triton", "sm_count"]

DEFAULT_SM_COUNT = 132  # H100 SXM / H200: assumed for non-CUDA tensors (interpreter, a CPU capture by bench.sm90)


@functools.cache
def triton_available() -> bool:
    """Is the optional `triton` package installed? (Checked once, without importing it.)"""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Is TRITON_INTERPRET=1 set (so Triton kernels run on CPU tensors in the interpreter)?"""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def use_triton(t: torch.Tensor) -> bool:
    """Should a kernel whose inputs live where `t` lives run the Triton kernel (else the reference)?"""
    if not triton_available():
        return False
    if t.device.type == "cuda":
        return not interpreting()
    if t.device.type == "cpu":
        return interpreting()
    return False


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA `device` (read once per device), DEFAULT_SM_COUNT for any other device,
    so a launch recorded with CPU tensors plans the H100/H200 grid."""
    if device.type != "cuda":
        return DEFAULT_SM_COUNT
    return _cuda_sm_count(torch.cuda.current_device() if device.index is None else device.index)


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return int(torch.cuda.get_device_properties(index).multi_processor_count)
