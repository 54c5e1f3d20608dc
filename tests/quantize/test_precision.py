"""quantize's `hotpath.onnx_precision` plugins are what export.to_trt finds through the installed entry points."""
from export import to_trt
from quantize import precision


def test_to_trt_finds_quantize_plugins_through_entry_points():
    assert to_trt.precision_preparer("fp16") is precision.prepare_fp16
    assert to_trt.precision_preparer("int8") is precision.prepare_int8
    assert to_trt.precision_preparer("fp32") is None  # export's own; no plugin needed
