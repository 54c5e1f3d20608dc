import pytest
import torch

from model.generate import generate
from model.sampling import sample_next

from tests.helpers import run_cli


def test_greedy_with_cache_matches_argmax_without_cache(tiny_model):
    model, tok, _ = tiny_model
    prompt = tok.encode("import os\ndef ").ids
    out = generate(model, prompt, 12)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert out == ids[len(prompt):]


def test_sampling_is_seeded_and_respects_top_k():
    logits = torch.randn(4, 50)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    a = sample_next(logits, temperature=1.0, top_k=3, generator=g1)
    b = sample_next(logits, temperature=1.0, top_k=3, generator=g2)
    assert torch.equal(a, b)
    top3 = logits.topk(3).indices
    for _ in range(20):
        s = sample_next(logits, temperature=1.0, top_k=3)
        assert all(s[i] in top3[i] for i in range(4))


def test_top_p_keeps_the_nucleus():
    logits = torch.tensor([[3.0, 2.9, -5.0, -5.0, -6.0]])
    seen = {int(sample_next(logits, temperature=1.0, top_p=0.5)) for _ in range(50)}
    assert seen <= {0, 1}
    assert {int(sample_next(logits, temperature=1.0, top_p=0.01)) for _ in range(20)} == {0}


def test_generation_stops_at_the_context(tiny_model):
    model, tok, _ = tiny_model
    ctx = model.config.block_size
    assert len(generate(model, [1] * (ctx - 3), 50)) == 4


@pytest.mark.slow
def test_cli_greedy_is_deterministic_and_seeded_sampling_repeats(tiny_ckpt):
    a = run_cli("model.generate", str(tiny_ckpt), "--prompt", "def ", "--max-new-tokens", "8")
    b = run_cli("model.generate", str(tiny_ckpt), "--prompt", "def ", "--max-new-tokens", "8")
    assert a.returncode == 0 and a.stdout == b.stdout and a.stdout.startswith("def ")
    s = [run_cli("model.generate", str(tiny_ckpt), "--prompt", "x", "--temperature", "1", "--top-p", "0.9",
                 "--seed", "5", "--max-new-tokens", "8").stdout for _ in range(2)]
    assert s[0] == s[1]


@pytest.mark.slow
def test_cli_prompt_longer_than_context(tiny_ckpt):
    r = run_cli("model.generate", str(tiny_ckpt), "--prompt", "word " * 200)
    assert r.returncode == 2 and "over the model context" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_eval_cli(tiny_ckpt):
    r = run_cli("model.eval", str(tiny_ckpt), "--corpus-bytes", "400000", "--json")
    assert r.returncode == 0, r.stderr
    import json

    result = json.loads(r.stdout)
    assert result["val_ppl"] < result["unigram_val_ppl"]
    assert "evaluating" in r.stderr and 50 < result["peak_rss_mib"] < 100_000  # progress bar, peak RSS in MiB
    # one window per forward (the default: bounded memory) scores as batches of 4 do
    r4 = run_cli("model.eval", str(tiny_ckpt), "--corpus-bytes", "400000", "--batch-size", "4", "--json")
    assert json.loads(r4.stdout)["val_loss"] == pytest.approx(result["val_loss"], rel=1e-5)
