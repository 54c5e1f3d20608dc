"""hotpath's Triton kernels: fused attention, softmax, FusedAdamW, and reversible patching of a model's hot paths.

CUDA tensors run compiled Triton; CPU tensors run the PyTorch references (`*_ref`), or the Triton kernels in
Triton's interpreter when TRITON_INTERPRET=1 is set before the first kernel call.
"""
from .attention import attention, attention_ref
from .onnx import onnx_translation_table
from .softmax import softmax, softmax_ref
from .adamw import FusedAdamW
from .patch import patch, unpatch, patched

__all__ = ["attention", "attention_ref", "onnx_translation_table", "softmax", "softmax_ref", "FusedAdamW",
           "patch", "unpatch", "patched"]
