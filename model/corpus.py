"""The training corpus: built offline from text every machine has, with a deterministic train/val split.

Default: the Python standard library's own source files (code and docstrings), read in sorted order. A file goes
to validation when the CRC-32 of its relative path falls in the held-out bucket, so the split never depends on
file order or on how much text was read. Users can pass their own text files instead.
"""
from __future__ import annotations

import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from .tokenizer import EOS

VAL_BUCKETS = 20  # 1 file in 20 held out


@dataclass
class Corpus:
    train: list[str]
    val: list[str]

    @property
    def train_text(self) -> str:
        return EOS.join(self.train)

    @property
    def val_text(self) -> str:
        return EOS.join(self.val)


class EmptyCorpusError(ValueError):
    """The corpus paths hold no text, or too little to split into train and validation."""


def stdlib_files() -> list[tuple[str, Path]]:
    """(name relative to the stdlib, path) of every standard-library .py file, sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root).as_posix()
        if rel.startswith(("site-packages/", "dist-packages/")) or "__pycache__" in rel:
            continue
        files.append((rel, p))
    return files


def is_val(name: str) -> bool:
    """Does the file called `name` go to validation? (Its CRC-32 bucket, so the split is stable.)"""
    return zlib.crc32(name.encode()) % VAL_BUCKETS == 0


def build_corpus(paths: Optional[Sequence[str | Path]] = None, max_bytes: int = 8_000_000) -> Corpus:
    """Read up to `max_bytes` of text (train + val) from `paths` (files or folders), or the standard library."""
    if paths:
        files = []
        for p in map(Path, paths):
            if p.is_dir():
                files += [(f.as_posix(), f) for f in sorted(p.rglob("*")) if f.is_file()]
            elif p.is_file():
                files.append((p.as_posix(), p))
            else:
                raise FileNotFoundError(f"corpus path {p} does not exist")
    else:
        files = stdlib_files()
    # separate budgets, so every read holds validation text and a larger read only adds files to each side
    budget = {"train": max_bytes - max_bytes // VAL_BUCKETS, "val": max(1, max_bytes // VAL_BUCKETS)}
    parts: dict[str, list[str]] = {"train": [], "val": []}
    used = {"train": 0, "val": 0}
    for name, path in files:
        side = "val" if is_val(name) else "train"
        if used[side] >= budget[side]:
            if all(used[s] >= budget[s] for s in used):
                break
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        if text.strip():
            parts[side].append(text)
            used[side] += len(text)
    train, val = parts["train"], parts["val"]
    if not train and not val:
        raise EmptyCorpusError("the corpus has no text")
    if not train or not val:  # e.g. a single user file: hold out the last 5% of the last document
        docs = train or val
        text = docs.pop()
        cut = int(len(text) * 0.95)
        train, val = docs + [text[:cut]], [text[cut:]]
        if not train[-1].strip() or not val[-1].strip():
            raise EmptyCorpusError("the corpus is too small to split into train and validation text")
    return Corpus(train, val)
