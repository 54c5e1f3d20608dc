"""`python -m bench.peers [--quick] [--rounds N] [--out DIR] [--readme README.md]`: GPT-2 124M through hotpath
and through the CPU engines users would otherwise pick, in one run (`make bench-peers`, in .venv-peers).

The same weights (bench.m124.model), the same token ids, 2 intra-op threads, greedy; every variant in a fresh
process, in interleaved rounds, medians with min-max. Writes `<out>/peers-<date>-<host>.json` and `<out>/PEERS.md`
(the table, the issue's goals met or missed by how much, the machine), and the same section into the README
between its `bench-peers` markers.
"""
from __future__ import annotations

import socket
import sys
import time
from datetime import datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from common import cli
from common.files import write_json_atomic, write_text_atomic
from common.machine import machine_info

from .m124.model import ensure_model
from .m124.peer_variants import install_failures, peer_variants
from .m124.rounds import run_rounds
from .m124.summary import goals_markdown, judge_all, summarize, table_markdown
from .m124.variants import hotpath_variants
from .m124.workload import FULL, QUICK
from .report import isa_suffix

HOTPATH_ROWS = ("hotpath torch fp32", "hotpath ORT fp32", "hotpath int8-dynamic", "hotpath int4-weight")
PEER_DISTS = ("transformers", "torch", "onnxruntime", "ctranslate2", "onnxruntime-genai", "optimum", "optimum-onnx",
              "llama-cpp-python")
BEGIN, END = "<!-- bench-peers:begin -->", "<!-- bench-peers:end -->"


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for dist in PEER_DISTS:
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return out


def section(doc: dict) -> str:
    m, w = doc["machine"], doc["workload"]
    vers = ", ".join(f"{k} {v}" for k, v in doc["versions"].items() if v)
    status = ("**Preliminary**: measured on a loaded development machine (other jobs sharing its 2 cores, load "
              "average ~5): the wide min-max ranges are that load, and the PyTorch rows (OpenMP threads waiting on "
              "descheduled peers) suffered most. Rerun `make bench-peers` on a quiet machine for the numbers the "
              "goals are judged on.\n\n" if doc.get("preliminary") else "")
    return "\n".join([
        f"### GPT-2 124M: hotpath against the CPU engines ({doc['file']})", "",
        status + f"Machine: {m.get('cpu')} ({m.get('cores')} cores{isa_suffix(m)}), {w['threads']} intra-op threads "
        f"everywhere; "
        f"{vers}; {m.get('date')}. Random-initialised GPT-2 124M (transformers `GPT2LMHeadModel`, a 50257-token "
        f"BPE trained here) imported with `python -m model.from_hf`; greedy; {doc['rounds']} interleaved rounds x "
        f"{w['repeats']} repeats, each variant in a fresh process; median (min-max). Decode: {w['prompt_len']}-token "
        f"prompts, (time for {w['decode_steps']} new tokens - time for 1) / {w['decode_steps'] - 1} at batch 1, "
        f"{w['batch_steps']} at batch {w['batch']}; prefill: one {w['prefill_len']}-token forward and its next "
        "token; peak RSS: the worker process's high-water mark; greedy = ref: the batch-1 tokens that match "
        "hotpath torch fp32's.", "",
        table_markdown(doc["rows"]), "", "Goals (issue #12):", "", goals_markdown(doc["goals"]), "",
        f"Setup (model, exports, conversions) {doc['setup_s']:.0f} s, measurement {doc['measure_s']:.0f} s.", ""])


def update_readme(readme: Path, text: str) -> None:
    body = readme.read_text()
    block = f"{BEGIN}\n{text}\n{END}"
    if BEGIN in body and END in body:
        body = body[: body.index(BEGIN)] + block + body[body.index(END) + len(END):]
    else:
        body = body.rstrip("\n") + "\n\n" + block + "\n"
    write_text_atomic(readme, body)


def write_markdown(doc: dict, out: Path, readme: str | None, quick: bool = False) -> str:
    text = section(doc)
    write_text_atomic(out / ("PEERS-quick.md" if quick else "PEERS.md"), "# " + text.lstrip("# ") + "\n")
    if readme:
        update_readme(Path(readme), text)
    return text


def render(path: Path, out: Path, readme: str | None) -> int:
    import json

    doc = json.loads(path.read_text())
    doc["goals"] = judge_all(doc["rows"])
    write_json_atomic(path, doc)
    write_markdown(doc, out, readme, quick=path.stem.endswith("-quick"))
    print(f"rewrote the Markdown from {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = cli.parser("python -m bench.peers", "GPT-2 124M through hotpath and the CPU peers, side by side.")
    p.add_argument("--quick", action="store_true", help="a tiny GPT-2 and tiny steps (a smoke run)")
    p.add_argument("--rounds", type=cli.positive_int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--out", default="bench/results", help="folder for the JSON and PEERS.md")
    p.add_argument("--workdir", default="runs/bench", help="where the model and converted files are cached")
    p.add_argument("--readme", default=None, help="also write the section into this README (between markers)")
    p.add_argument("--only", action="append", default=None, help="measure only this variant (repeatable)")
    p.add_argument("--final", action="store_true", help="not preliminary: measured on a quiet machine")
    p.add_argument("--render", default=None, metavar="JSON",
                   help="measure nothing: rewrite PEERS.md (and --readme) from this results file, goals recomputed")
    args = p.parse_args(argv)
    if args.render:
        return render(cli.existing_file(args.render, "results file"), Path(args.out), args.readme)
    w = QUICK if args.quick else FULL
    started = time.perf_counter()
    m = ensure_model(Path(args.workdir), args.quick, lambda s: print(f"  {s}", flush=True))
    variants = hotpath_variants(m, only=HOTPATH_ROWS) + peer_variants(m, lambda s: print(f"  {s}", flush=True),
                                                                      w.threads)
    if args.only:
        variants = [v for v in variants if v.name in args.only]
    setup_s = time.perf_counter() - started
    print(f"setup done in {setup_s:.0f} s; measuring {len(variants)} variants x {args.rounds} rounds", flush=True)
    runs = run_rounds(variants, w, m.recipe.vocab_size, args.rounds, lambda s: print(f"  {s}", flush=True))
    rows = summarize(variants, runs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y-%m-%d")
    path = out / f"peers-{stamp}-{socket.gethostname()}{'-quick' if args.quick else ''}.json"
    doc = {"file": path.name, "preliminary": not args.final, "machine": machine_info(w.threads),
           "versions": versions(), "install_failures": install_failures(), "model": m.recipe.name,
           "workload": w.to_dict(), "rounds": args.rounds, "setup_s": round(setup_s, 1),
           "measure_s": round(time.perf_counter() - started - setup_s, 1), "rows": rows, "goals": judge_all(rows),
           "python": sys.executable}
    write_json_atomic(path, doc)
    print(write_markdown(doc, out, args.readme, args.quick))
    print(f"wrote {path} and its Markdown in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    cli.run(main)
