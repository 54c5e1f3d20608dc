"""Pruning: exact structural equivalences, sparsity patterns kept through fine-tune and saving, reports."""
import pytest
import torch

from model.checkpoint import load_checkpoint
from model.gpt import GPT
from quantize.prune import (block_linears, magnitude_masks, prune_checkpoint, prune_heads, prune_neurons,
                            structured_importance, verify_2_4)

from tests.helpers import sqnr_db

FAST = dict(windows=4, latency_repeats=0, ort_latency=False, corpus_bytes=400_000)


def _ids(model, B=2, T=20, seed=0):
    return torch.randint(0, model.config.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def test_heads_pruning_equals_zeroing_those_heads(tiny_model):
    """Removing heads gives exactly the original model with those heads' o_proj columns zeroed."""
    model, _, _ = tiny_model
    cfg = model.config
    scores = [torch.rand(cfg.n_head, generator=torch.Generator().manual_seed(i)) for i in range(cfg.n_layer)]
    small, info = prune_heads(model, 0.5, scores)
    assert small.config.n_head == cfg.n_head // 2 and small.config.head_dim == cfg.head_dim
    assert small.config.n_embd == cfg.n_embd
    ref = GPT(cfg)
    ref.load_state_dict(model.state_dict())
    D = cfg.head_dim
    with torch.no_grad():
        for i, keep in enumerate(info["kv_groups_kept"]):
            for h in set(range(cfg.n_head)) - set(keep):
                ref.blocks[i].attn.o_proj.weight[:, h * D:(h + 1) * D] = 0
        ids = _ids(model)
        torch.testing.assert_close(small(ids), ref.eval()(ids), rtol=1e-5, atol=1e-5)
        # and it still decodes with its (smaller) KV cache
        logits, past = small(ids[:, :10], use_cache=True)
        assert past[0][0].shape == (2, small.config.n_kv_head, 10, D)
        step, _ = small(ids[:, 10:11], past_key_values=past, use_cache=True)
        torch.testing.assert_close(step[:, 0], small(ids[:, :11])[:, -1], rtol=1e-4, atol=1e-4)


def test_heads_pruning_removes_whole_kv_groups():
    from model.gpt import GPTConfig

    cfg = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=8, n_kv_head=4, n_embd=64, pos="rope",
                    norm="rmsnorm", mlp="swiglu", bias=False)
    model = GPT(cfg).eval()
    heads, _ = structured_importance(model, [_ids(model, 2, 16)])
    small, info = prune_heads(model, 0.25, heads)
    assert (small.config.n_kv_head, small.config.n_head, small.config.head_dim) == (3, 6, 8)
    assert all(len(k) == 3 for k in info["kv_groups_kept"])
    with torch.no_grad():
        assert torch.isfinite(small(_ids(small, 2, 16))).all()


def test_neurons_pruning_equals_zeroing_those_neurons(tiny_model):
    model, _, _ = tiny_model
    cfg = model.config
    scores = [torch.rand(cfg.mlp_hidden, generator=torch.Generator().manual_seed(i)) for i in range(cfg.n_layer)]
    small, info = prune_neurons(model, 0.25, scores)
    assert small.config.mlp_hidden == cfg.mlp_hidden - round(0.25 * cfg.mlp_hidden)
    ref = GPT(cfg)
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        for i in range(cfg.n_layer):
            drop = scores[i].argsort(descending=True)[small.config.mlp_hidden:]
            ref.blocks[i].mlp.down_proj.weight[:, drop] = 0
        ids = _ids(model)
        torch.testing.assert_close(small(ids), ref.eval()(ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_magnitude_masks_hit_the_sparsity(tiny_model, scope):
    model, _, _ = tiny_model
    masks = magnitude_masks(model, 0.3, scope)
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    assert abs(1 - kept / total - 0.3) < 1e-3
    if scope == "layer":
        assert all(abs(1 - m.float().mean().item() - 0.3) < 1e-2 for m in masks.values())


@pytest.mark.slow
def test_two_four_with_finetune(tiny_ckpt, tmp_path):
    out = tmp_path / "p24.pt"
    model, r = prune_checkpoint(tiny_ckpt, "2:4", finetune_steps=3, out=out, **FAST)
    assert r["verified_2_4"] and not verify_2_4(model)
    saved, _, meta = load_checkpoint(out)
    assert meta["pruning"]["method"] == "2:4" and not verify_2_4(saved)
    for name, lin in block_linears(saved).items():
        nz = (lin.weight != 0).view(lin.weight.shape[0], -1, 4).sum(-1)
        assert int(nz.max()) <= 2, name
        assert (nz == 2).float().mean() > 0.99, name  # exactly two survive (ties with zero are vanishingly rare)
    assert r["finetune"]["steps"] == 3
    assert r["nonzero_after"] < r["nonzero_before"]


@pytest.mark.slow
def test_magnitude_finetune_keeps_masks(tiny_ckpt, tmp_path):
    model, r = prune_checkpoint(tiny_ckpt, "magnitude", 0.5, finetune_steps=3, out=tmp_path / "m.pt", **FAST)
    zeros = sum(int((lin.weight == 0).sum()) for lin in block_linears(model).values())
    total = sum(lin.weight.numel() for lin in block_linears(model).values())
    assert zeros / total >= 0.5 - 1e-3  # fine-tuning did not revive pruned weights
    assert r["ppl_increase_pct"] < 25


@pytest.mark.slow
def test_heads_checkpoint_is_smaller_and_exports(tiny_ckpt, tmp_path):
    out = tmp_path / "h.pt"
    model, r = prune_checkpoint(tiny_ckpt, "heads", 0.25, finetune_steps=2, out=out, **FAST)
    saved, _, meta = load_checkpoint(out)
    assert saved.config.n_head == 3 and saved.config.head_dim == 16 and meta["pruning"]["n_head"] == [4, 3]
    assert r["params_after"] < r["params_before"]
    assert {"ppl_before", "ppl_after", "top1_agreement", "params_before", "params_after"} <= set(r)
    export = pytest.importorskip("export.to_onnx")
    from export.onnx_runtime import OnnxDecoder

    path = tmp_path / "h.onnx"
    export.export_onnx(out, path, validate=False)
    dec = OnnxDecoder(path, threads=2)
    ids = _ids(saved, 1, 12).numpy()
    logits, present = dec.forward(ids, past=dec.empty_past(1))
    assert present[0][0].shape == (1, 3, 12, 16)
    with torch.no_grad():
        assert sqnr_db(saved(torch.from_numpy(ids)).numpy(), logits) > 60


@pytest.mark.slow
def test_cli_prune_neurons_report(tiny_ckpt, tmp_path, capsys):
    from quantize.prune import main

    out = tmp_path / "n.pt"
    assert main([str(tiny_ckpt), "--method", "neurons", "--sparsity", "0.25", "--finetune-steps", "2", "--out",
                 str(out), "--eval-windows", "2", "--latency-repeats", "1", "--no-ort",
                 "--corpus-bytes", "400000"]) == 0
    text = capsys.readouterr().out
    for word in ("parameters", "perplexity", "top-1 agrees", "latency", "before the 2-step fine-tune"):
        assert word in text, word
