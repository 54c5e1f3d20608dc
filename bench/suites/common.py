"""What every suite shares in one run: the checkpoint, its model and data, the thread setting, the work folder."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from model import load_checkpoint
from model.corpus import build_corpus
from model.data import TokenData


@dataclass
class Context:
    checkpoint: Path
    quick: bool
    threads: int
    device: str = "cpu"
    workdir: Path = Path("runs/bench/artifacts")
    progress: Callable[[str], None] = print
    _loaded: tuple = field(default=None, repr=False)
    _data: TokenData = field(default=None, repr=False)

    def _load(self):
        if self._loaded is None:
            self._loaded = load_checkpoint(self.checkpoint, device=self.device)
        return self._loaded

    @property
    def model(self):
        return self._load()[0]

    @property
    def tokenizer(self):
        return self._load()[1]

    @property
    def config(self):
        return self.model.config

    @property
    def meta(self) -> dict:
        return self._load()[2]

    def model_copy(self):
        return copy.deepcopy(self.model)

    @property
    def data(self) -> TokenData:
        """The checkpoint's own corpus recipe, re-encoded with its tokenizer: validation text never trained on."""
        if self._data is None:
            nbytes = self.meta.get("args", {}).get("corpus_bytes", 8_000_000)
            self._data = TokenData.encode(build_corpus(max_bytes=nbytes), self.tokenizer)
        return self._data
