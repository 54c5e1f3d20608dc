"""`python -m quantize MODEL --mode fp16|int8-dynamic|int8-static|int4-weight|torch-int8-weight|torch-int8-dynamic`.

MODEL is a hotpath checkpoint (exported to ONNX first, by export/) or a hotpath `.onnx`. The output goes beside the
input with the mode in its name (`ckpt.int8-static.onnx`; `ckpt.torch-int8-weight.pt` for the PyTorch modes).
Every run measures the result against the fp32 model in the same run and prints size, held-out perplexity before
and after, top-1 agreement and the latency ratio; `--max-ppl-increase PCT` fails the run (exit 1) above PCT.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Optional

from common import cli
from common.errors import UserError

from . import report as R
from .api import ALL_MODES, run_quantization
from .onnx_quant import CALIB_METHODS, DEFAULT_CALIB_SAMPLES


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser("python -m quantize", "Quantize a hotpath model and measure its accuracy cost and speedup.")
    p.add_argument("model", help="ckpt.pt / .safetensors (exported first) or a hotpath .onnx")
    p.add_argument("--mode", default=None, metavar="MODE", help=f"one of: {', '.join(ALL_MODES)}")
    p.add_argument("--out", default=None, help="output path (default: beside the input, the mode in the name)")
    g = p.add_argument_group("int8-static calibration")
    g.add_argument("--calib-method", default="minmax", metavar="M", help=f"one of: {', '.join(CALIB_METHODS)}")
    g.add_argument("--calib-samples", type=cli.positive_int, default=DEFAULT_CALIB_SAMPLES,
                   help="calibration windows of the model context, from the training split")
    g.add_argument("--calib-cache", default=None,
                   help="calibration ranges (JSON) to reuse or write (default: beside the output)")
    g.add_argument("--recalibrate", action="store_true", help="ignore an existing calibration cache")
    g.add_argument("--op-types", nargs="+", default=["MatMul", "Gemm"], metavar="OP",
                   help="op types given Q/DQ (default MatMul Gemm)")
    g.add_argument("--quantize-attention", action="store_true",
                   help="also Q/DQ the attention matmuls (activation x activation); default: kept in float")
    p.add_argument("--exclude", nargs="+", default=[], metavar="NODE",
                   help="node names (see --list-nodes), globs ('node_MatMul_1*') or op types kept in floating point")
    p.add_argument("--list-nodes", action="store_true",
                   help="print the quantizable nodes of an .onnx (names for --exclude) and exit")
    p.add_argument("--block-size", type=int, default=32, help="int4-weight: weights per quantization block")
    p.add_argument("--accuracy-level", type=int, default=4, choices=[0, 1, 2, 3, 4],
                   help="int4-weight: MatMulNBits compute type (4 = int8 activations, 0 = fp32)")
    cli.add_corpus_args(p, corpus_bytes=None, default_corpus="the training corpus")
    p.add_argument("--eval-windows", type=cli.positive_int, default=R.DEFAULT_EVAL_WINDOWS,
                   help="held-out windows to score")
    p.add_argument("--latency-repeats", type=cli.non_negative_int, default=7,
                   help="timed prefills per model (0 = no timing)")
    cli.add_threads_arg(p)
    p.add_argument("--no-eval", action="store_true", help="quantize only: no perplexity, agreement or latency")
    p.add_argument("--max-ppl-increase", type=float, default=None, metavar="PCT",
                   help="fail (exit 1) when perplexity rises more than PCT percent")
    cli.add_json_arg(p)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.list_nodes:
        from .onnx_quant import list_nodes

        for name, op, weight in list_nodes(args.model):
            print(f"{name}\t{op}\t{weight}")
        return 0
    if args.mode is None:
        raise UserError(f"--mode is required (choose from {', '.join(ALL_MODES)})")
    if args.mode not in ALL_MODES:
        raise UserError(f"unknown mode {args.mode!r} (choose from {', '.join(ALL_MODES)})")
    if args.calib_method not in CALIB_METHODS:
        raise UserError(f"unknown --calib-method {args.calib_method!r} (choose from {', '.join(CALIB_METHODS)})")
    if args.max_ppl_increase is not None and args.no_eval:
        raise UserError("--max-ppl-increase needs the evaluation (drop --no-eval)")
    opts: dict[str, Any] = {}
    if args.mode == "int8-static":
        opts.update(calib_method=args.calib_method, calib_samples=args.calib_samples, calib_cache=args.calib_cache,
                    recalibrate=args.recalibrate, quantize_attention=args.quantize_attention,
                    op_types=args.op_types)
    if args.mode == "int4-weight":
        opts.update(block_size=args.block_size, accuracy_level=args.accuracy_level or None)
    if args.exclude:
        if args.mode.startswith("torch-"):
            raise UserError(f"--exclude does not apply to --mode {args.mode}")
        opts["exclude"] = args.exclude
    r = run_quantization(args.model, args.mode, args.out, evaluate=not args.no_eval, windows=args.eval_windows,
                         latency_repeats=args.latency_repeats, threads=args.threads, corpus=args.corpus,
                         corpus_bytes=args.corpus_bytes, **opts)
    cli.emit(args.json, r, lambda: R.format_report(r))
    failed = R.ppl_gate(r, args.max_ppl_increase)
    if failed:
        print(f"error: {failed} (output kept at {r['output']}; try another mode, --exclude sensitive nodes, "
              "or more calibration samples)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    cli.run(main)
