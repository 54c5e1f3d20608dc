import pytest
import torch

from model import GPT, GPTConfig
from model.gpt import causal_mask, sdpa_attention

VARIANTS = {
    "gpt2": dict(),
    "llama": dict(norm="rmsnorm", pos="rope", mlp="swiglu", bias=False, tie_embeddings=False),
    "gqa": dict(n_kv_head=2, pos="rope"),
    "mqa": dict(n_kv_head=1, norm="rmsnorm"),
}


def make(variant, **kw):
    torch.manual_seed(0)
    return GPT(GPTConfig.preset("tiny", vocab_size=97, **VARIANTS[variant], **kw)).eval()


def test_presets_have_expected_shapes():
    assert GPTConfig.preset("tiny").n_layer == 2
    small = GPT(GPTConfig.preset("small"))
    assert 1e6 < small.num_params() < 10e6  # "a few million parameters"
    cfg = GPTConfig.preset("gpt2")
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.vocab_size, cfg.block_size) == (12, 12, 768, 50257, 1024)
    with torch.device("meta"):
        assert GPT(cfg).num_params() == 124_439_808  # the 124M GPT-2 count (tied embeddings)


def test_invalid_config_is_refused():
    with pytest.raises(ValueError, match="n_kv_head"):
        GPTConfig(n_head=4, n_kv_head=3)
    with pytest.raises(ValueError, match="unknown preset"):
        GPTConfig.preset("huge")


@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_shape_and_causality(variant):
    m = make(variant)
    x = torch.randint(0, 97, (2, 11))
    logits = m(x)
    assert logits.shape == (2, 11, 97)
    y = x.clone()
    y[:, 7:] = (y[:, 7:] + 1) % 97  # changing the future must not change the past
    torch.testing.assert_close(m(y)[:, :7], logits[:, :7])


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("split", [1, 5, 10])
def test_kv_cache_decode_matches_full_forward(variant, split):
    m = make(variant)
    x = torch.randint(0, 97, (3, 12))
    full = m(x)
    logits, past = m(x[:, :split], use_cache=True)
    pieces = [logits]
    for t in range(split, 12):
        logits, past = m(x[:, t : t + 1], past_key_values=past, use_cache=True)
        pieces.append(logits)
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-5, atol=1e-5)
    assert past[0][0].shape == (3, m.config.n_kv_head, 12, m.config.head_dim)


@pytest.mark.parametrize("variant", ["gpt2", "llama"])
def test_left_padded_batch_matches_unpadded_runs(variant):
    m = make(variant)
    prompts = [torch.randint(0, 97, (n,)) for n in (9, 4, 6)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
    logits, past = m(ids, attention_mask=mask, use_cache=True)
    nxt = torch.randint(0, 97, (len(prompts), 1))
    mask2 = torch.cat([mask, torch.ones(len(prompts), 1, dtype=torch.long)], 1)
    step, _ = m(nxt, past_key_values=past, attention_mask=mask2, use_cache=True)
    for i, p in enumerate(prompts):
        alone = m(torch.cat([p, nxt[i]]).unsqueeze(0))
        torch.testing.assert_close(logits[i, -1], alone[0, -2], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(step[i, -1], alone[0, -1], rtol=1e-5, atol=1e-5)


def test_causal_mask_is_bottom_right_aligned():
    m = causal_mask(2, 4)
    assert m.tolist() == [[True, True, True, False], [True, True, True, True]]


def test_attn_fn_hook_is_per_instance_and_used():
    a, b = make("gpt2"), make("gpt2")
    x = torch.randint(0, 97, (1, 5))
    calls = []

    def spy(q, k, v, *, causal, attn_mask, scale):
        calls.append((q.shape, k.shape, causal))
        return sdpa_attention(q, k, v, causal=causal, attn_mask=attn_mask, scale=scale)

    for blk in a.blocks:
        blk.attn.attn_fn = spy
    torch.testing.assert_close(a(x), b(x))
    assert len(calls) == a.config.n_layer and calls[0][2] is True
    b(x)
    assert len(calls) == a.config.n_layer  # the other instance is untouched


def test_explicit_head_dim_decouples_heads_from_width():
    """After structured head pruning, n_head * head_dim < n_embd; the cache path must still agree."""
    torch.manual_seed(0)
    m = GPT(GPTConfig.preset("tiny", vocab_size=97, n_head=3, head_dim=16, pos="rope")).eval()
    assert m.blocks[0].attn.q_proj.weight.shape == (48, 64)
    x = torch.randint(0, 97, (2, 9))
    logits, past = m(x[:, :5], use_cache=True)
    step, _ = m(x[:, 5:], past_key_values=past, use_cache=True)
    torch.testing.assert_close(torch.cat([logits, step], 1), m(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["gpt2", "llama"])
def test_logits_to_keep_returns_the_last_positions(variant):
    model = make(variant)
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        full = model(ids)
        assert model(ids, logits_to_keep=0).shape == full.shape  # 0 = every position (evaluation)
        for k, n in [(1, 1), (4, 4), (9, 9), (50, 9)]:  # k >= T keeps all T
            kept, cache = model(ids, logits_to_keep=k, use_cache=True)
            assert kept.shape == (2, n, 97) and len(cache) == model.config.n_layer
            torch.testing.assert_close(kept, full[:, -n:], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(ids, logits_to_keep=-1)
