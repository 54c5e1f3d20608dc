from .attention import attention, attention_ref
from .onnx import onnx_translation_table
from .softmax import softmax, softmax_ref
from .adamw import FusedAdamW
from .patch import patch, unpatch, patched
