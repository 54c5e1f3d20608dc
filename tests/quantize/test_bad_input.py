"""Bad input: one line `error: ...`, exit 2, no traceback, nothing written."""
import subprocess
import sys

import pytest

from tests.helpers import ROOT


def _run_main(main, argv, capsys):
    with pytest.raises(SystemExit) as e:
        from common.cli import run

        run(main, argv)
    err = capsys.readouterr().err
    return e.value.code, err


def _one_line_error(code, err):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.mark.slow
def test_unknown_mode_subprocess(tiny_ckpt, tmp_path):
    p = subprocess.run([sys.executable, "-m", "quantize", str(tiny_ckpt), "--mode", "int3"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    line = _one_line_error(p.returncode, p.stderr)
    assert "unknown mode 'int3'" in line and "int8-static" in line


def test_torch_mode_on_onnx_and_missing_file(tmp_path, capsys):
    from quantize.__main__ import main

    fake = tmp_path / "m.onnx"
    fake.write_bytes(b"not onnx")
    line = _one_line_error(*_run_main(main, [str(fake), "--mode", "torch-int8-weight"], capsys))
    assert "quantizes a PyTorch checkpoint" in line
    line = _one_line_error(*_run_main(main, [str(fake), "--mode", "int8-dynamic", "--no-eval"], capsys))
    assert "not an ONNX model" in line
    line = _one_line_error(*_run_main(main, [str(tmp_path / "nope.pt"), "--mode", "fp16"], capsys))
    assert "does not exist" in line
    line = _one_line_error(*_run_main(main, [str(fake), "--mode", "int8-static", "--calib-method", "mse"], capsys))
    assert "--calib-method" in line


@pytest.mark.slow
def test_calibration_text_too_short(tiny_onnx, tmp_path, capsys):
    from quantize.__main__ import main

    text = tmp_path / "short.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 40)
    out = tmp_path / "s.onnx"
    line = _one_line_error(*_run_main(main, [str(tiny_onnx), "--mode", "int8-static", "--calib-samples", "500",
                                             "--corpus", str(text), "--out", str(out)], capsys))
    assert "fewer than --calib-samples 500" in line
    assert not out.exists() and not list(tmp_path.glob(".s.onnx*"))


@pytest.mark.parametrize("argv,needle", [
    (["--method", "magnitude", "--sparsity", "1.0"], "outside (0, 1)"),
    (["--method", "heads", "--sparsity", "0"], "outside (0, 1)"),
    (["--method", "neurons", "--sparsity", "-0.2"], "outside (0, 1)"),
    (["--method", "magnitude"], "needs --sparsity"),
    (["--method", "2:4", "--sparsity", "0.3"], "0.5 by definition"),
    (["--method", "3:8", "--sparsity", "0.5"], "unknown method"),
])
def test_prune_bad_flags(tiny_ckpt, argv, needle, capsys):
    from quantize.prune import main

    line = _one_line_error(*_run_main(main, [str(tiny_ckpt), *argv], capsys))
    assert needle in line


def test_two_four_needs_dimensions_divisible_by_4(tiny_model, tmp_path, capsys):
    from model.checkpoint import save_checkpoint
    from model.gpt import GPT, GPTConfig
    from quantize.prune import main

    _, tok, meta = tiny_model
    cfg = GPTConfig(vocab_size=tok.get_vocab_size(), block_size=32, n_layer=1, n_head=2, n_embd=66)
    odd = save_checkpoint(tmp_path / "odd.pt", GPT(cfg), tok, meta)
    line = _one_line_error(*_run_main(main, [str(odd), "--method", "2:4", "--no-eval"], capsys))
    assert "not a multiple of 4" in line and "blocks.0.attn.q_proj" in line
    assert not (tmp_path / "odd.pruned-2of4.pt").exists()


def test_hard_linked_external_data_is_named(tmp_path):
    """onnx refuses external data with several hard links; the error says so instead of "truncated"."""
    import os

    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((64, 64), dtype=np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 64])], [weight])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph), str(path), save_as_external_data=True, location="m.onnx.data",
              size_threshold=0)
    os.link(tmp_path / "m.onnx.data", tmp_path / "other.data")
    from common.errors import UserError
    from quantize.onnx_quant import _load_onnx

    with pytest.raises(UserError, match="hard links"):
        _load_onnx(path)
