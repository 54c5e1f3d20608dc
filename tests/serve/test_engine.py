"""The continuous-batching engine in-process: greedy tokens match `model.generate` while requests join and leave
the batch at different steps; seeded sampling matches too; queue bound, cancel, context limit."""
from __future__ import annotations

import time

import pytest

from model.generate import generate
from serve.backends.slot_cache import SlotCache
from serve.backends.torch_backend import TorchBackend
from serve.engine import Engine, QueueFull, SamplingParams

PROMPTS = ["def ", "import os\n", "class Foo(object):\n    def", "x", "return self._", "for i in range(10):",
           "    if not "]
MAX_TOKENS = [20, 5, 30, 12, 1, 25, 9]


@pytest.fixture(scope="module")
def backend(tiny_model):
    model, tok, _ = tiny_model
    return TorchBackend(None, model=model, tokenizer=tok)


def test_greedy_matches_generate_while_rows_join_and_leave(tiny_model, backend):
    model, tok, _ = tiny_model
    ids = [tok.encode(p).ids for p in PROMPTS]
    ref = [generate(model, p, m) for p, m in zip(ids, MAX_TOKENS)]
    engine = Engine(backend, max_batch_size=3, max_queue=16).start()
    try:
        handles = [engine.submit(p, SamplingParams(max_tokens=m)) for p, m in zip(ids, MAX_TOKENS)]
        out = [h.result(timeout=120) for h in handles]
    finally:
        engine.stop()
    assert out == ref
    assert [h.finish_reason for h in handles] == ["length" if len(r) == m and r[-1] != backend.eos_id else "stop"
                                                 for r, m in zip(ref, MAX_TOKENS)]
    assert engine.max_batch_seen == 3
    assert engine.steps < sum(MAX_TOKENS)  # decode steps were shared


def test_seeded_sampling_matches_generate(tiny_model, backend):
    model, tok, _ = tiny_model
    ids = tok.encode("def main(").ids
    kw = dict(temperature=0.9, top_k=40, top_p=0.9, seed=1234)
    ref = generate(model, ids, 15, **kw)
    engine = Engine(backend, max_batch_size=4).start()
    try:
        other = engine.submit(tok.encode("import").ids, SamplingParams(max_tokens=15, temperature=1.0, seed=1))
        got = engine.generate(ids, SamplingParams(max_tokens=15, **kw), timeout=120)
        other.result(timeout=120)
    finally:
        engine.stop()
    assert got == ref


def test_queue_bound_cancel_and_context_limit(tiny_model, backend):
    _, tok, _ = tiny_model
    engine = Engine(backend, max_batch_size=1, max_queue=1)  # not started: nothing leaves the queue yet
    p = SamplingParams(max_tokens=4)
    a = engine.submit([1, 2, 3], p)  # takes the free batch slot
    b = engine.submit([4, 5], p)  # the one queue place
    with pytest.raises(QueueFull):
        engine.submit([6], p)
    b.cancel()
    with pytest.raises(ValueError, match=r"3 tokens and max_tokens is 62: 65 tokens, over the maximum context "
                                         r"length of 64"):
        engine.submit([1, 2, 3], SamplingParams(max_tokens=62))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.submit([backend.vocab_size], p)
    engine.start()
    try:
        assert len(a.result(timeout=60)) == 4
        assert b.result(timeout=60) == [] and b.finish_reason == "cancelled"
    finally:
        engine.stop()


class SmallChunks(TorchBackend):
    """The torch backend with a cache that regrows every 4 columns, so short test prompts cross many chunks."""

    def new_cache(self, slots, max_len):
        return SlotCache(self.n_layer, slots, self.kv_heads, self.head_dim, max_len, dtype=self.kv_dtype, chunk=4)


@pytest.mark.parametrize("prefill_chunk", [None, 3])
def test_slots_regrowing_and_chunked_prefill_match_generate(tiny_model, prefill_chunk):
    """Requests of different lengths join and leave at different steps (slots move), columns grow and shrink, and
    prompts are prefilled whole (None) or 3 tokens per iteration (continuing after an offset): same greedy tokens."""
    model, tok, _ = tiny_model
    ids = [tok.encode(p).ids for p in PROMPTS]
    ref = [generate(model, p, m) for p, m in zip(ids, MAX_TOKENS)]
    engine = Engine(SmallChunks(None, model=model, tokenizer=tok), max_batch_size=3, max_queue=16,
                    prefill_chunk=prefill_chunk).start()
    try:
        handles = [engine.submit(p, SamplingParams(max_tokens=m)) for p, m in zip(ids, MAX_TOKENS)]
        out = [h.result(timeout=120) for h in handles]
        deadline = time.monotonic() + 10
        while engine._cache is not None and engine._cache.nbytes and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine._cache is not None and engine._cache.nbytes == 0  # idle: the memory was given back
    finally:
        engine.stop()
    assert out == ref
    assert engine.max_batch_seen == 3
