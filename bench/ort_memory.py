"""Peak memory and speed of one ONNX Runtime session over a hotpath decoder, in this process:
`python -m bench.ort_memory model.onnx [--threads 2] [--arena on|off] [--mem-pattern on|off] [--prepack on|off]
[--arena-extend same_as_requested|next_power_of_two] [--config KEY=VALUE ...] [--json PATH]`.

One configuration per process (peak RSS is the process's ``ru_maxrss``, so a sweep runs this once per setting):
open :class:`export.onnx_runtime.OnnxDecoder` with the memory settings given (the rest as
:mod:`export.ort_session` chooses), then time a 512-token prefill (the first token of `OnnxDecoder.stream`: last
position's logits, as generation asks) and batch-1 decode steps after a 128-token prompt, the way generation runs
them (on an ort export, in place in a shared cache). Prints one JSON row: RSS after imports, after the session opened
and at the peak (MiB), prefill ms and decode ms/token (medians). The measured tables in :mod:`export.ort_session` and
:mod:`export.tied_weights` come from it (taken when it still fed a concatenated past, as generic exports run).
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from common import cli
from common.machine import peak_rss_mib
from export.onnx_runtime import OnnxDecoder
from export.ort_session import MemorySettings

from .harness import rss_mib


def rss_parts_mib() -> dict[str, float]:
    """Resident anonymous memory (heap, arena, prepacked weights) and file-backed pages (mapped weights, libraries)."""
    parts = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile"):
            parts[key.lower()[3:]] = round(int(value.split()[0]) / 1024, 1)
    return parts


def _on_off(text: str) -> bool:
    if text not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"{text!r} (use on or off)")
    return text == "on"


def measure(path: Path, *, threads: int, memory: MemorySettings, prompt_tokens: int = 128, decode_steps: int = 32,
            prefill_tokens: int = 512, prefill_repeats: int = 3) -> dict[str, Any]:
    row: dict[str, Any] = {"model": path.name, "threads": threads, **memory.describe(),
                           "rss_imports_mib": round(rss_mib(), 1)}
    t0 = time.perf_counter()
    dec = OnnxDecoder(path, providers=["CPUExecutionProvider"], threads=threads, memory=memory)
    row["open_s"] = round(time.perf_counter() - t0, 2)
    row["rss_session_mib"] = round(rss_mib(), 1)
    row["peak_session_mib"] = round(peak_rss_mib(), 1)
    row.update({f"session_{k}_mib": v for k, v in rss_parts_mib().items()})
    rng = np.random.default_rng(0)

    def prompt(n: int) -> list[int]:
        return rng.integers(0, dec.config.vocab_size, n).tolist()

    prefill = []
    for _ in range(prefill_repeats + 1):  # the first is warm-up
        t0 = time.perf_counter()
        next(dec.stream(prompt(prefill_tokens), 1))
        prefill.append(time.perf_counter() - t0)
    tokens = dec.stream(prompt(prompt_tokens), decode_steps + 3)
    next(tokens)  # the prompt's prefill
    steps = []
    for _ in range(decode_steps + 2):  # the first two are warm-up
        t0 = time.perf_counter()
        next(tokens)
        steps.append(time.perf_counter() - t0)
    row.update(prefill_ms=round(1e3 * statistics.median(prefill[1:]), 1),
               decode_ms=round(1e3 * statistics.median(steps[2:]), 2),
               rss_end_mib=round(rss_mib(), 1), peak_rss_mib=round(peak_rss_mib(), 1))
    row.update({f"end_{k}_mib": v for k, v in rss_parts_mib().items()})
    return row


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser("python -m bench.ort_memory", "Peak RSS and speed of one ONNX Runtime session over a hotpath "
                   "decoder (run once per setting: the peak is this process's).")
    p.add_argument("model", help="a hotpath .onnx KV-cache decoder")
    cli.add_threads_arg(p, default=2, help="intra-op threads (default 2)")
    defaults = MemorySettings()
    p.add_argument("--arena", type=_on_off, default=defaults.cpu_mem_arena, help="enable_cpu_mem_arena (on|off)")
    p.add_argument("--mem-pattern", type=_on_off, default=defaults.mem_pattern, help="enable_mem_pattern (on|off)")
    p.add_argument("--prepack", type=_on_off, default=defaults.prepacking,
                   help="weight prepacking (off: session.disable_prepacking=1)")
    p.add_argument("--arena-extend", choices=("same_as_requested", "next_power_of_two"), default=None,
                   help="one environment arena (session.use_env_allocators) growing this way (default: the "
                   "session's own arena)")
    p.add_argument("--config", action="append", default=[], metavar="KEY=VALUE",
                   help="an extra session config entry, repeatable (e.g. session.use_env_allocators=1)")
    p.add_argument("--decode-steps", type=cli.positive_int, default=32)
    p.add_argument("--prompt", type=cli.positive_int, default=128, help="prompt tokens before decoding (default 128)")
    p.add_argument("--prefill", type=cli.positive_int, default=512, help="tokens of the timed prefill (default 512)")
    cli.add_json_arg(p)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    config = []
    for entry in args.config:
        key, sep, value = entry.partition("=")
        if not sep or not key:
            raise cli.UserError(f"--config {entry!r} is not KEY=VALUE")
        config.append((key, value))
    memory = MemorySettings(cpu_mem_arena=args.arena, mem_pattern=args.mem_pattern, prepacking=args.prepack,
                            arena_extend=args.arena_extend, config=tuple(config))
    path = cli.existing_file(args.model, "ONNX model")
    row = measure(path, threads=args.threads, memory=memory, decode_steps=args.decode_steps,
                  prompt_tokens=args.prompt, prefill_tokens=args.prefill)
    cli.emit(args.json, row, lambda: "  ".join(f"{k}={v}" for k, v in row.items()))
    return 0


if __name__ == "__main__":
    cli.run(main)
