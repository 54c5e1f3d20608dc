"""The serving engine's KV cache: one slot (row) per request, preallocated, written in place.

Per layer a (key, value) pair of tensors (slots, kv_heads, capacity, head_dim). The request in slot s holds its
tokens in columns [0, length_s); the columns after it hold zeros or an earlier request's leftovers, always finite,
and always masked. The engine keeps its running requests in slots [0, n), so a decode step reads the contiguous
rows [start, start + n): with every column taken (`capacity`), that range is one contiguous block, which a runtime
reads in place (ONNX Runtime through `torch.from_numpy`/`.numpy()` views, no copy).

Memory. Preallocating every slot at the model's full context costs 2 x layers x slots x kv_heads x max_len x
head_dim x bytes: GPT-2 124M in fp32 with 16 slots x 1024 columns is 2 x 12 x 16 x 12 x 1024 x 64 x 4 B = 1.13 GiB,
more than the int8 model and its runtime together. So columns are allocated lazily, in chunks of `chunk` columns:
`fit(columns, rows)` grows the capacity to what the next step needs (rounded up to a chunk) and shrinks it again
when the live requests need two chunks less, copying only the live rows' used columns each time. At 16 requests of
128 + 128 tokens the capacity stays at 256-320 columns (about 300 MiB at 124M fp32), and an idle engine holds none.
Why not cut each step's view to the longest live request instead: a cut view is strided, and every runtime but
eager torch would copy it whole each step; the chunk rounding costs at most `chunk` masked columns of attention.

A backend whose runtime writes the cache itself (ONNX Runtime with a shared past/present buffer) can subclass this
or allocate its own buffers with `chunk = max_len` (no regrowth, stable addresses) and share them with NumPy.
"""
from __future__ import annotations

from typing import Optional

import torch

DEFAULT_CHUNK = 64


class SlotCache:
    """Per-layer (key, value) tensors of shape (slots, kv_heads, capacity, head_dim), capacity growing in chunks up to
    `max_len` columns."""

    def __init__(self, n_layer: int, slots: int, kv_heads: int, head_dim: int, max_len: int, *,
                 dtype: torch.dtype = torch.float32, device: Optional[torch.device] = None,
                 chunk: int = DEFAULT_CHUNK):
        if min(n_layer, slots, kv_heads, head_dim, max_len, chunk) < 1:
            raise ValueError("a slot cache needs at least one layer, slot, head, column and a positive chunk")
        self.n_layer, self.slots, self.kv_heads, self.head_dim = n_layer, slots, kv_heads, head_dim
        self.max_len, self.chunk = max_len, chunk
        self.dtype, self.device = dtype, torch.device(device or "cpu")
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._resize(0, 0, 0)

    @property
    def capacity(self) -> int:
        """Columns allocated per slot now."""
        return self.layers[0][0].shape[2]

    @property
    def nbytes(self) -> int:
        return sum(k.nelement() * k.element_size() * 2 for k, _ in self.layers)

    def fit(self, columns: int, rows: int, used: int) -> None:
        """Make room for `columns` columns in slots [0, rows), which hold data in their first `used` columns.

        Grows to `columns` rounded up to a chunk; shrinks when that is two chunks or more below the capacity (so a
        length that hovers at a chunk boundary does not reallocate every step). Either way only [0, rows) x [0, used)
        is copied."""
        if columns > self.max_len:
            raise ValueError(f"{columns} columns exceed the cache's {self.max_len}")
        target = min(self.max_len, -(-columns // self.chunk) * self.chunk)
        if target > self.capacity or target <= self.capacity - 2 * self.chunk:
            self._resize(target, rows, min(used, target))

    def _resize(self, capacity: int, rows: int, used: int) -> None:
        shape = (self.slots, self.kv_heads, capacity, self.head_dim)
        new = []
        for i in range(self.n_layer):
            pair = []
            for j in range(2):
                t = torch.zeros(shape, dtype=self.dtype, device=self.device)  # finite everywhere: masked, not NaN
                if rows and used:
                    t[:rows, :, :used] = self.layers[i][j][:rows, :, :used]
                pair.append(t)
            new.append((pair[0], pair[1]))
            if self.layers:
                self.layers[i] = (pair[0], pair[1])  # free the old layer before allocating the next
        self.layers = new

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy slot `src`'s first `length` columns into slot `dst` (a request changing slots)."""
        if src == dst or length == 0:
            return
        for k, v in self.layers:
            k[dst, :, :length] = k[src, :, :length]
            v[dst, :, :length] = v[src, :, :length]

    def rows(self, start: int, n: int, columns: Optional[int] = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Views of slots [start, start + n) and columns [0, columns) (default: all, a contiguous block)."""
        c = self.capacity if columns is None else columns
        return [(k[start:start + n, :, :c], v[start:start + n, :, :c]) for k, v in self.layers]

    def write(self, start: int, columns: torch.Tensor, present: list[tuple[torch.Tensor, torch.Tensor]],
              src_column: int) -> None:
        """Write, for each row b of `present` (n, kv_heads, P, head_dim), column `src_column` into slot start + b at
        column `columns[b]` (one new token per row, each at its own length)."""
        n = columns.shape[0]
        rows = torch.arange(start, start + n, device=self.device)
        cols = columns.to(self.device)
        for (k, v), (pk, pv) in zip(self.layers, present):
            k[rows, :, cols] = pk[:, :, src_column].to(self.dtype)  # (n, kv_heads, head_dim) each side
            v[rows, :, cols] = pv[:, :, src_column].to(self.dtype)

    def write_span(self, slot: int, begin: int, present: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Copy columns [begin, P) of a one-row `present` (1, kv_heads, P, head_dim) into `slot`'s same columns."""
        for (k, v), (pk, pv) in zip(self.layers, present):
            end = pk.shape[2]
            k[slot, :, begin:end] = pk[0, :, begin:end]
            v[slot, :, begin:end] = pv[0, :, begin:end]
