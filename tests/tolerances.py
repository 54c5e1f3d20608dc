"""Test tolerances, stated once.

fp32 kernels are compared with ~1e-5 relative error. Half-precision kernels follow the FlashAttention rule:
the kernel's error against a float64 reference may be at most 2x the error PyTorch itself makes in the same
dtype, plus a small absolute slack for outputs near zero.
"""
import torch

FP32_RTOL = 1e-5
FP32_ATOL = 1e-5
HALF_FACTOR = 2.0
HALF_ATOL = {torch.float16: 1e-3, torch.bfloat16: 1e-2}


def assert_close_fp32(actual, expected, rtol=FP32_RTOL, atol=FP32_ATOL):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol)


def assert_half_within_torch_error(actual, torch_same_dtype, reference64, dtype):
    """actual and torch_same_dtype are computed in `dtype`; reference64 in float64."""
    kernel_err = (actual.double() - reference64).abs().max().item()
    torch_err = (torch_same_dtype.double() - reference64).abs().max().item()
    bound = HALF_FACTOR * torch_err + HALF_ATOL[dtype]
    assert kernel_err <= bound, f"{dtype} error {kernel_err:.3g} > 2 x torch error {torch_err:.3g} + atol"
