"""The OpenAI completion request: its schema, the checks pydantic cannot express, and prompt tokenization.

Malformed JSON -> 400, wrong types -> 422, unsupported or out-of-range values -> 400 (`APIError`). Text prompts are
measured in characters before they are tokenized: a token of the vocabulary covers at most `max_chars_per_token`
characters, so a prompt of N characters has at least ceil(N / max_chars_per_token) tokens, and one that cannot fit
the context is refused without tokenizing it."""
from __future__ import annotations

import json
import math
from typing import Optional, Union

from pydantic import BaseModel, ConfigDict, ValidationError
from tokenizers import Tokenizer

from .errors import APIError, describe

Prompt = Union[str, list[int], list[str], list[list[int]]]


class StreamOptions(BaseModel):
    include_usage: bool = False


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: Optional[str] = None
    prompt: Prompt
    max_tokens: Optional[int] = 16
    temperature: Optional[float] = 1.0
    top_p: Optional[float] = 1.0
    top_k: Optional[int] = None
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: int = 1
    best_of: Optional[int] = None
    echo: bool = False
    logprobs: Optional[int] = None
    suffix: Optional[str] = None
    presence_penalty: Optional[float] = 0.0
    frequency_penalty: Optional[float] = 0.0
    user: Optional[str] = None

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


def parse_completion(body: bytes) -> CompletionRequest:
    """The request body -> a checked CompletionRequest, or APIError (400 for bad JSON or values, 422 for types)."""
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError) as e:  # also UnicodeDecodeError, ints over 4300 digits, deep nesting
        raise APIError(400, f"the body is not valid JSON ({type(e).__name__}: {str(e)[:200]})") from e
    try:
        req = CompletionRequest.model_validate(payload)
    except ValidationError as e:
        raise APIError(422, describe(e.errors())) from e
    check_params(req)
    return req


def check_params(req: CompletionRequest) -> None:
    def bad(msg: str, param: str) -> None:
        raise APIError(400, msg, param=param)

    if req.n != 1 or (req.best_of not in (None, 1)):
        bad("only n=1 and best_of=1 are supported", "n")
    if req.echo:
        bad("echo is not supported", "echo")
    if req.logprobs is not None:
        bad("logprobs are not supported", "logprobs")
    if req.suffix:
        bad("suffix is not supported", "suffix")
    if req.presence_penalty or req.frequency_penalty:
        bad("presence_penalty and frequency_penalty are not supported (leave them 0)", "presence_penalty")
    if req.max_tokens is not None and req.max_tokens < 1:
        bad(f"max_tokens must be at least 1, got {req.max_tokens}", "max_tokens")
    if req.temperature is not None and not 0 <= req.temperature <= 2:
        bad(f"temperature must be in [0, 2], got {req.temperature}", "temperature")
    if req.top_p is not None and not 0 < req.top_p <= 1:
        bad(f"top_p must be in (0, 1], got {req.top_p}", "top_p")
    if req.top_k is not None and req.top_k < -1:
        bad(f"top_k must be -1 (off) or positive, got {req.top_k}", "top_k")
    if len(req.stops) > 4 or any(not s for s in req.stops):
        bad("stop takes up to 4 non-empty strings", "stop")
    if req.seed is not None and not -(1 << 63) <= req.seed < (1 << 64):  # torch.Generator takes 64 bits
        bad("seed must be a 64-bit integer", "seed")
    texts = [req.prompt] if isinstance(req.prompt, str) else [p for p in req.prompt if isinstance(p, str)]
    for param, strings in (("prompt", texts), ("stop", req.stops)):
        if not all(_is_unicode(s) for s in strings):
            bad(f"{param} holds a lone surrogate (\\ud800-\\udfff without its pair), which is not Unicode text",
                param)


def _is_unicode(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def max_chars_per_token(tokenizer: Tokenizer) -> int:
    """The most characters one token can stand for. Byte-level BPE: a token's string has one character per byte,
    and a decoded character takes at least one byte; added (special) tokens are matched in the text as they are."""
    return max((len(t) for t in tokenizer.get_vocab(with_added_tokens=True)), default=1) or 1


def check_prompt_chars(prompt: Prompt, max_tokens: int, max_len: int, chars_per_token: int) -> None:
    """Refuse a text prompt that cannot fit the context whatever its tokens are, before tokenizing it whole."""
    texts = [prompt] if isinstance(prompt, str) else [p for p in prompt if isinstance(p, str)]
    for text in texts:
        at_least = math.ceil(len(text) / chars_per_token)
        if at_least + max_tokens > max_len:
            raise APIError(400, f"This model's maximum context length is {max_len} tokens. However, the prompt has "
                                f"{len(text)} characters, at least {at_least} tokens (a token covers at most "
                                f"{chars_per_token} characters), and {max_tokens} are asked for the completion. "
                                f"Please reduce the prompt or max_tokens.",
                           param="prompt", code="context_length_exceeded")


def tokenize_prompts(prompt: Prompt, tokenizer: Tokenizer) -> list[list[int]]:
    """One token-id list per prompt: a string, a list of ids, or a list of either."""
    if isinstance(prompt, str):
        return [tokenizer.encode(prompt).ids]
    if prompt and all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    if not prompt:
        raise APIError(400, "the prompt is empty", param="prompt")
    return [tokenizer.encode(p).ids if isinstance(p, str) else list(p) for p in prompt]
