"""Every backend that runs here gives `model.generate`'s greedy tokens under continuous batching: torch (plain,
kernels.patch()-ed, int8-quantized against the same quantized model), ONNX Runtime on a generic export (concatenated
cache) and an ort-target one (GroupQueryAttention writing the engine's cache in place), each with the engine
in-process and a real server driven by the openai client. TensorRT cannot run here: its construction fails with one
clear line."""
from __future__ import annotations

import concurrent.futures
import subprocess
import sys

import httpx
import numpy as np
import openai
import pytest
import torch

from common.cli import UserError
from model.generate import generate
from serve.backends import load_backend
from serve.backends.base import Backend
from serve.backends.onnxruntime_backend import SharedSlotCache
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
    if getattr(backend, "shared_cache", False):  # the backend's own pinned cache, which its runtime writes in place
        cache = backend.new_cache(4, 64)
        assert isinstance(cache, SharedSlotCache)
    else:
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


ONNX_EXPORTS = ["tiny_onnx", "tiny_ort_onnx"]  # generic target, ort target (fixtures in tests/conftest.py)


@pytest.mark.slow
@pytest.mark.parametrize("export", ONNX_EXPORTS)
def test_onnxruntime_backend_slots_match_forward_alone(tiny_model, export, request):
    model, _, _ = tiny_model
    backend = load_backend(request.getfixturevalue(export))
    assert backend.shared_cache == (export == "tiny_ort_onnx")
    check_slots_against_forward_alone(backend, model, atol=3e-4)


@pytest.mark.slow
@pytest.mark.parametrize("export", ONNX_EXPORTS)
@pytest.mark.parametrize("prefill_chunk", [128, 4])
def test_onnxruntime_backend_matches_generate(tiny_model, export, prefill_chunk, request):
    """Five requests through three slots (they join and leave at different steps), prompts prefilled whole or in
    chunks of 4 tokens (offsets into a slot): each request's tokens are model.generate's."""
    model, tok, _ = tiny_model
    backend = load_backend(request.getfixturevalue(export))
    assert isinstance(backend, Backend) and backend.name == "onnxruntime"
    assert "CPUExecutionProvider" in backend.description
    assert isinstance(backend.new_cache(3, 64), SharedSlotCache) == (export == "tiny_ort_onnx")
    assert run_engine(backend, tok, prefill_chunk=prefill_chunk) == refs(model, tok)


@pytest.mark.slow
@pytest.mark.parametrize("export", ONNX_EXPORTS)
def test_onnxruntime_backend_seeded_sampling_matches_generate(tiny_model, export, request):
    """The tiny model's greedy continuations are mostly one repeated token, which a cache bug can leave unchanged;
    seeded sampling at temperature 1 draws varied tokens from the whole distribution, so every step's logits (and
    the cache behind them) must be right. Five requests through three slots, prompts in 4-token chunks."""
    model, tok, _ = tiny_model
    backend = load_backend(request.getfixturevalue(export))
    params = [SamplingParams(max_tokens=m, temperature=1.0, seed=100 + i) for i, m in enumerate(MAX_TOKENS)]
    refs_ = [generate(model, tok.encode(p).ids, m, temperature=1.0, seed=100 + i)
             for i, (p, m) in enumerate(zip(PROMPTS, MAX_TOKENS))]
    assert len({t for r in refs_ for t in r}) > 20  # varied tokens, not a repeated one
    engine = Engine(backend, max_batch_size=3, prefill_chunk=4).start()
    try:
        hs = [engine.submit(tok.encode(p).ids, sp) for p, sp in zip(PROMPTS, params)]
        assert [h.result(timeout=120) for h in hs] == refs_
    finally:
        engine.stop()


