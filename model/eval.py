"""Validation loss and perplexity: `python -m model.eval ckpt.pt [--corpus FILES] [--windows N]`."""
from __future__ import annotations

import argparse
import math

from common import cli
from common.machine import peak_rss_mib
from .checkpoint import load_checkpoint
from .corpus import EmptyCorpusError, build_corpus
from .data import TokenData, evaluate_loss, unigram_perplexity


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser("python -m model.eval", "Validation loss and perplexity of a checkpoint on the held-out split.")
    p.add_argument("checkpoint")
    cli.add_corpus_args(p)
    p.add_argument("--windows", type=cli.positive_int, default=64, help="validation windows of one context each")
    p.add_argument("--batch-size", type=cli.positive_int, default=1,
                   help="windows per forward (the logits held at once: batch x context x vocab floats)")
    cli.add_json_arg(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    model, tokenizer, meta = load_checkpoint(args.checkpoint)
    try:
        corpus = build_corpus(args.corpus, max_bytes=args.corpus_bytes)
    except (EmptyCorpusError, FileNotFoundError) as e:
        raise cli.UserError(f"{e} (pass readable text files with --corpus)") from e
    data = TokenData.encode(corpus, tokenizer)
    block = model.config.block_size
    if len(data.val) <= block + 1:
        raise cli.UserError(f"the validation split has {len(data.val)} tokens, under one window of {block + 1}")
    loss = evaluate_loss(model, data.val, block, batch_size=args.batch_size, max_windows=args.windows, progress=True)
    result = {"val_loss": loss, "val_ppl": math.exp(loss),
              "unigram_val_ppl": unigram_perplexity(data.train, data.val, model.config.vocab_size),
              "val_tokens": min(len(data.val), args.windows * block), "trained_steps": meta.get("step"),
              "peak_rss_mib": peak_rss_mib()}
    cli.emit(args.json, result, lambda: (
        f"val loss {loss:.4f}  perplexity {result['val_ppl']:.2f}  (unigram {result['unigram_val_ppl']:.1f}, "
        f"{result['val_tokens']:,} tokens; peak RSS {result['peak_rss_mib']:.0f} MiB)"))
    return 0


if __name__ == "__main__":
    cli.run(main)
