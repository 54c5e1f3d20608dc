"""hotpath's Triton kernels: fused attention, softmax, FusedAdamW, and reversible patching of a model's hot paths.

CUDA tensors run compiled Triton; CPU tensors run the PyTorch references (`*_ref`), or the Triton kernels in
Triton's interpreter when TRITON_INTERPRET=1 is set before the first kernel call.

One module per kernel (`flash_attention`, `fused_softmax`, `fused_adamw`), named apart from the functions they
export, so `kernels.attention` is the function and `kernels.flash_attention` its module.
"""
from .flash_attention import attention, attention_ref
from .fused_adamw import FusedAdamW
from .fused_softmax import softmax, softmax_ref
from .onnx import onnx_translation_table
from .patch import patch, patched, unpatch

__all__ = ["attention", "attention_ref", "onnx_translation_table", "softmax", "softmax_ref", "FusedAdamW",
           "patch", "unpatch", "patched"]
