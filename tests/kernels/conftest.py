"""Kernel tests run the real Triton kernels on CPU tensors in Triton's interpreter.

TRITON_INTERPRET must be set before a kernel is decorated with `triton.jit`. `kernels/` decorates lazily (on first
use), so setting it here, when pytest loads this conftest, is early enough even if another test module imported
`kernels` or `triton` before. Set TRITON_INTERPRET=0 explicitly to make these tests exercise the reference path.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
