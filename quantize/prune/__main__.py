"""`python -m quantize.prune ckpt.pt --method magnitude|2:4|heads|neurons --sparsity S [--finetune-steps N]`.

Prunes the linear layers of the transformer blocks (see `quantize.prune.methods`; the tied embedding / LM head is
left whole), then optionally fine-tunes with the pattern fixed (`quantize.prune.finetune`), saves the checkpoint
beside the input (`ckpt.pruned-heads25.pt`) and prints parameters, held-out perplexity and top-1 agreement before
and after, and prefill latency (torch eager, and ONNX Runtime when export/ is installed);
`--max-ppl-increase PCT` fails the run (exit 1) above PCT.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Optional

from common import cli

from .. import report as R
from .methods import METHODS, check_method, check_scope
from .pipeline import prune_checkpoint


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser("python -m quantize.prune", "Prune a hotpath checkpoint and measure the cost and the speedup.")
    p.add_argument("checkpoint")
    p.add_argument("--method", required=True, metavar="M", help=f"one of: {', '.join(METHODS)}")
    # a plain float: the method decides what fits (2:4 is 0.5 by definition), checked with that in the message
    p.add_argument("--sparsity", type=float, default=None,
                   help="fraction removed, 0 < S < 1 (weights, KV heads or neurons; 2:4 is 0.5 by definition)")
    p.add_argument("--scope", default="global", metavar="S", help="magnitude: global (default) or layer")
    p.add_argument("--finetune-steps", type=cli.non_negative_int, default=0,
                   help="AdamW steps to recover accuracy (masks fixed)")
    p.add_argument("--lr", type=cli.positive_float, default=3e-4, help="fine-tune peak learning rate")
    p.add_argument("--batch-size", type=cli.positive_int, default=8)
    p.add_argument("--out", default=None, help="checkpoint to write (default: beside the input, method in the name)")
    cli.add_corpus_args(p, corpus_bytes=None, default_corpus="the training corpus")
    p.add_argument("--eval-windows", type=cli.positive_int, default=R.DEFAULT_EVAL_WINDOWS)
    p.add_argument("--latency-repeats", type=cli.non_negative_int, default=5,
                   help="timed prefills per model (0 = no timing)")
    p.add_argument("--no-ort", action="store_true", help="skip the ONNX Runtime latency (export + session)")
    p.add_argument("--no-eval", action="store_true")
    cli.add_threads_arg(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-ppl-increase", type=float, default=None, metavar="PCT",
                   help="fail (exit 1) when perplexity rises more than PCT percent")
    cli.add_json_arg(p)
    return p


def format_prune_report(r: dict[str, Any]) -> str:
    """`report.format_report` plus the perplexity before fine-tuning, the ONNX Runtime latency and the 2:4 check."""
    lines = R.format_report(r).splitlines()
    if "ppl_pruned_before_finetune" in r and "finetune" in r:
        lines.insert(3, f"  (after pruning, before the {r['finetune']['steps']}-step fine-tune: perplexity "
                        f"{r['ppl_pruned_before_finetune']:.3f})")
    lat = r.get("latency_ort")
    if lat:
        base, var, (batch, tokens) = lat["baseline"], lat["variant"], lat["shape"]
        lines.append(f"  latency ORT   {base['median_s'] * 1e3:.1f} ms -> {var['median_s'] * 1e3:.1f} ms"
                     f"  ({R.speed_words(lat['speedup'])}; onnxruntime CPU, prefill {batch}x{tokens},"
                     f" spread {var['min_s'] * 1e3:.1f}..{var['max_s'] * 1e3:.1f} ms)")
    if r.get("verified_2_4"):
        lines.append("  2:4 pattern verified after pruning, after fine-tuning and in the saved file")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    check_method(args.method)
    check_scope(args.scope)
    _, r = prune_checkpoint(args.checkpoint, args.method, args.sparsity, finetune_steps=args.finetune_steps,
                            out=args.out, scope=args.scope, lr=args.lr, batch_size=args.batch_size,
                            corpus=args.corpus, corpus_bytes=args.corpus_bytes, evaluate=not args.no_eval,
                            windows=args.eval_windows, latency_repeats=args.latency_repeats,
                            ort_latency=not args.no_ort, threads=args.threads, seed=args.seed,
                            progress=args.json != "-")
    cli.emit(args.json, r, lambda: format_prune_report(r))
    failed = R.ppl_gate(r, args.max_ppl_increase)
    if failed:
        print(f"error: {failed} (output kept at {r['output']}; lower --sparsity or add --finetune-steps)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    cli.run(main)
