"""The ONNX Runtime inference path runs without torch: importing export.onnx_runtime, greedy OnnxDecoder generation
and `python -m export.onnx_runtime` leave torch unimported (it costs ~230 MiB RSS before a session opens); sampling
with a temperature imports it for the seeded generator and still matches model.generate."""
import json
import subprocess
import sys

import numpy as np
import pytest

from model.generate import generate
from model.next_token import NextToken
from tests.helpers import ROOT

GREEDY = """
import json, sys
from export.onnx_runtime import OnnxDecoder
dec = OnnxDecoder(sys.argv[1], threads=1)
tokens = dec.generate(json.loads(sys.argv[2]), 12)
print(json.dumps({"tokens": tokens, "torch": "torch" in sys.modules}))
"""

CLI = """
import runpy, sys
sys.argv = ["export.onnx_runtime", sys.argv[1], "--prompt", "def main", "--max-new-tokens", "6", "--threads", "1"]
try:
    runpy.run_module("export.onnx_runtime", run_name="__main__")
except SystemExit as e:
    assert e.code in (0, None), e.code
print("torch imported:", "torch" in sys.modules, file=sys.stderr)
"""


def _python(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_greedy_generation_without_torch(tiny_onnx, tiny_model):
    model, tokenizer, _ = tiny_model
    prompt = tokenizer.encode("def main():\n    return").ids
    proc = _python(GREEDY, str(tiny_onnx), json.dumps(prompt))
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["torch"] is False
    assert out["tokens"] == generate(model, prompt, 12)


@pytest.mark.slow
def test_cli_greedy_without_torch(tiny_onnx):
    proc = _python(CLI, str(tiny_onnx))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("def main") and len(proc.stdout.strip()) > len("def main")
    assert "torch imported: False" in proc.stderr


def test_greedy_is_the_first_maximum_as_torch_argmax():
    import torch

    logits = np.random.default_rng(0).standard_normal((3, 50)).astype(np.float32)
    logits[1, [7, 30]] = 9.0  # a tie: both take the first index
    np.testing.assert_array_equal(NextToken()(logits), torch.from_numpy(logits).argmax(-1).numpy())


def test_seeded_sampling_repeats_and_follows_the_seed():
    logits = np.random.default_rng(1).standard_normal((2, 64)).astype(np.float32)
    draw = [NextToken(temperature=1.0, top_k=20, seed=5) for _ in range(2)]
    a = [draw[0](logits).tolist() for _ in range(6)]
    assert a == [draw[1](logits).tolist() for _ in range(6)]
    other = NextToken(temperature=1.0, top_k=20, seed=6)
    assert a != [other(logits).tolist() for _ in range(6)]
