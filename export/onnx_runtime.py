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

An *ort-target* export (``hotpath.target`` "ort", :mod:`export.ort_graph`) takes the same inputs with right padding:
row b's tokens occupy cache columns [0, len_b) and its mask is 1 on [0, len_b + T), 0 after. Its attention is ONNX
Runtime's GroupQueryAttention, which writes in place when past and present are the same buffer. :class:`KVCache`
holds such buffers, (slots, kv_heads, max_len, head_dim) per layer, and :meth:`OnnxDecoder.step` runs a contiguous
range of its rows with ONNX Runtime IO binding (past and present bound to the same memory): a decode step writes
one column per row instead of copying the cache. A serving engine gives each request a row (slot)::

    cache = decoder.new_cache(slots=16, max_len=1024)
    logits = decoder.step(cache, start=3, input_ids=prompt[None], lengths=np.array([0]))   # prefill row 3
    logits = decoder.step(cache, start=0, input_ids=next_tokens[:, None], lengths=lens)   # decode rows 0..n-1

:meth:`OnnxDecoder.generate_batch` (greedy, batched) and :meth:`OnnxDecoder.stream` use it on ort exports and the
concatenating path (left padding, past in, present out) on generic ones.

Generation mirrors :func:`model.generate.stream_tokens` step for step (one prefill, one cached decode step per
token, the same stopping rule, the token chosen by :class:`model.next_token.NextToken`), so with the same seed it
yields the same tokens as the PyTorch model. Greedy generation runs without torch (NumPy argmax): this module and
`python -m export.onnx_runtime` import torch only when sampling with a temperature (the seeded torch generator).
"""
from __future__ import annotations

import argparse
import mmap
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
from .ort_session import DEFAULT_MEMORY, MemorySettings, open_session

Past = list[tuple[np.ndarray, np.ndarray]]

_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
               "tensor(bfloat16)": np.float32}


def _pad(prompts: Sequence[Sequence[int]], pad_id: int, right: bool) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask), each (B, max_len) int64, with every row's tokens at its end or its start."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    T = max(len(p) for p in prompts)
    ids = np.full((len(prompts), T), pad_id, dtype=np.int64)
    mask = np.zeros((len(prompts), T), dtype=np.int64)
    for b, p in enumerate(prompts):
        cols = slice(0, len(p)) if right else slice(T - len(p), T)
        ids[b, cols] = p
        mask[b, cols] = 1
    return ids, mask


def pad_left(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Left-pad token lists into (input_ids, attention_mask, position_ids), each (B, max_len) int64.

    Positions count real tokens only (0 for the pads), as :func:`model.gpt.default_position_ids` does."""
    ids, mask = _pad(prompts, pad_id, right=False)
    return ids, mask, positions_from_mask(mask, ids.shape[1])


def pad_right(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Right-pad token lists into (input_ids, attention_mask, position_ids), each (B, max_len) int64: the layout
    of an ort-target graph's prefill (row b's tokens at [0, len_b); pads get positions past the row's end)."""
    ids, mask = _pad(prompts, pad_id, right=True)
    return ids, mask, np.broadcast_to(np.arange(ids.shape[1], dtype=np.int64), ids.shape).copy()


def right_padded_positions(attention_mask: np.ndarray, T: int) -> np.ndarray:
    """position_ids (B, T) of T new tokens under right padding, by GroupQueryAttention's rule: a first prompt (mask
    width T) starts at 0; otherwise row b's new tokens follow its sum(mask) - T cached ones."""
    B, S = attention_mask.shape
    past = np.zeros(B, dtype=np.int64) if S == T else attention_mask.sum(-1).astype(np.int64) - T
    return past[:, None] + np.arange(T, dtype=np.int64)[None, :]


def is_right_padded(attention_mask: np.ndarray) -> bool:
    """Every row 1 on a prefix and 0 after (at least one 1)."""
    m = np.asarray(attention_mask) != 0
    lens = m.sum(-1)
    return bool((lens > 0).all() and (m == (np.arange(m.shape[1])[None, :] < lens[:, None])).all())


def lazy_zeros(shape: tuple[int, ...], dtype: npt.DTypeLike) -> np.ndarray:
    """A zero-filled writable array in its own anonymous memory mapping of 4 KiB pages, which the kernel backs only
    when written: a cache sized for the whole context costs resident memory for the columns used (row b's columns
    [0, len_b) of one head are one contiguous run). np.zeros would do the same with small pages, but NumPy asks Linux
    for transparent huge pages on large arrays: one 2 MiB page spans 8 rows' worth of a head at GPT-2 124M's 1024
    columns, so 16 rows of 256 tokens made the whole 1.1 GiB buffer resident (measured)."""
    dt = np.dtype(dtype)
    buf = mmap.mmap(-1, max(1, int(np.prod(shape)) * dt.itemsize))
    if hasattr(mmap, "MADV_NOHUGEPAGE"):  # also where transparent huge pages are on for every mapping
        buf.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(buf, dtype=dt, count=int(np.prod(shape))).reshape(shape)


class KVCache:
    """Preallocated key/value buffers of an ort-target decoder, shared between past and present (mapped lazily:
    resident memory follows the columns written, see :func:`lazy_zeros`).

    ``keys[i]`` and ``values[i]``: layer i's (slots, kv_heads, max_len, head_dim) C-contiguous NumPy arrays (wrap
    them with ``torch.from_numpy`` to read them without a copy). Row b holds one sequence: its tokens at columns
    [0, len_b); the caller keeps each row's length (``OnnxDecoder.step`` takes them) and may reuse a row for a new
    sequence by starting again at length 0 (old columns are overwritten, never read past len_b)."""

    def __init__(self, num_layers: int, slots: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: npt.DTypeLike = np.float32):
        if slots < 1 or max_len < 1:
            raise ValueError(f"a cache needs at least one slot and one column (slots={slots}, max_len={max_len})")
        shape = (slots, kv_heads, max_len, head_dim)
        self.keys = [lazy_zeros(shape, dtype) for _ in range(num_layers)]
        self.values = [lazy_zeros(shape, dtype) for _ in range(num_layers)]
        self.slots, self.max_len = slots, max_len

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.keys + self.values)

    def __repr__(self) -> str:
        return (f"KVCache(layers={len(self.keys)}, slots={self.slots}, max_len={self.max_len}, "
                f"{self.nbytes / 2**20:.1f} MiB)")