def test_shared_slot_cache_maps_the_decoders_buffers_and_frees_them_when_idle(tiny_ort_onnx):
    backend = load_backend(tiny_ort_onnx)
    cache = backend.new_cache(4, 32)
    assert cache.kv is None and cache.nbytes == 0  # nothing until the engine fits it
    cache.fit(5, 1, 0)
    assert cache.kv is not None and cache.capacity == 32 and cache.allocated_slots == 4  # pinned: all of it
    k = cache.kv.keys[0]
    assert k.shape == (4, backend.kv_heads, 32, backend.head_dim)
    cache.layers[0][0][1, 0, 3, 0] = 7.0  # the engine's torch view and the decoder's buffer are one memory
    assert k[1, 0, 3, 0] == 7.0
    cache.fit(20, 3, 5)
    assert cache.kv.keys[0] is k  # never reallocated while requests are live
    cache.fit(0, 0, 0)
    assert cache.kv is None and cache.nbytes == 0
    cache.fit(0, 0, 0)  # an idle engine iterating again (a KServe call) maps nothing
    assert cache.kv is None


@pytest.mark.slow
def test_onnxruntime_ort_backend_forward_takes_left_padding(tiny_model, tiny_ort_onnx):
    """The ort graph takes right padding only; the backend's first pass compacts a left-padded (or holed) batch and
    puts the logits back where the tokens were, as KServe infer and bench's prefill hand them in."""
    model, _, _ = tiny_model
    backend = load_backend(tiny_ort_onnx)
    rows = [[5, 9, 2, 7, 1], [3, 1, 4]]
    ids = torch.tensor([[5, 9, 2, 7, 1], [0, 3, 0, 1, 4]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 1, 0, 1, 1]])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    logits, _ = backend.forward(ids, mask, pos, None)
    with torch.no_grad():
        for b, r in enumerate(rows):
            want = model(torch.tensor([r]))[0].float()
            torch.testing.assert_close(logits[b][mask[b].bool()], want, rtol=1e-4, atol=3e-4)
    assert not logits[1][~mask[1].bool()].any()  # pad columns: zeros
    last, _ = backend.prefill(ids, mask)  # left-padded prompts: each row's last real token
    torch.testing.assert_close(last, logits[:, -1])


@pytest.mark.slow
@pytest.mark.parametrize("export", ONNX_EXPORTS)
def test_onnxruntime_server_matches_generate(tiny_model, export, request):
    model, tok, _ = tiny_model
    eos = tok.token_to_id("<|endoftext|>")
    srv = ServerProcess(request.getfixturevalue(export), "--backend", "onnxruntime", "--model-name", "tiny-onnx")
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        for p, m in zip(PROMPTS[:3], MAX_TOKENS[:3]):
            want = tok.decode([t for t in generate(model, tok.encode(p).ids, m) if t != eos])
            assert client.completions.create(model="tiny-onnx", prompt=p, max_tokens=m, temperature=0
                                             ).choices[0].text == want
            streamed = client.completions.create(model="tiny-onnx", prompt=p, max_tokens=m, temperature=0,
                                                 stream=True)
            assert "".join(c.choices[0].text for c in streamed if c.choices) == want
        # concurrent requests share the batch (and, on the ort export, the in-place cache)
        with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
            texts = list(pool.map(lambda pm: client.completions.create(
                model="tiny-onnx", prompt=pm[0], max_tokens=pm[1], temperature=0).choices[0].text,
                zip(PROMPTS, MAX_TOKENS)))
        assert texts == [tok.decode([t for t in r if t != eos]) for r in refs(model, tok)]
        # KServe infer with a left-padded batch: the unpadded rows' logits at the real positions
        row = tok.encode("def main(): return 1").ids
        ids = np.array([[0, 0] + row, [9, 8] + row], dtype=np.int64)
        mask = np.array([[0, 0] + [1] * len(row), [1] * (len(row) + 2)], dtype=np.int64)
        body = {"inputs": [{"name": n, "datatype": "INT64", "shape": list(a.shape), "data": a.ravel().tolist()}
                           for n, a in (("input_ids", ids), ("attention_mask", mask))]}
        r = httpx.post(srv.url + "/v2/models/tiny-onnx/infer", json=body, timeout=120)
        assert r.status_code == 200, r.text
        out = r.json()["outputs"][0]
        got = np.array(out["data"], dtype=np.float32).reshape(out["shape"])
        with torch.no_grad():
            np.testing.assert_allclose(got[0, 2:], model(torch.tensor([row]))[0].numpy(), rtol=1e-4, atol=3e-4)
            np.testing.assert_allclose(got[1], model(torch.from_numpy(ids[1:]))[0].numpy(), rtol=1e-4, atol=3e-4)
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
