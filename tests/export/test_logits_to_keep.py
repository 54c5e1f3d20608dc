"""The decoder's logits_to_keep input: generation's prefill gets the last position's logits only, evaluation all
of them, from one graph; files exported before the input existed still load and generate the same tokens."""
import numpy as np
import onnx
import pytest

from export.onnx_runtime import OnnxDecoder
from export.onnx_meta import graph_without_logits_to_keep
from model.generate import generate

pytestmark = pytest.mark.slow  # needs the session's ONNX export


def test_keep_one_is_the_last_row_of_the_full_logits(decoder, tiny_model):
    assert decoder.has_logits_to_keep
    V = decoder.config.vocab_size
    ids = np.random.default_rng(1).integers(0, V, (3, 21))
    full, past_full = decoder.forward(ids)
    assert full.shape == (3, 21, V)
    for k, n in [(1, 1), (5, 5), (21, 21), (400, 21)]:
        kept, past = decoder.forward(ids, logits_to_keep=k)
        assert kept.shape == (3, n, V) and kept.dtype == np.float32
        np.testing.assert_allclose(kept, full[:, -n:], rtol=1e-6, atol=1e-6)
        for (k1, v1), (k2, v2) in zip(past, past_full):  # the cache is the same whatever is kept
            assert np.array_equal(k1, k2) and np.array_equal(v1, v2)
    # a decode step on that cache: one position either way
    nxt = full[:, -1].argmax(-1)[:, None]
    one, _ = decoder.forward(nxt, past=past_full, logits_to_keep=1)
    every, _ = decoder.forward(nxt, past=past_full)
    np.testing.assert_allclose(one, every, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="logits_to_keep"):
        decoder.forward(ids, logits_to_keep=-1)


def test_a_caller_that_leaves_the_input_out_gets_every_position(decoder):
    """onnxruntime-genai's Generator, Triton, or a script written for older exports feed only the other inputs."""
    V = decoder.config.vocab_size
    ids = np.random.default_rng(4).integers(0, V, (2, 9))
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.tile(np.arange(9), (2, 1))}
    for i, (k, v) in enumerate(decoder.empty_past(2)):
        feeds[f"past_key_values.{i}.key"], feeds[f"past_key_values.{i}.value"] = k, v
    assert "logits_to_keep" not in [i.name for i in decoder.session.get_inputs()]
    logits = decoder.session.run(["logits"], feeds)[0]
    assert logits.shape == (2, 9, V)
    np.testing.assert_allclose(logits, decoder.forward(ids)[0], rtol=1e-6, atol=1e-6)


def test_evaluation_paths_get_every_position(tiny_onnx, decoder):
    from quantize import report as R

    prefill = R.OrtPrefill(tiny_onnx, threads=1)
    ids = np.random.default_rng(2).integers(0, decoder.config.vocab_size, (2, 17))
    logits = prefill(ids)
    assert logits.shape == (2, 17, decoder.config.vocab_size)
    np.testing.assert_allclose(logits, decoder.forward(ids)[0], rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def old_style(tiny_onnx, tmp_path_factory):
    """The export as files written before logits_to_keep existed: no such input, every position's logits."""
    path = tmp_path_factory.mktemp("old") / "old.onnx"
    path.write_bytes(graph_without_logits_to_keep(tiny_onnx))
    return OnnxDecoder(path, threads=1)


def test_an_export_without_the_input_still_runs(old_style, decoder, tiny_model):
    assert not old_style.has_logits_to_keep
    assert "logits_to_keep" not in [i.name for i in onnx.load(str(old_style.path)).graph.input]
    ids = np.random.default_rng(3).integers(0, decoder.config.vocab_size, (2, 11))
    full, _ = old_style.forward(ids)
    assert full.shape == (2, 11, decoder.config.vocab_size)  # the old graph computes every position
    last, _ = old_style.forward(ids, logits_to_keep=1)  # and the decoder keeps the last one afterwards
    assert last.shape == (2, 1, decoder.config.vocab_size)
    np.testing.assert_allclose(last, decoder.forward(ids, logits_to_keep=1)[0], rtol=1e-5, atol=1e-5)


def test_greedy_tokens_are_the_same_as_before(old_style, decoder, tiny_model):
    model, tokenizer, _ = tiny_model
    for text in ("def main():\n", "import os", "class A:\n    "):
        prompt = tokenizer.encode(text).ids
        want = generate(model, prompt, 24)
        assert decoder.generate(prompt, 24) == old_style.generate(prompt, 24) == want
