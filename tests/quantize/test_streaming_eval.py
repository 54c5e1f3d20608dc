"""The accuracy evaluation streams: chunk by chunk through both models, reduced at once, with the same numbers as
the whole eval set's logits in one batch, and never more than a chunk of logits asked for."""
import copy
import math

import pytest
import torch

from quantize import report as R

WINDOWS = 6


@pytest.fixture(scope="module")
def pair(tiny_model):
    """The tiny model and a perturbed copy (what a quantizer does to it, roughly), and random eval token ids."""
    model, _, _ = tiny_model
    noisy = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    ids = torch.randint(0, model.config.vocab_size, (WINDOWS * model.config.block_size + 1,), generator=g)
    return model, noisy, ids


def _full_batch_reference(model, noisy, ids):
    """The old computation: every window in one batch, every logit held at once (float64 here)."""
    (x, y), = R.eval_batches(ids, model.config.block_size, WINDOWS, batch_size=WINDOWS)
    with torch.no_grad():
        a, b = model(x).double().flatten(0, 1), noisy(x).double().flatten(0, 1)
    la, lb = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
    return {"loss_before": torch.nn.functional.nll_loss(la, y.flatten()).item(),
            "loss_after": torch.nn.functional.nll_loss(lb, y.flatten()).item(),
            "top1_agreement": (a.argmax(-1) == b.argmax(-1)).double().mean().item(),
            "kl": (la.exp() * (la - lb)).sum(-1).mean().item(), "tokens": y.numel()}


@pytest.mark.parametrize("chunk", [1, 4])  # 4: a last chunk of 2
def test_streamed_equals_full_batch(pair, chunk):
    model, noisy, ids = pair
    ref = _full_batch_reference(model, noisy, ids)
    batches = R.eval_batches(ids, model.config.block_size, WINDOWS, batch_size=chunk)
    got = R.score_pair(R.torch_logits_fn(model), R.torch_logits_fn(noisy), batches)
    assert got["tokens"] == ref["tokens"] and got["top1_agreement"] == pytest.approx(ref["top1_agreement"], abs=1e-9)
    for key in ("loss_before", "loss_after", "kl"):
        assert got[key] == pytest.approx(ref[key], rel=1e-5), key
    assert 0 < got["kl"] and got["top1_agreement"] < 1  # the perturbation is visible: the test can fail
    alone = R.score(R.torch_logits_fn(noisy), batches)
    assert alone["loss"] == pytest.approx(ref["loss_after"], rel=1e-5) and alone["ppl"] == math.exp(alone["loss"])
    r = R.compare(R.torch_logits_fn(model), R.torch_logits_fn(noisy), batches, latency_inputs=None, runtime="torch",
                  threads=1, progress=False)
    assert r["ppl_before"] == pytest.approx(math.exp(ref["loss_before"]), rel=1e-5)
    assert r["kl_per_token"] == pytest.approx(ref["kl"], rel=1e-5)


@pytest.mark.parametrize("chunk", [1, 2])
def test_memory_is_bounded_by_the_chunk(pair, chunk):
    """Each model is asked for at most `chunk` windows of logits at a time, whatever the number of windows."""
    model, noisy, ids = pair
    seen = []

    def recording(fn):
        def call(x):
            out = fn(x)
            seen.append(tuple(out.shape))
            return out
        return call

    batches = R.eval_batches(ids, model.config.block_size, WINDOWS, batch_size=chunk)
    R.score_pair(recording(R.torch_logits_fn(model)), recording(R.torch_logits_fn(noisy)), batches)
    T, V = model.config.block_size, model.config.vocab_size
    assert len(seen) == 2 * math.ceil(WINDOWS / chunk)
    assert max(s[0] * s[1] * s[2] for s in seen) == chunk * T * V


def test_latency_times_a_generation_prefill_of_the_last_logits(pair):
    """The timed prefill asks for the last position's logits, as generation does (not batch x tokens x vocab), on
    the torch model and on an ONNX Runtime session alike."""
    model, noisy, _ = pair
    asked = []

    def spy(fn):
        def timed(x, logits_to_keep=0):
            asked.append(logits_to_keep)
            out = fn(x, logits_to_keep=logits_to_keep)
            assert out.shape[1] == 1
            return out
        return timed

    inputs = R.latency_batch(model.config.vocab_size, model.config.block_size, (2, 16))
    r = R.latency(spy(R.torch_logits_fn(model)), spy(R.torch_logits_fn(noisy)), inputs, runtime="torch", threads=1,
                  repeats=2)
    assert r["logits_to_keep"] == 1 and r["shape"] == [2, 16] and set(asked) == {1}
    assert "to the last logits" in R.format_report({"latency": r})


def test_ort_prefill_keeps_every_position_unless_asked(tiny_onnx):
    import numpy as np

    prefill = R.OrtPrefill(tiny_onnx, threads=1)
    ids = np.arange(10, dtype=np.int64)[None]
    full, last = prefill(ids), prefill(ids, logits_to_keep=1)
    assert full.shape[1] == 10 and last.shape[1] == 1
    np.testing.assert_allclose(last[:, 0], full[:, -1], rtol=1e-4, atol=1e-4)
