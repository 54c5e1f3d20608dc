"""Quantizing an export whose weights lie in external data (every export with over 64 MiB of weights) and whose tied
embedding / LM head is stored once: the same quantized model as from the one-file export, outputs written with
external data when large."""
import numpy as np
import onnx_ir as ir
import pytest

from export.onnx_runtime import OnnxDecoder
from quantize import quantize_onnx
from quantize import onnx_quant


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["int8-dynamic", "int4-weight"])
def test_external_data_source_quantizes_as_the_one_file_export(tiny_onnx, tmp_path, mode):
    ext = tmp_path / "src" / "tiny.onnx"
    ext.parent.mkdir()
    ir.save(ir.load(str(tiny_onnx)), ext, external_data="tiny.onnx.data")
    a = quantize_onnx(tiny_onnx, mode, out=tmp_path / "a.onnx")
    b = quantize_onnx(ext, mode, out=tmp_path / "b.onnx")
    ids = np.random.default_rng(0).integers(0, 500, (2, 11))
    np.testing.assert_array_equal(OnnxDecoder(b, threads=1).forward(ids)[0], OnnxDecoder(a, threads=1).forward(ids)[0])


@pytest.mark.slow
def test_large_outputs_get_external_data(tiny_onnx, tmp_path, monkeypatch):
    from common.files import OUTPUT_MODE

    monkeypatch.setattr(onnx_quant, "EXTERNAL_DATA_BYTES", 0)  # as a 124M model: weights beside the graph
    out = quantize_onnx(tiny_onnx, "int8-dynamic", out=tmp_path / "q.onnx")
    data = tmp_path / "q.onnx.data"
    assert data.exists() and data.stat().st_size > out.stat().st_size
    assert oct(data.stat().st_mode & 0o777) == oct(OUTPUT_MODE)
    ids = np.random.default_rng(1).integers(0, 500, (1, 7))
    assert np.isfinite(OnnxDecoder(out, threads=1).forward(ids)[0]).all()
