"""The GPT-2 124M model, made here with no download, and its hotpath artifacts, cached in the bench work folder.

As a new user would: random initialisation through transformers' `GPT2LMHeadModel` (GPT-2 124M shape) saved with
`save_pretrained`, a byte-level BPE of GPT-2's vocabulary size trained on the built-in corpus
(`model.tokenizer.train_tokenizer`), then the project's own command-line tools, each in its own process:
`python -m model.from_hf`, `python -m export.to_onnx`, `python -m quantize --no-eval`. A second run reuses every
file whose recipe is unchanged and that is newer than the code that writes it (as make does: an export older than
a file of `model/` or `export/` is made again, a quantized file older than its source or `quantize/` too). The quick
run makes a tiny model of the same architecture through the same path.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

from common.errors import UserError
from common.files import write_json_atomic


@dataclass(frozen=True)
class Recipe:
    name: str
    n_layer: int
    n_embd: int
    n_head: int
    n_positions: int
    vocab_size: int
    corpus_bytes: int  # tokenizer training text (enough for the full vocabulary)
    seed: int = 0


GPT2_124M = Recipe("gpt2-124m", n_layer=12, n_embd=768, n_head=12, n_positions=1024, vocab_size=50257,
                   corpus_bytes=12_000_000)
GPT2_TINY = Recipe("gpt2-tiny", n_layer=2, n_embd=64, n_head=2, n_positions=128, vocab_size=512,
                   corpus_bytes=400_000)


def recipe(quick: bool) -> Recipe:
    return GPT2_TINY if quick else GPT2_124M


def _run(argv: list[str], progress: Callable[[str], None]) -> None:
    """Run one of the project's commands in its own process; its last error line becomes ours."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"python -m {' '.join(argv)} failed: {last[:300]}")
    progress(f"python -m {' '.join(argv)} ({time.perf_counter() - t0:.0f} s)")


def make_hf_folder(r: Recipe, folder: Path) -> None:
    """GPT2LMHeadModel with random weights (seeded) and a trained BPE, as a transformers folder."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from model.corpus import build_corpus
    from model.tokenizer import EOS, train_tokenizer

    tok = train_tokenizer([build_corpus(max_bytes=r.corpus_bytes).train_text], vocab_size=r.vocab_size)
    if tok.get_vocab_size() != r.vocab_size:
        raise RuntimeError(f"the tokenizer reached {tok.get_vocab_size()} tokens, not {r.vocab_size}: "
                           "raise corpus_bytes")
    eos = tok.token_to_id(EOS)
    torch.manual_seed(r.seed)
    cfg = GPT2Config(n_positions=r.n_positions, n_embd=r.n_embd, n_layer=r.n_layer, n_head=r.n_head,
                     vocab_size=r.vocab_size, bos_token_id=eos, eos_token_id=eos)
    GPT2LMHeadModel(cfg).eval().save_pretrained(folder)
    # a fast tokenizer transformers can load (AutoTokenizer): the peers' converters read it from the folder
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS).save_pretrained(folder)
    portable_folder(folder)


def portable_folder(folder: Path) -> None:
    """Make the folder read as OpenAI's GPT-2 folders do, for transformers 4.x (the peers' venv) and 5.x alike:
    name a tokenizer class both know (5.x writes its own `TokenizersBackend`, which 4.x's AutoTokenizer in
    CTranslate2's and llama.cpp's converters cannot load), and keep GPT-2's `n_ctx` in config.json (5.x drops it;
    llama.cpp's GPT-2 converter reads it)."""
    path = folder / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    if cfg.get("tokenizer_class") != "PreTrainedTokenizerFast":
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        write_json_atomic(path, cfg)
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    if "n_ctx" not in cfg:
        cfg["n_ctx"] = cfg["n_positions"]
        write_json_atomic(path, cfg)


@dataclass
class M124:
    """The files of one recipe in `folder`: hf/ (transformers), ckpt.pt (hotpath), model.onnx and its variants."""

    recipe: Recipe
    folder: Path
    progress: Callable[[str], None] = print

    @property
    def hf(self) -> Path:
        return self.folder / "hf"

    @property
    def checkpoint(self) -> Path:
        return self.folder / "ckpt.pt"

    def onnx(self, mode: Optional[str] = None) -> Path:
        """model.onnx (fp32), or model.<mode>.onnx quantized from it: made on first use, and again when stale."""
        fp32 = self.folder / "model.onnx"
        ckpt = self.ensure_checkpoint()
        if is_stale(fp32, [ckpt, *code_files("model", "export")]):
            _run(["export.to_onnx", str(ckpt), "--out", str(fp32)], self.progress)
        if mode is None:
            return fp32
        out = self.folder / f"model.{mode}.onnx"
        if is_stale(out, [fp32, *code_files("quantize")]):
            _run(["quantize", str(fp32), "--mode", mode, "--out", str(out), "--no-eval"], self.progress)
        return out

    def ensure_checkpoint(self) -> Path:
        stamp = self.folder / "recipe.json"
        wanted = asdict(self.recipe)
        if stamp.exists() and self.checkpoint.exists() and json.loads(stamp.read_text()) == wanted:
            portable_folder(self.hf)  # folders made before it was written so
            return self.checkpoint
        if self.folder.exists():  # another recipe's files: start over
            import shutil

            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True)
        t0 = time.perf_counter()
        make_hf_folder(self.recipe, self.hf)
        self.progress(f"made {self.recipe.name} with transformers ({time.perf_counter() - t0:.0f} s)")
        _run(["model.from_hf", str(self.hf), "--out", str(self.checkpoint)], self.progress)
        write_json_atomic(stamp, wanted)
        return self.checkpoint


def code_files(*packages: str) -> list[Path]:
    """The Python files of these top-level packages of the checkout."""
    root = Path(__file__).resolve().parents[2]
    return [f for package in packages for f in (root / package).rglob("*.py")]


def is_stale(target: Path, sources: list[Path]) -> bool:
    """`target` is missing or older than one of `sources` (modification times, as make compares them)."""
    if not target.exists():
        return True
    made = target.stat().st_mtime
    return any(src.stat().st_mtime > made for src in sources)


def ensure_model(workdir: Path, quick: bool, progress: Callable[[str], None] = print) -> M124:
    r = recipe(quick)
    m = M124(r, Path(workdir) / r.name, progress)
    try:
        m.ensure_checkpoint()
    except ImportError as e:
        raise UserError(f"making the {r.name} model needs transformers ({e}; pip install -e '.[dev]')") from e
    return m


def file_mib(path: Path) -> float:
    data = Path(str(path) + ".data")
    return (path.stat().st_size + (data.stat().st_size if data.exists() else 0)) / 2**20
