from .attention import attention, attention_ref
from .onnx import onnx_translation_table
