"""Run an exported hotpath decoder with ONNX Runtime and its KV cache:
`python -m export.onnx_runtime model.onnx --prompt "def " --max-new-tokens 64 [--temperature T --top-k K --seed S]`.

:class:`OnnxDecoder` owns the session. The graph takes ``input_ids`` (B, T) int64, ``attention_mask``
(B, past + T) int64 (1 = real token, 0 = left padding), ``position_ids`` (B, T) int64 and, for a KV-cache export,
``past_key_values.{i}.key|value`` (B, kv_heads, past, head_dim) in the export's dtype, and ``logits_to_keep``, an
int64 scalar; it returns ``logits`` (B, T, vocab) float32 for logits_to_keep 0, (B, min(k, T), vocab) for k > 0, and
``present.{i}.key|value`` (B, kv_heads, past + T, head_dim). A prefill is the same graph with an empty past
(past = 0); generation asks for the last position's logits only (logits_to_keep 1), evaluation for all (0).
Files exported before ``logits_to_keep`` existed load and run too: their graph computes every position and
:meth:`OnnxDecoder.forward` keeps the last k afterwards (same result, none of the saving; re-export for it).

Generation mirrors :func:`model.generate.stream_tokens` step for step (one prefill, one cached decode step per
token, the same stopping rule, the token chosen by :class:`model.next_token.NextToken`), so with the same seed it
yields the same tokens as the PyTorch model. Greedy generation runs without torch (NumPy argmax): this module and
`python -m export.onnx_runtime` import torch only when sampling with a temperature (the seeded torch generator).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import numpy.typing as npt

from common import cli
from common.cli import UserError
from model.next_token import NextToken
from model.prompt import check_prompt, print_stream

from .onnx_meta import LOGITS_TO_KEEP, gpt_config, parse_hotpath_metadata, tokenizer_of
from .ort_session import open_session

Past = list[tuple[np.ndarray, np.ndarray]]

_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
               "tensor(bfloat16)": np.float32}


def pad_left(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Left-pad token lists into (input_ids, attention_mask, position_ids), each (B, max_len) int64.

    Positions count real tokens only (0 for the pads), as :func:`model.gpt.default_position_ids` does."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    T = max(len(p) for p in prompts)
    ids = np.full((len(prompts), T), pad_id, dtype=np.int64)
    mask = np.zeros((len(prompts), T), dtype=np.int64)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):] = p
        mask[b, T - len(p):] = 1
    return ids, mask, positions_from_mask(mask, T)


def positions_from_mask(attention_mask: np.ndarray, T: int) -> np.ndarray:
    """position_ids (B, T) for the last T tokens: the count of real tokens before each one (pads get 0)."""
    pos = np.cumsum(attention_mask.astype(np.int64), axis=-1) - 1
    return np.maximum(pos, 0)[:, -T:]


class OnnxDecoder:
    """An ONNX Runtime session over a hotpath export, with its config and tokenizer from the file's metadata.

    providers: ONNX Runtime execution providers, best first (default: CUDA when available, else CPU);
    threads: intra-op threads (default: ONNX Runtime's choice). Graph optimizations: ORT_ENABLE_ALL.
    """

    def __init__(self, path: str | os.PathLike, *, providers: Optional[Sequence[str]] = None,
                 threads: Optional[int] = None):
        self.path = cli.existing_file(path, "ONNX model")
        self.session = open_session(self.path, providers=providers, threads=threads)
        self.metadata = parse_hotpath_metadata(self.session.get_modelmeta().custom_metadata_map, str(self.path))
        self.config = gpt_config(self.metadata)
        self.tokenizer = tokenizer_of(self.metadata)
        self.provider: str = self.session.get_providers()[0]
        self.kv_cache: bool = self.metadata["kv_cache"]
        assert self.config.n_kv_head is not None and self.config.head_dim is not None  # filled by GPTConfig
        self.num_layers: int = self.config.n_layer
        self.kv_heads: int = self.config.n_kv_head
        self.head_dim: int = self.config.head_dim
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        types = {i.name: i.type for i in self.session.get_inputs()}
        expected = ["input_ids", "attention_mask", "position_ids"]
        if self.kv_cache:
            expected += [f"past_key_values.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")]
        # logits_to_keep is optional: older exports lack it; ONNX Runtime lists it as an overridable initializer
        # (it has a default of 0), not among the inputs
        self.has_logits_to_keep = LOGITS_TO_KEEP in self.input_names or LOGITS_TO_KEEP in {
            i.name for i in self.session.get_overridable_initializers()}
        given = [n for n in self.input_names if n != LOGITS_TO_KEEP]
        if sorted(expected) != sorted(given) or "logits" not in self.output_names:
            raise UserError(f"{self.path} does not have the inputs of a hotpath decoder (expected {expected[:4]}..., "
                            f"found {self.input_names[:4]}...); re-export it with python -m export.to_onnx")
        self.dtype = np.dtype(_ORT_DTYPES.get(types[expected[-1]], np.float32)) if self.kv_cache else \
            np.dtype(np.float16 if self.metadata["dtype"] == "fp16" else np.float32)
        self._present_names = [f"present.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")]

    def __repr__(self) -> str:
        return (f"OnnxDecoder({str(self.path)!r}, provider={self.provider}, dtype={self.dtype.name}, "
                f"kv_cache={self.kv_cache}, layers={self.num_layers})")

    # ------------------------------------------------------------------------------------------- one step
    def empty_past(self, batch: int) -> Past:
        """A zero-length past for a prefill: per layer (key, value), each (batch, kv_heads, 0, head_dim)."""
        empty = np.zeros((batch, self.kv_heads, 0, self.head_dim), dtype=self.dtype)
        return [(empty, empty) for _ in range(self.num_layers)]

    def forward(self, input_ids: npt.ArrayLike, attention_mask: Optional[npt.ArrayLike] = None,
                position_ids: Optional[npt.ArrayLike] = None, past: Optional[Past] = None, *,
                logits_to_keep: int = 0) -> tuple[np.ndarray, Optional[Past]]:
        """One graph run. input_ids (B, T); attention_mask (B, past + T), default all ones; position_ids (B, T),
        default from the mask; past: per-layer (key, value) or None for an empty one; logits_to_keep: 0 = logits for
        every position, k > 0 = for the last k only (a generation prefill needs 1).

        Returns (logits (B, T, vocab) float32 (B, min(k, T), vocab) for k > 0, present per-layer (key, value)
        (B, kv_heads, past + T, head_dim)); for an export without KV cache, present is None and `past` must be None."""
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise ValueError(f"input_ids must be (batch, tokens) with at least one token, got shape {ids.shape}")
        keep = int(logits_to_keep)
        if keep < 0:
            raise ValueError(f"logits_to_keep={keep} must be 0 (every position) or positive")
        B, T = ids.shape
        if past is not None and not self.kv_cache:
            raise ValueError(f"{self.path.name} was exported without a KV cache (re-export without --no-kv-cache)")
        if self.kv_cache and past is None:
            past = self.empty_past(B)
        past_len = past[0][0].shape[2] if past is not None else 0
        if past_len + T > self.config.block_size:
            raise ValueError(f"{past_len + T} tokens exceed the model context of {self.config.block_size}")
        mask = (np.ones((B, past_len + T), dtype=np.int64) if attention_mask is None
                else np.ascontiguousarray(attention_mask, dtype=np.int64))
        if mask.shape != (B, past_len + T):
            raise ValueError(f"attention_mask must be (batch, past + tokens) = {(B, past_len + T)}, got {mask.shape}")
        pos = positions_from_mask(mask, T) if position_ids is None else np.ascontiguousarray(position_ids,
                                                                                           dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
        if self.has_logits_to_keep:
            feeds[LOGITS_TO_KEEP] = np.array(keep, dtype=np.int64)
        if past is None:  # a logits-only export
            logits = self.session.run(["logits"], feeds)[0]
            return self._kept(logits, keep), None
        if len(past) != self.num_layers:
            raise ValueError(f"past has {len(past)} layers, the model {self.num_layers}")
        for i, (k, v) in enumerate(past):
            feeds[f"past_key_values.{i}.key"] = np.ascontiguousarray(k, dtype=self.dtype)
            feeds[f"past_key_values.{i}.value"] = np.ascontiguousarray(v, dtype=self.dtype)
        out = self.session.run(["logits", *self._present_names], feeds)
        present = [(out[1 + 2 * i], out[2 + 2 * i]) for i in range(self.num_layers)]
        return self._kept(out[0], keep), present

    def _kept(self, logits: np.ndarray, keep: int) -> np.ndarray:
        """float32 logits; the last `keep` positions of an older export's (the graph gave them all)."""
        if keep and not self.has_logits_to_keep:
            logits = logits[:, -keep:]
        return logits.astype(np.float32, copy=False)

    # ------------------------------------------------------------------------------------------- generation
    def stream(self, prompt_ids: Sequence[int], max_new_tokens: int, *, temperature: float = 0.0,
               top_k: Optional[int] = None, top_p: Optional[float] = None, seed: Optional[int] = None,
               eos_id: Optional[int] = None) -> Iterator[int]:
        """Yield new token ids one by one, as :func:`model.generate.stream_tokens` does for the torch model."""
        ctx = self.config.block_size
        prompt_ids = [int(t) for t in prompt_ids]
        check_prompt(prompt_ids, ctx)
        choose = NextToken(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        max_new_tokens = min(max_new_tokens, ctx - len(prompt_ids) + 1)
        seq = list(prompt_ids)
        logits, past = self.forward(np.array([seq], dtype=np.int64), logits_to_keep=1)  # the LM head on 1 position
        for i in range(max_new_tokens):
            token = int(choose(logits[:, -1])[0])
            yield token
            if token == eos_id or i + 1 == max_new_tokens:
                return
            seq.append(token)
            if self.kv_cache:
                logits, past = self.forward(np.array([[token]], dtype=np.int64), past=past)
            else:  # no cache in the graph: recompute the whole sequence
                logits, _ = self.forward(np.array([seq], dtype=np.int64), logits_to_keep=1)

    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int, **kwargs: Any) -> list[int]:
        """New token ids (the prompt not included); keyword arguments as :meth:`stream`."""
        return list(self.stream(prompt_ids, max_new_tokens, **kwargs))


# ------------------------------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    p = cli.parser("python -m export.onnx_runtime",
                   "Generate text from an exported hotpath .onnx with ONNX Runtime and its KV cache.")
    p.add_argument("model", help="a .onnx written by python -m export.to_onnx")
    cli.add_sampling_args(p)
    cli.add_threads_arg(p, help="ONNX Runtime intra-op threads (default: one per core)")
    p.add_argument("--provider", action="append", default=None,
                   help="execution provider, repeatable (default: CUDA when available, else CPU)")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    cli.check_sampling_args(args)
    dec = OnnxDecoder(args.model, providers=args.provider, threads=args.threads)
    prompt_ids = dec.tokenizer.encode(args.prompt).ids
    ctx = dec.config.block_size
    check_prompt(prompt_ids, ctx, user_error=True)
    print(f"note: {Path(args.model).name} on {dec.provider}, {dec.dtype.name}", file=sys.stderr)
    print_stream(dec.tokenizer, args.prompt, dec.stream(
        prompt_ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        seed=args.seed, eos_id=dec.tokenizer.token_to_id("<|endoftext|>")))
    return 0


if __name__ == "__main__":
    cli.run(main)
