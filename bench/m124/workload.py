"""What every engine is asked to do, and the token ids it gets: the same for hotpath and every peer.

Metrics (greedy, 2 intra-op threads unless told otherwise):
- prefill 1x512 ms: one forward over 512 tokens, producing the next token (generate one token);
- decode b1 ms/token: (time to generate N tokens - time to generate 1) / (N - 1) after a 128-token prompt, so
  the prompt's prefill is not counted;
- decode b8 tokens/s: the same difference for 8 prompts of 128 tokens at once, as 8 (N - 1) tokens per second;
- peak RSS MiB: the worker process's high-water mark (interpreter, imports, model, work: what running it costs).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Workload:
    prompt_len: int = 128
    prefill_len: int = 512
    decode_steps: int = 32  # new tokens per timed generation (b1)
    batch: int = 8
    batch_steps: int = 16  # new tokens per timed generation (b8)
    repeats: int = 2  # timed repeats per worker, after one warm-up
    threads: int = 2

    def to_dict(self) -> dict:
        return asdict(self)


FULL = Workload()
QUICK = Workload(prompt_len=16, prefill_len=32, decode_steps=4, batch=2, batch_steps=3, repeats=1)


def token_ids(vocab_size: int, count: int, length: int, seed: int = 0) -> list[list[int]]:
    """`count` deterministic prompts of `length` ids in [1, vocab): id 0 is `<|endoftext|>` in our tokenizers."""
    rng = np.random.default_rng(seed)
    return rng.integers(1, vocab_size, size=(count, length)).tolist()


def inputs(vocab_size: int, w: Workload) -> dict[str, list[list[int]]]:
    """The prompts of one run: `prefill` (1 x prefill_len), `b1` (1 x prompt_len), `batch` (batch x prompt_len)."""
    return {"prefill": token_ids(vocab_size, 1, w.prefill_len, seed=1),
            "b1": token_ids(vocab_size, 1, w.prompt_len, seed=2),
            "batch": token_ids(vocab_size, w.batch, w.prompt_len, seed=3)}
