"""Token streams for training and evaluation: the corpus encoded once, then sampled as fixed-length windows."""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
from tokenizers import Tokenizer
from tqdm import tqdm

from .corpus import Corpus
from .tokenizer import eos_id


@dataclass
class TokenData:
    train: torch.Tensor  # (N,) int64, documents joined by <|endoftext|>
    val: torch.Tensor

    @classmethod
    def encode(cls, corpus: Corpus, tokenizer: Tokenizer) -> TokenData:
        return cls(encode_text(corpus.train, tokenizer), encode_text(corpus.val, tokenizer))


def encode_text(docs: list[str], tokenizer: Tokenizer) -> torch.Tensor:
    eos = eos_id(tokenizer)
    ids: list[int] = []
    for enc in tokenizer.encode_batch(docs):
        ids.extend(enc.ids)
        if eos is not None:
            ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def random_batch(ids: torch.Tensor, batch_size: int, block: int,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets (B, block) from random offsets."""
    if len(ids) <= block:
        raise ValueError(f"the token stream ({len(ids)} tokens) is shorter than one window of {block + 1}")
    starts = torch.randint(0, len(ids) - block - 1, (batch_size,), generator=generator)
    x = torch.stack([ids[s : s + block] for s in starts.tolist()])
    y = torch.stack([ids[s + 1 : s + 1 + block] for s in starts.tolist()])
    return x, y


def eval_windows(ids: torch.Tensor, block: int,
                 max_windows: Optional[int] = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Non-overlapping windows covering the stream in order (deterministic), as (x, y) pairs of (block,)."""
    n = (len(ids) - 1) // block
    picks: Sequence[int] = range(n)
    if max_windows is not None and n > max_windows:
        stride = n / max_windows  # spread the windows over the whole split
        picks = [int(i * stride) for i in range(max_windows)]
    for w in picks:
        s = w * block
        yield ids[s : s + block], ids[s + 1 : s + 1 + block]


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, ids: torch.Tensor, block: int, batch_size: int = 8,
                  max_windows: Optional[int] = 64, device: str | torch.device = "cpu", progress: bool = False) -> float:
    """Mean next-token cross-entropy (nats) over deterministic validation windows, `batch_size` windows per forward:
    the logits held at once are batch_size x block x vocab floats (batch_size=1 for a large vocabulary)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    windows = list(eval_windows(ids, block, max_windows))
    if not windows:
        raise ValueError(f"the validation split ({len(ids)} tokens) is shorter than one window of {block + 1}")
    bar = tqdm(total=len(windows), desc="evaluating", unit="window", dynamic_ncols=True, file=sys.stderr,
               disable=not progress)
    for i in range(0, len(windows), batch_size):
        x = torch.stack([w[0] for w in windows[i : i + batch_size]]).to(device)
        y = torch.stack([w[1] for w in windows[i : i + batch_size]]).to(device)
        logits = model(x)
        total += torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum").item()
        count += y.numel()
        del logits
        bar.update(len(x))
    bar.close()
    model.train(was_training)
    return total / count


def unigram_perplexity(train: torch.Tensor, val: torch.Tensor, vocab_size: int) -> float:
    """Perplexity on `val` of a unigram model fitted on `train` (add-one smoothing): the bar a model must clear."""
    counts = torch.bincount(train, minlength=vocab_size).double() + 1
    logp = (counts / counts.sum()).log()
    return math.exp(-logp[val].mean().item())
