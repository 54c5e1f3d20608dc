"""Every backend that runs here gives `model.generate`'s greedy tokens under continuous batching: torch (plain,
kernels.patch()-ed, int8-quantized against the same quantized model), ONNX Runtime (engine in-process and a real
server driven by the openai client). TensorRT cannot run here: its construction fails with one clear line."""
from __future__ import annotations

import subprocess
import sys

import openai
import pytest
import torch

from common.cli import UserError
from model.generate import generate
from serve.backends import load_backend
from serve.backends.base import Backend
from serve.backends.slot_cache import SlotCache
from serve.backends.torch_backend import TorchBackend
from serve.engine import Engine, SamplingParams

from tests.helpers import ROOT, ServerProcess

pytestmark = pytest.mark.timeout(300)
PROMPTS = ["def ", "import os\n", "class Foo(object):\n    def", "x", "for i in range(10):"]
MAX_TOKENS = [14, 6, 20, 3, 17]


def run_engine(backend, tok, max_batch_size=3, prefill_chunk=128):
    engine = Engine(backend, max_batch_size=max_batch_size, prefill_chunk=prefill_chunk).start()
    try:
        hs = [engine.submit(tok.encode(p).ids, SamplingParams(max_tokens=m)) for p, m in zip(PROMPTS, MAX_TOKENS)]
        return [h.result(timeout=120) for h in hs]
    finally:
        engine.stop()


def refs(model, tok):
    return [generate(model, tok.encode(p).ids, m) for p, m in zip(PROMPTS, MAX_TOKENS)]


def check_slots_against_forward_alone(backend, model, atol):
    """prefill_slot / decode_slots on a cache with holes (slots of different lengths, right-padded, chunk-rounded
    columns) give the logits of running each request alone through the model, for a block of slots and a
    sub-range; one prompt is prefilled in two pieces (the second after an offset)."""
    prompts = [[5, 9, 2, 7, 1], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5], [8, 8]]
    cache = SlotCache(backend.n_layer, 4, backend.kv_heads, backend.head_dim, 64, dtype=backend.kv_dtype,
                      device=backend.device, chunk=8)
    cache.fit(16, 3, 0)

    def alone(ids):
        with torch.no_grad():
            return model(torch.tensor([ids]))[0, -1].float()

    for s, p in enumerate(prompts):
        if len(p) > 6:
            backend.prefill_slot(cache, s, torch.tensor([p[:6]]))
            got = backend.prefill_slot(cache, s, torch.tensor([p[6:]]), offset=6)
        else:
            got = backend.prefill_slot(cache, s, torch.tensor([p]))
        torch.testing.assert_close(got.cpu(), alone(p), rtol=1e-4, atol=atol)
    nxt = [11, 12, 13]
    got = backend.decode_slots(cache, 0, 3, torch.tensor(nxt), torch.tensor([len(p) for p in prompts]))
    assert got.shape == (3, backend.vocab_size)
    seqs = [p + [t] for p, t in zip(prompts, nxt)]
    for row, seq in zip(got.cpu(), seqs):
        torch.testing.assert_close(row, alone(seq), rtol=1e-4, atol=atol)
    got = backend.decode_slots(cache, 1, 2, torch.tensor([20, 21]), torch.tensor([len(s) for s in seqs[1:]]))
    for row, seq, t in zip(got.cpu(), seqs[1:], [20, 21]):
        torch.testing.assert_close(row, alone(seq + [t]), rtol=1e-4, atol=atol)


def test_torch_backend_slots_match_forward_alone(tiny_model):
    model, tok, _ = tiny_model
    check_slots_against_forward_alone(TorchBackend(None, model=model, tokenizer=tok), model, atol=1e-4)


@pytest.mark.slow
def test_onnxruntime_backend_slots_match_forward_alone(tiny_model, tiny_onnx):
    model, _, _ = tiny_model
    check_slots_against_forward_alone(load_backend(tiny_onnx), model, atol=3e-4)


@pytest.mark.slow
@pytest.mark.parametrize("prefill_chunk", [128, 4])
def test_onnxruntime_backend_matches_generate(tiny_model, tiny_onnx, prefill_chunk):
    model, tok, _ = tiny_model
    backend = load_backend(tiny_onnx)
    assert isinstance(backend, Backend) and backend.name == "onnxruntime"
    assert "CPUExecutionProvider" in backend.description
    assert run_engine(backend, tok, prefill_chunk=prefill_chunk) == refs(model, tok)


