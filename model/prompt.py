"""What every generator shares around the model call, with no torch: the prompt check and the streamed printing
of the generated text (:mod:`model.generate` for the torch model, :mod:`export.onnx_runtime` for ONNX Runtime)."""
from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Iterator, Sequence

from common.errors import UserError

if TYPE_CHECKING:
    from tokenizers import Tokenizer


def check_prompt(prompt_ids: Sequence[int], context: int, *, user_error: bool = False) -> None:
    """Refuse an empty prompt or one longer than the model's context of `context` tokens (shared by every
    generator): ValueError, or with ``user_error=True`` (a CLI) a UserError that also says what to do."""
    if len(prompt_ids) == 0:
        what, todo = "the prompt is empty", "pass --prompt TEXT"
    elif len(prompt_ids) > context:
        what, todo = f"the prompt has {len(prompt_ids)} tokens, over the model context of {context}", "shorten it"
    else:
        return
    if user_error:
        raise UserError(f"{what} ({todo})")
    raise ValueError(what)


def print_stream(tokenizer: Tokenizer, prompt: str, tokens: Iterator[int]) -> None:
    """Write the prompt, then the generated text as it arrives (whole characters only), then a newline."""
    sys.stdout.write(prompt)
    out: list[int] = []
    printed = ""
    for token in tokens:
        out.append(token)
        text = tokenizer.decode(out)
        if not text.endswith("\ufffd"):  # wait until a multi-byte character is complete
            sys.stdout.write(text[len(printed):])
            sys.stdout.flush()
            printed = text
    sys.stdout.write("\n")
