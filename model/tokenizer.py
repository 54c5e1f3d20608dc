"""Byte-level BPE tokenizer (Hugging Face `tokenizers`), trained on the corpus and stored in the checkpoint."""
from __future__ import annotations

from typing import Iterable, Optional

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS = "<|endoftext|>"


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096) -> Tokenizer:
    """Byte-level BPE as GPT-2: any byte sequence round-trips; `<|endoftext|>` separates documents."""
    if vocab_size < 257:
        raise ValueError(f"vocab_size={vocab_size} is below the 256 byte symbols + {EOS}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def eos_id(tok: Tokenizer) -> Optional[int]:
    """The id of `<|endoftext|>` (None for a tokenizer without it): generation stops there, documents end there."""
    return tok.token_to_id(EOS)