def positions_from_mask(attention_mask: np.ndarray, T: int) -> np.ndarray:
    """position_ids (B, T) for the last T tokens: the count of real tokens before each one (pads get 0)."""
    pos = np.cumsum(attention_mask.astype(np.int64), axis=-1) - 1
    return np.maximum(pos, 0)[:, -T:]


class OnnxDecoder:
    """An ONNX Runtime session over a hotpath export, with its config and tokenizer from the file's metadata.

    providers: ONNX Runtime execution providers, best first (default: CUDA when available, else CPU);
    threads: intra-op threads (default: ONNX Runtime's choice); memory: how the session allocates (default: the
    measured best, :class:`export.ort_session.MemorySettings`); profile_prefix: ONNX Runtime's profiler on, its
    trace written by ``session.end_profiling()`` (:mod:`export.ort_profile`). Graph optimizations: ORT_ENABLE_ALL.
    """

    def __init__(self, path: str | os.PathLike, *, providers: Optional[Sequence[str]] = None,
                 threads: Optional[int] = None, memory: MemorySettings = DEFAULT_MEMORY,
                 profile_prefix: Optional[str] = None):
        self.path = cli.existing_file(path, "ONNX model")
        self.session = open_session(self.path, providers=providers, threads=threads, memory=memory,
                                    profile_prefix=profile_prefix)
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
        # "ort": GroupQueryAttention, right padding, a cache shared between past and present (KVCache + step)
        self.target: str = self.metadata.get("target", "generic")
        self.shared_cache: bool = self.kv_cache and self.target == "ort"
        self.padding_side = "right" if self.target == "ort" else "left"
        import onnxruntime as ort

        self._keep_last = ort.OrtValue.ortvalue_from_numpy(np.array(1, dtype=np.int64))
        self._binding: Optional[tuple[tuple, Any, Optional[np.ndarray]]] = None  # see _binding_for

    def __repr__(self) -> str:
        return (f"OnnxDecoder({str(self.path)!r}, provider={self.provider}, dtype={self.dtype.name}, "
                f"kv_cache={self.kv_cache}, target={self.target}, layers={self.num_layers})")

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
        (B, kv_heads, past + T, head_dim)); for an export without KV cache, present is None and `past` must be None.

        On an ort-target export the mask is right-padded (see the module docstring) and the default positions follow
        GroupQueryAttention's rule; past and present are separate arrays here (the copying path: validation,
        evaluation). :meth:`step` is the in-place path."""
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
        if self.target == "ort":
            if not is_right_padded(mask):
                raise ValueError(f"{self.path.name} is an ort-target export: its attention_mask is right-padded "
                                 "(row b: 1 on [0, len_b), then 0); re-export with --target generic for left padding")
            if T > 1 and past_len > 0 and B > 1:
                raise ValueError("ONNX Runtime's GroupQueryAttention takes batch 1 for several new tokens after a "
                                 "past (run the rows one at a time)")
        positions = right_padded_positions if self.target == "ort" else positions_from_mask
        pos = positions(mask, T) if position_ids is None else np.ascontiguousarray(position_ids, dtype=np.int64)
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

    # ------------------------------------------------------------------------------------------- shared cache
    def new_cache(self, slots: int, max_len: Optional[int] = None) -> KVCache:
        """A :class:`KVCache` for this ort-target model: `slots` rows of `max_len` columns (default: the context)."""
        if not self.shared_cache:
            raise ValueError(f"{self.path.name} is a {self.target}-target export without GroupQueryAttention: it "
                             "concatenates past and present (re-export with --target ort for a shared cache)")
        max_len = self.config.block_size if max_len is None else int(max_len)
        if not 1 <= max_len <= self.config.block_size:
            raise ValueError(f"max_len={max_len} must be in 1..{self.config.block_size} (the model context)")
        return KVCache(self.num_layers, slots, self.kv_heads, max_len, self.head_dim, self.dtype)

    def step(self, cache: KVCache, start: int, input_ids: npt.ArrayLike, lengths: npt.ArrayLike) -> np.ndarray:
        """Run rows [start, start + n) of `cache`: input_ids (n, T) are new tokens after each row's `lengths` (n,)
        cached ones; their keys and values are written in place at columns [len_b, len_b + T). Returns the logits
        of each row's last new token, (n, vocab) float32. A prefill is n = 1, lengths = [0]; a decode step T = 1.

        Several tokens after a non-empty past run row by row (GroupQueryAttention's CPU kernel takes batch 1 there).
        """
        if not self.shared_cache:
            raise ValueError(f"{self.path.name} is a {self.target}-target export: it has no shared cache to step "
                             "(re-export with --target ort, or use forward)")
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        lens = np.ascontiguousarray(lengths, dtype=np.int64).reshape(-1)
        if ids.ndim != 2 or 0 in ids.shape or ids.shape[0] != lens.shape[0]:
            raise ValueError(f"input_ids must be (n, tokens) with n = len(lengths) = {lens.shape[0]}, got {ids.shape}")
        n, T = ids.shape
        if not (0 <= start and start + n <= cache.slots):
            raise ValueError(f"rows [{start}, {start + n}) are outside the cache's {cache.slots} slots")
        self._check_cache(cache)  # ONNX Runtime reads and writes these buffers by pointer: a wrong one would crash
        if (lens < 0).any() or int(lens.max()) + T > cache.max_len:
            raise ValueError(f"lengths {lens.tolist()} + {T} new tokens exceed the cache's {cache.max_len} columns")
        if T > 1 and n > 1 and lens.any():
            return np.concatenate([self.step(cache, start + b, ids[b:b + 1], lens[b:b + 1]) for b in range(n)])
        return self._bound_run(cache, start, ids, lens)

    def _check_cache(self, cache: KVCache) -> None:
        shape = (cache.slots, self.kv_heads, cache.max_len, self.head_dim)
        arrays = cache.keys + cache.values
        if len(arrays) != 2 * self.num_layers or any(
                a.shape != shape or a.dtype != self.dtype or not a.flags.c_contiguous or not a.flags.writeable
                for a in arrays):
            raise ValueError(f"the cache is not this model's: {self.num_layers} layers of writable C-contiguous "
                             f"{self.dtype.name} {shape} keys and values (make it with new_cache)")

    def _bound_run(self, cache: KVCache, start: int, ids: np.ndarray, lens: np.ndarray) -> np.ndarray:
        """One graph run with past_key_values.i.* and present.i.* bound to the same rows of `cache`."""
        n, T = ids.shape
        total = int(lens.max()) + T
        mask = (np.arange(total)[None, :] < (lens + T)[:, None]).astype(np.int64)  # right padding
        pos = lens[:, None] + np.arange(T, dtype=np.int64)[None, :]
        binding, logits = self._binding_for(cache, start, n)
        for name, value in (("input_ids", ids), ("attention_mask", mask), ("position_ids", pos)):
            binding.bind_cpu_input(name, value)
        self.session.run_with_iobinding(binding)
        if logits is None:  # an export without logits_to_keep: ORT allocated (n, T, vocab)
            logits = binding.get_outputs()[0].numpy()
        return logits[:, -1].astype(np.float32)  # a copy: the bound buffer is rewritten by the next step

    def _binding_for(self, cache: KVCache, start: int, n: int) -> tuple[Any, Optional[np.ndarray]]:
        """The IO binding of rows [start, start + n) of `cache` (its 2 x layers past/present pointers and a logits
        buffer), kept from the last step: consecutive decode steps over the same rows rebind only the three small
        inputs (rebinding all 4 x layers buffers and allocating the logits cost ~0.5 ms a step at GPT-2 124M, ~15%
        of an int4 decode step). Rebuilt whenever the rows or the buffers' addresses change."""
        rows_at = [bufs[i][start:start + n].ctypes.data for bufs in (cache.keys, cache.values)
                   for i in range(self.num_layers)]
        key = (start, n, cache.max_len, *rows_at)
        if self._binding is not None and self._binding[0] == key:
            return self._binding[1], self._binding[2]
        binding = self.session.io_binding()
        if self.has_logits_to_keep:  # an overridable initializer: bind_cpu_input finds no such input, an OrtValue does
            binding.bind_ortvalue_input(LOGITS_TO_KEEP, self._keep_last)
        logits: Optional[np.ndarray] = None
        if self.has_logits_to_keep:  # always (n, 1, vocab): bind a buffer of ours instead of one ORT allocates
            logits = np.empty((n, 1, self.config.vocab_size), dtype=np.float32)
            binding.bind_output("logits", "cpu", 0, np.float32, logits.shape, logits.ctypes.data)
        else:
            binding.bind_output("logits", "cpu")
        etype = cache.keys[0].dtype.type
        shape = (n, self.kv_heads, cache.max_len, self.head_dim)
        for i in range(self.num_layers):
            for kv, bufs in (("key", cache.keys), ("value", cache.values)):
                ptr = bufs[i][start:start + n].ctypes.data  # a contiguous block of the C-ordered buffer
                binding.bind_input(f"past_key_values.{i}.{kv}", "cpu", 0, etype, shape, ptr)
                binding.bind_output(f"present.{i}.{kv}", "cpu", 0, etype, shape, ptr)
        self._binding = (key, binding, logits)
        return binding, logits

    # ------------------------------------------------------------------------------------------- generation
    def generate_batch(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
                       eos_id: Optional[int] = None) -> list[list[int]]:
        """Greedy continuations of several prompts decoded together, one batched step per token: on an ort-target
        export each prompt is prefilled into its own row of a shared :class:`KVCache`, then all rows step in place;
        on a generic one the prompts are left-padded and the cache is concatenated. Each row stops at `eos_id` (its
        list ends with it) or after max_new_tokens (fewer when the context runs out). Returns new ids per prompt."""
        ctx = self.config.block_size
        prompts = [[int(t) for t in p] for p in prompts]
        for p in prompts:
            check_prompt(p, ctx)
        if not self.kv_cache:
            return [self.generate(p, max_new_tokens, eos_id=eos_id) for p in prompts]
        limits = [max(0, min(max_new_tokens, ctx - len(p) + 1)) for p in prompts]
        out: list[list[int]] = [[] for _ in prompts]
        steps = max(limits, default=0)
        if steps == 0:
            return out
        if self.shared_cache:
            cache = self.new_cache(len(prompts), min(ctx, max(len(p) + n for p, n in zip(prompts, limits))))
            lens = np.array([len(p) for p in prompts], dtype=np.int64)
            logits = np.concatenate([self.step(cache, b, np.array([p]), np.zeros(1, np.int64))
                                     for b, p in enumerate(prompts)])
        else:
            ids, mask, pos = pad_left(prompts)
            limits = [min(n, ctx - ids.shape[1] + 1) for n in limits]  # the padded cache grows for every row
            logits3, past = self.forward(ids, mask, pos, logits_to_keep=1)
            logits = logits3[:, -1]
        done = np.zeros(len(prompts), dtype=bool)
        for i in range(steps):
            tokens = logits.argmax(-1).astype(np.int64)
            for b, t in enumerate(tokens):
                if not done[b]:
                    out[b].append(int(t))
                    done[b] = int(t) == eos_id or len(out[b]) >= limits[b]
            if done.all():
                break
            if self.shared_cache:  # finished rows step too (one column each, ignored): the batch stays contiguous
                fresh = np.minimum(lens, cache.max_len - 1)
                logits = self.step(cache, 0, tokens[:, None], fresh)
                lens = fresh + 1
            else:
                mask = np.concatenate([mask, np.ones((len(prompts), 1), dtype=np.int64)], axis=1)
                pos = pos[:, -1:] + 1
                logits3, past = self.forward(tokens[:, None], mask, pos, past)
                logits = logits3[:, -1]
        return out

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
        if self.shared_cache:  # one row of a max-length cache, written in place
            cache = self.new_cache(1, min(ctx, len(seq) + max_new_tokens))
            yield from self._stream_shared(cache, seq, max_new_tokens, choose, eos_id)
            return
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

    def _stream_shared(self, cache: KVCache, seq: list[int], max_new_tokens: int, choose: NextToken,
                       eos_id: Optional[int]) -> Iterator[int]:
        length = 0
        new = seq
        for i in range(max_new_tokens):
            if length + len(new) > cache.max_len:  # the context is full: the same stop as the torch loop
                return
            logits = self.step(cache, 0, np.array([new], dtype=np.int64), np.array([length]))
            length += len(new)
            token = int(choose(logits)[0])
            yield token
            if token == eos_id or i + 1 == max_new_tokens:
                return
            new = [token]

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
