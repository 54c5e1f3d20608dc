"""Command-line plumbing shared by every `python -m <package>.<module>`: one-line user errors with exit code 2,
the `--debug` flag, the flag groups several commands share, argparse validators and one meaning for `--json`.

    --json         print the result as one JSON object on stdout instead of text
    --json PATH    also write the result as JSON to PATH (the text still prints)
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any, Callable, NoReturn, Optional

from .errors import UserError
from .files import atomic_path, existing_file, write_json_atomic

__all__ = ["UserError", "atomic_path", "existing_file", "run", "parser", "flush_denormals", "positive_int",
           "non_negative_int", "positive_float", "fraction", "add_sampling_args", "check_sampling_args",
           "add_corpus_args", "add_threads_arg", "add_json_arg", "emit"]


def flush_denormals() -> None:
    """Treat subnormal floats as zero on CPU (x86 FTZ/DAZ). A trained model's attention softmax yields probabilities
    below 1e-38, and x86 cores handle those ~50x slower: a trained tiny model's training step measured 1.1 s with
    subnormals against 20 ms without. Values that small change no result that matters.

    Only where torch is already imported: a command that runs without torch (ONNX Runtime, serving clients) would
    pay ~230 MiB RSS for importing it just for this."""
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_flush_denormal(True)


def run(main: Callable[[Optional[list[str]]], Optional[int]], argv: Optional[list[str]] = None) -> None:
    """Run a CLI `main`, turning UserError (and Ctrl-C) into one line and exit code 2 (130 for Ctrl-C)."""
    flush_denormals()
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        code = main(argv)
    except UserError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


class _Parser(argparse.ArgumentParser):
    """argparse with hotpath's error convention: a bad flag is one line, `error: ...`, exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description=description)
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    return p


# ------------------------------------------------------------------------------------------------ validators
# argparse `type=` callables: a bad value becomes argparse's one-line usage error with exit code 2.
def _number(text: str, kind: Callable[[str], Any]) -> Any:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
    if isinstance(value, float) and math.isnan(value):
        raise argparse.ArgumentTypeError("NaN is not allowed")
    return value


def positive_int(text: str) -> int:
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def non_negative_int(text: str) -> int:
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be 0 or more")
    return value


def positive_float(text: str) -> float:
    value = _number(text, float)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{value} must be positive")
    return value


def fraction(text: str) -> float:
    """A number strictly between 0 and 1."""
    value = _number(text, float)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"{value} must be between 0 and 1 (exclusive)")
    return value


# ------------------------------------------------------------------------------------------------ flag groups
def add_sampling_args(p: argparse.ArgumentParser, *, prompt: Optional[str] = "def ",
                      max_new_tokens: int = 64) -> None:
    """--prompt, --max-new-tokens, --temperature, --top-k, --top-p, --seed (model.generate, export.onnx_runtime)."""
    if prompt is not None:
        p.add_argument("--prompt", default=prompt)
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)


def check_sampling_args(args: argparse.Namespace) -> None:
    """The checks that need more than one flag's type, as one-line UserErrors (messages unchanged since v0.1)."""
    if args.max_new_tokens < 1:
        raise UserError("--max-new-tokens must be at least 1")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UserError(f"--top-p {args.top_p} is outside (0, 1]")


def add_corpus_args(p: argparse.ArgumentParser, *, corpus_bytes: Optional[int] = 8_000_000,
                    default_corpus: str = "the built-in corpus") -> None:
    """--corpus FILE_OR_DIR ... and --corpus-bytes N (train, eval, quantize, prune)."""
    p.add_argument("--corpus", nargs="*", default=None, help=f"text files or folders (default: {default_corpus})")
    p.add_argument("--corpus-bytes", type=positive_int, default=corpus_bytes, help="how much corpus text to read")


def add_threads_arg(p: argparse.ArgumentParser, *, default: Optional[int] = None,
                    help: str = "intra-op threads for torch and ONNX Runtime (default: all cores)") -> None:
    p.add_argument("--threads", type=positive_int, default=default, help=help)


def add_json_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                   help="print the result as one JSON object instead of text; with PATH, also write it there")


def emit(json_arg: Optional[str], result: Any, text: Callable[[], str]) -> None:
    """Report `result` the way `--json` asks: JSON on stdout (`--json`), text plus a JSON file (`--json PATH`),
    or text alone."""
    if json_arg == "-":
        print(json.dumps(result, default=str))
        return
    print(text())
    if json_arg is not None:
        write_json_atomic(json_arg, result)