@pytest.mark.slow
def test_onnxruntime_server_matches_generate(tiny_model, tiny_onnx):
    model, tok, _ = tiny_model
    eos = tok.token_to_id("<|endoftext|>")
    srv = ServerProcess(tiny_onnx, "--backend", "onnxruntime", "--model-name", "tiny-onnx")
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        for p, m in zip(PROMPTS[:3], MAX_TOKENS[:3]):
            want = tok.decode([t for t in generate(model, tok.encode(p).ids, m) if t != eos])
            assert client.completions.create(model="tiny-onnx", prompt=p, max_tokens=m, temperature=0
                                             ).choices[0].text == want
            streamed = client.completions.create(model="tiny-onnx", prompt=p, max_tokens=m, temperature=0,
                                                 stream=True)
            assert "".join(c.choices[0].text for c in streamed if c.choices) == want
    finally:
        assert srv.terminate() == 0, srv.output()


def test_torch_kernels_backend_matches_generate(tiny_model, tiny_ckpt):
    model, tok, _ = tiny_model
    backend = load_backend(tiny_ckpt, "torch", kernels=True)
    assert "kernels.patch" in backend.description
    assert run_engine(backend, tok) == refs(model, tok)


@pytest.mark.parametrize("mode", ["int8-weight", "int8-dynamic"])
def test_torch_quantized_backend_matches_its_own_generate(tiny_model, tiny_ckpt, mode):
    pytest.importorskip("quantize.torch_quant")
    from quantize.torch_quant import quantize_model

    model, tok, _ = tiny_model
    backend = load_backend(tiny_ckpt, "torch", quantize=mode)
    assert mode in backend.description
    assert run_engine(backend, tok) == refs(quantize_model(model, mode), tok)


@pytest.mark.slow
def test_tensorrt_backend_fails_clearly_without_tensorrt(tmp_path):
    import json

    trt_runtime = pytest.importorskip("export.trt_runtime")
    FORMAT, FORMAT_VERSION, metadata_path = trt_runtime.FORMAT, trt_runtime.FORMAT_VERSION, trt_runtime.metadata_path
    plan = tmp_path / "tiny.plan"
    plan.write_bytes(b"not really a plan")
    with pytest.raises(UserError, match="export.to_trt"):  # no JSON beside it: not built by export
        load_backend(plan)
    metadata_path(plan).write_text(json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION,
                                               "tensorrt_version": "10.0", "gpu": {"name": "H100"}}))
    with pytest.raises(UserError, match="(?i)tensorrt"):
        load_backend(plan)
    r = subprocess.run([sys.executable, "-m", "serve", str(plan)], cwd=ROOT, capture_output=True, text=True,
                       timeout=240)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "TensorRT" in lines[0], r.stderr


def test_cli_user_errors(tiny_ckpt, tmp_path):
    from serve.__main__ import main

    with pytest.raises(UserError, match="does not exist"):
        main([str(tmp_path / "missing.pt")])
    with pytest.raises(UserError, match="cannot serve .*export.to_onnx"):
        main([str(tiny_ckpt), "--backend", "onnxruntime"])
    with pytest.raises(UserError, match="cannot tell the backend"):
        (tmp_path / "m.bin").write_bytes(b"x")
        main([str(tmp_path / "m.bin")])
    with pytest.raises(UserError, match="--max-model-len 999 is outside"):
        main([str(tiny_ckpt), "--max-model-len", "999"])
    with pytest.raises(UserError, match="--max-batch-size"):
        main([str(tiny_ckpt), "--max-batch-size", "0"])


def test_torch_backend_forward_contract(tiny_model):
    """forward: (B, T) ids + (B, P+T) mask + (B, T) positions + cache -> float32 logits and a longer cache."""
    model, tok, _ = tiny_model
    b = TorchBackend(None, model=model, tokenizer=tok)
    ids = torch.tensor([[0, 5, 6], [7, 8, 9]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    logits, cache = b.prefill(ids, mask)
    assert logits.shape == (2, b.vocab_size) and logits.dtype == torch.float32
    assert len(cache) == model.config.n_layer and cache[0][0].shape[2] == 3
    step, cache2 = b.decode(torch.tensor([1, 2]), torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]]),
                            torch.tensor([2, 3]), cache)
    assert step.shape == (2, b.vocab_size) and cache2[0][0].shape[2] == 4
    with torch.no_grad():
        want = model(torch.tensor([[5, 6, 1]]))[0, -1]
    torch.testing.assert_close(step[0], want, rtol=1e-4, atol=1e-4)
