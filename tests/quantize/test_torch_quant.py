"""PyTorch int8 (weight-only and dynamic): forward contract kept, SQNR of logits, save/load, CLI."""

import pytest
import torch

from quantize.torch_quant import (Int8WeightOnlyLinear, load_quantized, quantize_model, quantize_weight_int8,
                                  save_quantized_checkpoint)

from tests.helpers import sqnr_db


def test_weight_quantization_is_symmetric_per_channel():
    w = torch.randn(37, 19) * torch.logspace(-2, 1, 37)[:, None]  # rows of very different scales
    q, s = quantize_weight_int8(w)
    assert q.dtype == torch.int8 and s.shape == (37,)
    assert int(q.abs().max(dim=1).values.min()) == 127  # each row uses the full range
    assert sqnr_db(w, q.float() * s[:, None]) > 35  # ~ 6 dB per bit


@pytest.mark.parametrize("mode", ["int8-weight", "int8-dynamic"])
def test_quantized_model_keeps_forward_contract(tiny_model, mode):
    model, _, _ = tiny_model
    q = quantize_model(model, mode)
    assert q is not model and not isinstance(model.blocks[0].attn.q_proj, Int8WeightOnlyLinear)  # original intact
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        ref = model(ids)
        full = q(ids)
        # prefill 8 tokens with a cache, then 4 cached steps with an attention mask and positions
        mask = torch.ones(2, 12, dtype=torch.long)
        logits, past = q(ids[:, :8], attention_mask=mask[:, :8], use_cache=True)
        steps = [logits]
        for t in range(8, 12):
            logits, past = q(ids[:, t:t + 1], past_key_values=past, attention_mask=mask[:, :t + 1],
                             position_ids=torch.full((2, 1), t), use_cache=True)
            steps.append(logits)
    cached = torch.cat(steps, dim=1)
    # the cache path computes the same thing (dynamic mode: activation ranges differ per call, hence looser)
    assert sqnr_db(full, cached) > (60 if mode == "int8-weight" else 30)
    assert sqnr_db(ref, full) > 20, f"{mode} logits too far from fp32"


def test_checkpoint_roundtrip_requantizes_exactly(tiny_model, tmp_path):
    model, tok, meta = tiny_model
    path = save_quantized_checkpoint(tmp_path / "q.pt", model, tok, meta, "int8-weight")
    loaded, _, loaded_meta = load_quantized(path)
    assert loaded_meta["quantization"]["mode"] == "int8-weight"
    direct = quantize_model(model, "int8-weight")
    for (n, a), (_, b) in zip(direct.named_buffers(), loaded.named_buffers()):
        assert torch.equal(a, b), n  # quantizing grid-rounded weights gives the same int8 and scales
    # a plain load_checkpoint of the file runs the fake-quantized weights: same logits as int8-weight
    from model.checkpoint import load_checkpoint

    plain, _, _ = load_checkpoint(path)
    ids = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert sqnr_db(direct(ids), plain(ids)) > 60


@pytest.mark.slow
def test_cli_torch_mode_reports_and_serve_loads(tiny_ckpt, tmp_path, capsys):
    from quantize.__main__ import main

    out = tmp_path / "ckpt.torch-int8-dynamic.pt"
    assert main([str(tiny_ckpt), "--mode", "torch-int8-dynamic", "--out", str(out), "--eval-windows", "4",
                 "--latency-repeats", "1"]) == 0
    text = capsys.readouterr().out
    for word in ("perplexity", "top-1 agrees", "latency", "file size"):
        assert word in text
    q, _, meta = load_quantized(out)
    assert meta["quantization"]["mode"] == "int8-dynamic"
    serve = pytest.importorskip("serve.backends.torch_backend")
    backend = serve.TorchBackend(out, quantize="int8-dynamic")
    assert "int8-dynamic" in backend.description
