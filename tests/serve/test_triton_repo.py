"""`python -m serve.triton_repo`: the repository it writes parses with Triton's ModelConfig schema (tritonclient's
model_config_pb2) and matches the ONNX signature; `--check` finds each kind of mistake users make by hand."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from serve.triton_repo import check_repo, model_config_pb2, onnx_signature, write_repo

from tests.helpers import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]  # every test needs the ONNX export


@pytest.fixture()
def repo(tiny_onnx, tmp_path):
    root = write_repo(tiny_onnx, tmp_path / "repo", name="tiny", max_batch_size=8, instances=2)
    return root


def test_written_repo_matches_triton_schema_and_onnx(repo, tiny_onnx):
    from google.protobuf import text_format

    mc = model_config_pb2()
    cfg = text_format.Parse((repo / "config.pbtxt").read_text(), mc.ModelConfig())
    assert cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 8
    assert cfg.WhichOneof("scheduling_choice") == "dynamic_batching"
    assert cfg.instance_group[0].count == 2 and cfg.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
    assert (repo / "1" / "model.onnx").read_bytes() == tiny_onnx.read_bytes()
    sig = onnx_signature(tiny_onnx)
    assert [t.name for t in cfg.input] == [t.name for t in sig.inputs]
    # the export's logits_to_keep has a default (0: every position), so Triton, which batches every declared input
    # on axis 0, is not given that scalar: it serves the raw step with every position's logits
    assert "logits_to_keep" not in [t.name for t in cfg.input]
    assert [t.name for t in cfg.output] == [t.name for t in sig.outputs]
    logits = next(t for t in cfg.output if t.name == "logits")
    assert list(logits.dims) == [-1, 512] and logits.data_type == mc.TYPE_FP32
    [report] = check_repo(repo.parent)
    assert report.ok, report.problems


EDITS = [
    (r'name: "tiny"', 'name: "other"', "differs from the folder name"),
    (r'(name: "logits"\n  data_type: )TYPE_FP32', r"\1TYPE_FP16",
     "logits: data_type TYPE_FP16, the model has TYPE_FP32"),
    (r'name: "position_ids"', 'name: "positions"', "'positions' is not in the model"),
    (r"dims: 512", "dims: 511", "dim 1 is 511 in the config, fixed at 512"),
    (r'input \{\n  name: "attention_mask"\n  data_type: TYPE_INT64\n  dims: -1\n\}\n', "",
     "attention_mask are not declared"),
    (r"max_batch_size: 8", "max_batch_size: 0", "dims [-1] have rank 1"),
    (r'platform: "onnxruntime_onnx"', 'platform: "pytorch_libtorch"', "not onnxruntime_onnx or tensorrt_plan"),
    (r"max_batch_size: 8", "max_batch: 8", "does not parse"),
]


@pytest.mark.parametrize("pattern, repl, needle", EDITS, ids=[e[2][:30] for e in EDITS])
def test_check_finds_mistakes(repo, pattern, repl, needle):
    cfg = repo / "config.pbtxt"
    text, n = re.subn(pattern, repl, cfg.read_text(), count=1)
    assert n == 1
    cfg.write_text(text)
    [report] = check_repo(repo.parent)
    assert not report.ok
    assert any(needle in p for p in report.problems), report.problems


def test_cli_write_and_check(tiny_onnx, tmp_path):
    out = tmp_path / "r"
    r = subprocess.run([sys.executable, "-m", "serve.triton_repo", str(tiny_onnx), "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0 and "checked ok" in r.stdout, r.stdout + r.stderr
    r = subprocess.run([sys.executable, "-m", "serve.triton_repo", "--check", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0 and "all ok" in r.stdout, r.stdout + r.stderr
    (out / "tiny" / "1" / "model.onnx").unlink()
    r = subprocess.run([sys.executable, "-m", "serve.triton_repo", "--check", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 1 and "1/model.onnx is missing" in r.stdout
    r = subprocess.run([sys.executable, "-m", "serve.triton_repo", "--check", str(tmp_path / "nope")], cwd=ROOT,
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
