"""`--target ort`: ONNX Runtime contrib ops (GroupQueryAttention, FastGelu), validated like
the generic graph, and OnnxDecoder's shared KV cache (past and present bound to one buffer, written in place)."""
import json

import numpy as np
import onnx
import pytest
import torch

from export.genai_config import FILENAME
from export.onnx_meta import read_hotpath_metadata
from export.onnx_runtime import OnnxDecoder
from export.ort_graph import op_histogram
from model.generate import generate
from model.gpt import GPT, GPTConfig

pytestmark = pytest.mark.slow  # every test needs an ONNX export

# decomposed attention and erf GELU must not appear in an ort graph
GENERIC_ATTENTION_OPS = {"Softmax", "IsNaN", "Where", "Gelu", "com.microsoft.Gelu", "com.microsoft.BiasGelu"}


@pytest.fixture(scope="module")
def ort_decoder(tiny_ort_onnx):
    return OnnxDecoder(tiny_ort_onnx, threads=1)


def _histogram(path):
    return op_histogram(onnx.load(str(path), load_external_data=False).graph)


def test_cli_default_is_ort_validated_with_metadata(tiny_ort_onnx, tiny_onnx):
    report = json.loads(tiny_ort_onnx.with_suffix(".json").read_text())
    assert report["ok"] and report["target"] == "ort" and report["validation"]["passed"]
    names = [c["name"] for c in report["validation"]["checks"]]
    assert "right-padded batch" in names and "greedy 32" in names
    assert read_hotpath_metadata(tiny_ort_onnx)["target"] == "ort"
    assert read_hotpath_metadata(tiny_onnx)["target"] == "generic"
    share = {p: json.loads(p.with_name(FILENAME).read_text())["search"]["past_present_share_buffer"]
             for p in (tiny_ort_onnx, tiny_onnx)}
    assert share == {tiny_ort_onnx: True, tiny_onnx: False}


def test_graph_is_contrib_ops_with_fewer_nodes_per_layer(tiny_ort_onnx, tiny_onnx, tiny_model):
    L = tiny_model[0].config.n_layer
    ort, generic = _histogram(tiny_ort_onnx), _histogram(tiny_onnx)
    assert ort["com.microsoft.GroupQueryAttention"] == L
    assert ort["com.microsoft.FastGelu"] == L  # tanh GELU with its bias folded in
    # ln_1, ln_2 per layer and ln_f as LayerNormalization: ONNX Runtime's CPU SkipLayerNormalization is slower
    assert ort["LayerNormalization"] == 2 * L + 1 and "com.microsoft.SkipLayerNormalization" not in ort
    assert ort["MatMul"] == 4 * L + 1  # packed QKV, o_proj, up, down per layer; the LM head
    assert not GENERIC_ATTENTION_OPS & set(ort)
    assert generic["Softmax"] == L
    # per layer: MatMul x4, GQA, LayerNorm x2, FastGelu, 5 Adds (QKV, attention-out and MLP-out biases, 2 residuals)
    total_ort, total_generic = sum(ort.values()), sum(generic.values())
    print(f"nodes: ort {total_ort}, generic {total_generic} ({L} layers)")
    # outside the layers: embeddings (tied: a Gather over the stored W^T + Transpose), logits_to_keep, the head
    assert ort["Add"] <= 5 * L + 2
    assert total_ort <= 13 * L + 24
    assert total_ort < total_generic / 2


def test_shared_cache_greedy_matches_torch(ort_decoder, tiny_model):
    model, tok, _ = tiny_model
    prompt = tok.encode("def main():\n    return").ids
    want = generate(model, prompt, 24)
    assert ort_decoder.shared_cache
    assert ort_decoder.generate(prompt, 24) == want
    # the context limit ends the stream the same way as the torch loop
    long = (prompt * 64)[: model.config.block_size - 3]
    assert ort_decoder.generate(long, 10) == generate(model, long, 10)


@pytest.mark.parametrize("target", ["ort", "generic"])
def test_generate_batch_with_different_prompt_lengths(target, tiny_ort_onnx, tiny_onnx, tiny_model):
    model, tok, _ = tiny_model
    dec = OnnxDecoder(tiny_ort_onnx if target == "ort" else tiny_onnx, threads=1)
    texts = ["def f(x):\n    return x", "import os", "class A:\n    def __init__(self):\n        self.a = 1", "#"]
    prompts = [tok.encode(t).ids for t in texts]
    assert len({len(p) for p in prompts}) == len(prompts)
    assert dec.generate_batch(prompts, 12) == [generate(model, p, 12) for p in prompts]


