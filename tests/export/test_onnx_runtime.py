"""export.onnx_runtime.OnnxDecoder: prefill with an empty past, decode, left-padded batches, generation = PyTorch."""
import numpy as np
import pytest
import torch

from export.onnx_runtime import OnnxDecoder, main, pad_left
from common.cli import UserError
from model.generate import generate


@pytest.mark.slow
def test_attributes(decoder, tiny_model):
    cfg = tiny_model[0].config
    assert decoder.provider == "CPUExecutionProvider"
    assert decoder.config == cfg and decoder.kv_cache
    assert (decoder.num_layers, decoder.kv_heads, decoder.head_dim) == (cfg.n_layer, cfg.n_kv_head, cfg.head_dim)
    assert decoder.dtype == np.float32
    past = decoder.empty_past(3)
    assert len(past) == cfg.n_layer and past[0][0].shape == (3, cfg.n_kv_head, 0, cfg.head_dim)
    assert decoder.tokenizer.to_str() == tiny_model[1].to_str()


@pytest.mark.slow
@torch.no_grad()
def test_prefill_with_empty_past_then_decode_matches_torch(decoder, tiny_model):
    model = tiny_model[0]
    ids = np.random.default_rng(1).integers(0, model.config.vocab_size, size=(2, 7))
    logits, present = decoder.forward(ids, np.ones((2, 7), dtype=np.int64), np.tile(np.arange(7), (2, 1)),
                                      decoder.empty_past(2))
    ref, ref_past = model(torch.from_numpy(ids), use_cache=True)
    assert logits.dtype == np.float32 and logits.shape == (2, 7, model.config.vocab_size)
    np.testing.assert_allclose(logits, ref.numpy(), atol=1e-4, rtol=1e-4)
    assert present[0][0].shape == (2, model.config.n_kv_head, 7, model.config.head_dim)
    np.testing.assert_allclose(present[1][1], ref_past[1][1].numpy(), atol=1e-5)
    for step in range(3):  # decode: one token, past grows by one
        nxt = logits[:, -1].argmax(-1)[:, None]
        logits, present = decoder.forward(nxt, past=present)
        ref, ref_past = model(torch.from_numpy(nxt), past_key_values=ref_past, use_cache=True)
        np.testing.assert_allclose(logits, ref.numpy(), atol=1e-4, rtol=1e-4)
        assert present[0][0].shape[2] == 8 + step


@pytest.mark.slow
@torch.no_grad()
def test_left_padded_batch_gives_the_tokens_of_unpadded_runs(decoder, tiny_model):
    """The serving pattern: left-pad prompts, grow the mask each step; same greedy tokens as single runs."""
    model, tokenizer, _ = tiny_model
    prompts = [tokenizer.encode(t).ids for t in ("def main():\n    return", "x = 1", "import sys\nclass A")]
    ids, mask, pos = pad_left(prompts)
    logits, past = decoder.forward(ids, mask, pos)
    out = [[] for _ in prompts]
    for _ in range(12):
        nxt = logits[:, -1].argmax(-1)
        for b, t in enumerate(nxt):
            out[b].append(int(t))
        mask = np.concatenate([mask, np.ones((len(prompts), 1), dtype=np.int64)], axis=1)
        pos = pos[:, -1:] + 1
        logits, past = decoder.forward(nxt[:, None], mask, pos, past)
    for b, p in enumerate(prompts):
        assert out[b] == generate(model, p, 12) == decoder.generate(p, 12)


@pytest.mark.slow
def test_generate_and_stream_match_model_generate(decoder, tiny_model):
    model, tokenizer, _ = tiny_model
    prompt = tokenizer.encode("def f(x):\n").ids
    assert decoder.generate(prompt, 20) == generate(model, prompt, 20)
    for kw in (dict(temperature=0.9, seed=3), dict(temperature=0.8, top_k=20, top_p=0.9, seed=11)):
        want = generate(model, prompt, 20, **kw)
        assert decoder.generate(prompt, 20, **kw) == want
        assert list(decoder.stream(prompt, 20, **kw)) == want
    greedy = decoder.generate(prompt, 20)
    eos = greedy[4]
    assert decoder.generate(prompt, 20, eos_id=eos) == generate(model, prompt, 20, eos_id=eos)
    assert decoder.generate(prompt, 20, eos_id=eos)[-1] == eos


@pytest.mark.slow
def test_context_limits(decoder, tiny_model):
    model = tiny_model[0]
    ctx = model.config.block_size
    prompt = list(range(1, ctx - 2))
    assert decoder.generate(prompt, 50) == generate(model, prompt, 50)
    assert len(decoder.generate(prompt, 50)) == ctx - len(prompt) + 1
    with pytest.raises(ValueError, match="context"):
        decoder.generate(list(range(ctx + 1)), 1)
    with pytest.raises(ValueError, match="context"):
        decoder.forward(np.ones((1, ctx + 1), dtype=np.int64))
    with pytest.raises(ValueError, match="attention_mask"):
        decoder.forward(np.ones((1, 3), dtype=np.int64), np.ones((1, 2), dtype=np.int64))


@pytest.mark.slow
def test_providers_and_threads(onnx_export):
    with pytest.raises(UserError, match="lacks NoSuchExecutionProvider"):
        OnnxDecoder(onnx_export[0], providers=["NoSuchExecutionProvider"])
    with pytest.raises(UserError, match="threads"):
        OnnxDecoder(onnx_export[0], threads=0)
    dec = OnnxDecoder(onnx_export[0], providers=["CPUExecutionProvider"], threads=2)
    assert dec.provider == "CPUExecutionProvider" and "CPUExecutionProvider" in repr(dec)


def test_pad_left():
    ids, mask, pos = pad_left([[7, 8, 9], [5]], pad_id=0)
    assert ids.tolist() == [[7, 8, 9], [0, 0, 5]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert pos.tolist() == [[0, 1, 2], [0, 0, 0]]
    with pytest.raises(ValueError):
        pad_left([[1], []])


@pytest.mark.slow
def test_cli_generates(onnx_export, tiny_model, capsys):
    model, tokenizer, _ = tiny_model
    assert main([str(onnx_export[0]), "--prompt", "def ", "--max-new-tokens", "8", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    want = generate(model, tokenizer.encode("def ").ids, 8, eos_id=tokenizer.token_to_id("<|endoftext|>"))
    assert out == "def " + tokenizer.decode(want) + "\n"
