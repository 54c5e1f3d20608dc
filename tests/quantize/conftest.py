"""Shared fixtures for the quantize tests: the tiny checkpoint's fp32 ONNX export (made once, by export/)."""
import pytest


@pytest.fixture(scope="session")
def tiny_onnx(tiny_ckpt, tmp_path_factory):
    export = pytest.importorskip("export.to_onnx")
    out = tmp_path_factory.mktemp("tiny_onnx") / "tiny.onnx"
    export.export_onnx(tiny_ckpt, out, validate=False)
    return out


def sqnr_db(reference, approx) -> float:
    """Signal-to-quantization-noise ratio in dB: 10 log10(|ref|^2 / |ref - approx|^2)."""
    import numpy as np

    ref = np.asarray(reference, dtype=np.float64)
    err = ref - np.asarray(approx, dtype=np.float64)
    return float(10 * np.log10((ref ** 2).sum() / max((err ** 2).sum(), 1e-30)))
