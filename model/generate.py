"""Generate text with the KV cache: `python -m model.generate ckpt.pt --prompt "def " --max-new-tokens 64`."""
from __future__ import annotations

import argparse
import sys
from typing import Any, Iterator, Optional

import torch

from common import cli
from .checkpoint import load_checkpoint
from .gpt import GPT
from .prompt import check_prompt, print_stream  # re-exported: generators import them from here too
from .sampling import sample_next
from .tokenizer import eos_id


@torch.no_grad()
def stream_tokens(
    model: GPT,
    prompt_ids: list[int],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    seed: Optional[int] = None,
    eos_id: Optional[int] = None,
) -> Iterator[int]:
    """Yield new token ids one by one: one prefill over the prompt, then one cached decode step per token."""
    ctx = model.config.block_size
    check_prompt(prompt_ids, ctx)
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    max_new_tokens = min(max_new_tokens, ctx - len(prompt_ids) + 1)
    ids = torch.tensor([prompt_ids], device=device)
    logits, past = model(ids, use_cache=True, logits_to_keep=1)  # the LM head on the last position only
    for i in range(max_new_tokens):
        nxt = sample_next(logits[:, -1], temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        token = int(nxt.item())
        yield token
        if token == eos_id or i + 1 == max_new_tokens:
            return
        logits, past = model(nxt.view(1, 1), past_key_values=past, use_cache=True)


def generate(model: GPT, prompt_ids: list[int], max_new_tokens: int, **kwargs: Any) -> list[int]:
    """The new token ids (the prompt not included); keyword arguments as :func:`stream_tokens`."""
    return list(stream_tokens(model, prompt_ids, max_new_tokens, **kwargs))


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser("python -m model.generate", "Generate text from a hotpath checkpoint with the KV cache.")
    p.add_argument("checkpoint")
    cli.add_sampling_args(p)
    p.add_argument("--device", default="cpu")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cli.check_sampling_args(args)
    model, tokenizer, _ = load_checkpoint(args.checkpoint, device=args.device)
    prompt_ids = tokenizer.encode(args.prompt).ids
    ctx = model.config.block_size
    check_prompt(prompt_ids, ctx, user_error=True)
    if len(prompt_ids) + args.max_new_tokens > ctx + 1:
        print(f"note: stopping at the context of {ctx} tokens", file=sys.stderr)
    print_stream(tokenizer, args.prompt, stream_tokens(
        model, prompt_ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        seed=args.seed, eos_id=eos_id(tokenizer)))
    return 0


if __name__ == "__main__":
    cli.run(main)