def test_step_writes_only_its_rows_in_place(ort_decoder, tiny_model):
    _, tok, _ = tiny_model
    dec = ort_decoder
    cache = dec.new_cache(slots=4, max_len=32)
    buffers = [a.ctypes.data for a in cache.keys + cache.values]
    p1, p2 = tok.encode("for i in range(10):").ids, tok.encode("x = 1").ids
    l1 = dec.step(cache, 1, np.array([p1]), np.array([0]))
    l2 = dec.step(cache, 2, np.array([p2]), np.array([0]))
    # the same logits as the copying path (forward, past in, present out)
    ref1, past1 = dec.forward(np.array([p1]), logits_to_keep=1)
    np.testing.assert_allclose(l1, ref1[:, -1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cache.keys[0][1:2, :, :len(p1)], past1[0][0], rtol=1e-6, atol=1e-6)
    # one decode step on rows [1, 3): one new column each, at its own length
    nxt = np.array([l1[0].argmax(), l2[0].argmax()])
    lens = np.array([len(p1), len(p2)])
    before = [a.copy() for a in cache.keys + cache.values]
    logits = dec.step(cache, 1, nxt[:, None], lens)
    ref, present = dec.forward(nxt[:1, None], past=past1)
    np.testing.assert_allclose(logits[0], ref[0, -1], rtol=1e-5, atol=1e-5)
    for old, new in zip(before, cache.keys + cache.values):
        changed = np.argwhere((old != new).any(axis=(1, 3)))  # (row, column) pairs written
        assert {tuple(rc) for rc in changed} <= {(1, len(p1)), (2, len(p2))}
        assert (new[0] == 0).all() and (new[3] == 0).all()  # untouched rows
    np.testing.assert_allclose(cache.keys[0][1, :, len(p1)], present[0][0][0, :, -1], rtol=1e-6, atol=1e-6)
    assert [a.ctypes.data for a in cache.keys + cache.values] == buffers  # the same buffers: no reallocation
    # several new tokens after a past (a chunked prefill) on two rows at once: run row by row, same result
    chunk = np.array([p1[:3], p2[:3]])
    both = dec.step(cache, 1, chunk, lens + 1)
    assert both.shape == (2, dec.config.vocab_size) and np.isfinite(both).all()
    with pytest.raises(ValueError, match="exceed"):
        dec.step(cache, 0, np.zeros((1, 33), np.int64), np.array([0]))
    with pytest.raises(ValueError, match="outside"):
        dec.step(cache, 3, np.zeros((2, 1), np.int64), np.array([0, 0]))


def test_left_padding_is_refused_on_an_ort_graph(ort_decoder, tiny_onnx):
    ids = np.array([[0, 5, 6], [4, 5, 6]])
    mask = np.array([[0, 1, 1], [1, 1, 1]])
    with pytest.raises(ValueError, match="right-padded"):
        ort_decoder.forward(ids, mask)
    with pytest.raises(ValueError, match="--target ort"):  # a generic graph concatenates: no shared cache
        OnnxDecoder(tiny_onnx, threads=1).new_cache(1)


def test_llama_options_export_and_validate(tiny_model, tmp_path):
    """Rotary, grouped-query (2 KV heads for 4), RMSNorm, SwiGLU, no biases: GQA still carries attention (q/k rotated
    with standard ops first, q/k/v not packed), RMSNorm becomes SimplifiedLayerNormalization."""
    from export.to_onnx import export_onnx

    _, tok, _ = tiny_model
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=tok.get_vocab_size(), block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                    pos="rope", norm="rmsnorm", mlp="swiglu", bias=False)
    model = GPT(cfg).eval()
    report = export_onnx(model, tmp_path / "llama.onnx", tokenizer=tok, target="ort")
    assert report.ok, report.summary()
    hist = _histogram(report.path)
    assert hist["com.microsoft.GroupQueryAttention"] == 2
    # RMSNorm fused (2 a layer + the final one); its residual Add left apart, as the LayerNorm graph's is
    assert hist["SimplifiedLayerNormalization"] == 5 and "com.microsoft.SkipSimplifiedLayerNormalization" not in hist
    assert not GENERIC_ATTENTION_OPS & set(hist)
    dec = OnnxDecoder(report.path, threads=1)
    prompts = [[5, 6, 7, 8, 9], [10, 11]]
    assert dec.generate_batch(prompts, 10) == [generate(model, p, 10) for p in prompts]


def test_an_erf_gelu_swap_fails_validation(tiny_model, tmp_path):
    """ORT's own transformer optimizer turns the tanh GELU into erf (Gelu/BiasGelu): close, but not the model.
    Validation must reject such a graph. GELU inputs are scaled to where tanh and erf differ most."""
    from export.to_onnx import export_onnx
    from export.validate import validate_decoder

    _, tok, _ = tiny_model
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.get_vocab_size(), block_size=64, n_layer=4, n_head=4, n_embd=128)).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.mlp.up_proj.weight.mul_(8.0)
            block.mlp.down_proj.weight.mul_(10.0)
    report = export_onnx(model, tmp_path / "tanh.onnx", tokenizer=tok, target="ort")
    assert report.ok, report.summary()
    graph = onnx.load(str(report.path))
    swapped = 0
    for node in graph.graph.node:
        if node.op_type == "FastGelu":
            node.op_type = "BiasGelu" if len(node.input) == 2 else "Gelu"
            swapped += 1
    assert swapped == 4
    onnx.save(graph, str(tmp_path / "erf.onnx"))
    erf = validate_decoder(OnnxDecoder(tmp_path / "erf.onnx", threads=1), model, tok)
    assert not erf.passed, erf.table()
    assert erf.max_abs_diff > 100 * report.validation.max_abs_diff


def test_fp16_ort_export_validates_through_the_cli(tiny_ckpt, tmp_path):
    """--dtype fp16 with the default target: ONNX Runtime has an fp16 GroupQueryAttention CPU kernel; the shared
    cache is fp16 too."""
    from export.to_onnx import main

    out = tmp_path / "tiny.fp16.onnx"
    assert main([str(tiny_ckpt), "--dtype", "fp16", "--out", str(out), "--json", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["target"] == "ort" and report["ok"]
    dec = OnnxDecoder(out, threads=1)
    assert dec.new_cache(1, 8).keys[0].dtype == np.float16
