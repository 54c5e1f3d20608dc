"""Shared exports of the tiny checkpoint: exporting takes seconds, so each graph is exported once per session."""
import json

import pytest


@pytest.fixture(scope="session")
def onnx_export(tiny_ckpt, tmp_path_factory):
    """The default export (fp32, KV cache), made through the CLI's main(): (path to .onnx, report dict)."""
    from export.to_onnx import main

    out = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    report = out.with_suffix(".json")
    assert main([str(tiny_ckpt), "--out", str(out), "--json", str(report)]) == 0
    return out, json.loads(report.read_text())


@pytest.fixture(scope="session")
def decoder(onnx_export):
    from export.onnx_runtime import OnnxDecoder

    return OnnxDecoder(onnx_export[0], threads=1)
