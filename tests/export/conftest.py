"""The export tests' views of the session's one ONNX export (tests/conftest.py's `tiny_onnx`)."""
import json

import pytest


@pytest.fixture(scope="session")
def onnx_export(tiny_onnx):
    """The default export (fp32, KV cache), made through the CLI's main(): (path to .onnx, report dict)."""
    return tiny_onnx, json.loads(tiny_onnx.with_suffix(".json").read_text())


@pytest.fixture(scope="session")
def decoder(onnx_export):
    from export.onnx_runtime import OnnxDecoder

    return OnnxDecoder(onnx_export[0], threads=1)
