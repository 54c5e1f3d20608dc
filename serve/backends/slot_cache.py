"""The serving engine's KV cache: one slot (row) per request, preallocated, written in place.

Per layer a (key, value) pair of tensors (slots, kv_heads, capacity, head_dim). The request in slot s holds its
tokens in columns [0, length_s); the columns after it hold zeros or an earlier request's leftovers, always finite,
and always masked. The engine keeps its running requests in slots [0, n), so a decode step reads the contiguous
rows [start, start + n): with every column taken (`capacity`), that range is one contiguous block, which a runtime
reads in place (ONNX Runtime through `torch.from_numpy`/`.numpy()` views, no copy).

Memory. Preallocating every slot at the model's full context costs 2 x layers x slots x kv_heads x max_len x
head_dim x bytes: GPT-2 124M in fp32 with 16 slots x 1024 columns is 2 x 12 x 16 x 12 x 1024 x 64 x 4 B = 1.13 GiB,
more than the int8 model and its runtime together. So both dimensions are allocated lazily: columns in chunks of
`chunk`, slots in groups of `SLOT_GROUP`. `fit(columns, rows, used)` grows the allocation to what the next step
needs (rounded up) and shrinks the columns again when the live requests need `shrink_after` chunks less, copying
only the live rows' used columns each time; an idle engine calls `fit(0, 0, 0)` and holds nothing. At 16 requests
of 128 + 128 tokens the capacity stays at 256 columns at most (288 MiB at 124M fp32); one request alone holds 4
slots' worth (72 MiB at 256 columns), not 16.
Why not cut each step's view to the longest live request instead: a cut view is strided, and every runtime but
eager torch would copy it whole each step; the chunk rounding costs at most `chunk` masked columns of attention.

A backend whose runtime writes the cache itself (ONNX Runtime with a shared past/present buffer, which wants
(slots, kv_heads, max_len, head_dim) buffers) builds it `pinned=True`: the first `fit` allocates every slot at
`max_len` columns and no later one reallocates while requests run, so `layers` and the runtime's buffers can be one
memory (`onnxruntime_backend.SharedSlotCache`: torch views of the decoder's lazily mapped NumPy buffers).
"""
from __future__ import annotations

from typing import Optional

import torch

# Columns per chunk and the slack before shrinking, measured at GPT-2 124M int8, 16 clients: the generic graph's
# decode step is mostly KV-cache traffic (Concat, K Transpose, attention MatMuls over every column), so masked
# columns cost about as much as live ones; 16 columns with no extra slack decoded ~10% faster than 32 with two
# chunks of slack, although it regrows more often (each regrowth copies the live rows once)
DEFAULT_CHUNK = 16
SHRINK_AFTER = 1
SLOT_GROUP = 4  # slots are allocated 4 at a time


class SlotCache:
    """Per-layer (key, value) tensors of shape (slots, kv_heads, capacity, head_dim), capacity growing in chunks up to
    `max_len` columns."""

    def __init__(self, n_layer: int, slots: int, kv_heads: int, head_dim: int, max_len: int, *,
                 dtype: torch.dtype = torch.float32, device: Optional[torch.device] = None,
                 chunk: int = DEFAULT_CHUNK, slot_group: int = SLOT_GROUP, pinned: bool = False):
        if min(n_layer, slots, kv_heads, head_dim, max_len, chunk, slot_group) < 1:
            raise ValueError("a slot cache needs at least one layer, slot, head, column and positive chunks")
        self.n_layer, self.slots, self.kv_heads, self.head_dim = n_layer, slots, kv_heads, head_dim
        self.max_len, self.chunk, self.slot_group, self.pinned = max_len, chunk, slot_group, pinned
        self.shrink_after = SHRINK_AFTER  # chunks of slack before the columns shrink
        self.dtype, self.device = dtype, torch.device(device or "cpu")
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._resize(0, 0, 0, 0)

    @property
    def capacity(self) -> int:
        """Columns allocated per slot now."""
        return self.layers[0][0].shape[2]

    @property
    def allocated_slots(self) -> int:
        """Slots allocated now (the rows a step may touch: [0, allocated_slots))."""
        return self.layers[0][0].shape[0]

    @property
    def nbytes(self) -> int:
        return sum(k.nelement() * k.element_size() * 2 for k, _ in self.layers)

    def fit(self, columns: int, rows: int, used: int) -> None:
        """Make room for `columns` columns in slots [0, rows), which hold data in their first `used` columns.

        Columns grow to `columns` rounded up to a chunk and shrink when that is two chunks or more below the
        capacity (so a length that hovers at a chunk boundary does not reallocate every step); slots grow in groups
        and are released when `rows` is 0. Either way only [0, rows) x [0, used) is copied."""
        if columns > self.max_len or rows > self.slots:
            raise ValueError(f"{rows} slots x {columns} columns exceed the cache's {self.slots} x {self.max_len}")
        if self.pinned:  # all of it, once
            if self.capacity == 0:
                self._resize(self.slots, self.max_len, 0, 0)
            return
        want = min(self.max_len, -(-columns // self.chunk) * self.chunk)
        cols = want if want > self.capacity or want <= self.capacity - self.shrink_after * self.chunk else self.capacity
        slots = self.allocated_slots
        if rows > slots or rows == 0:  # slots grow as requests join; given back only when none is live
            slots = min(self.slots, -(-rows // self.slot_group) * self.slot_group)
        if (slots, cols) != (self.allocated_slots, self.capacity):
            self._resize(slots, cols, rows, min(used, cols))

    def _resize(self, slots: int, capacity: int, rows: int, used: int) -> None:
        shape = (slots, self.kv_heads, capacity, self.head_dim)
        new = []
        for i in range(self.n_layer):
            pair = []
            for j in range(2):
                t = torch.zeros(shape, dtype=self.dtype, device=self.device)  # finite everywhere: masked, not NaN
                if self.layers:
                    old = self.layers[i][j]
                    r, u = min(rows, old.shape[0]), min(used, old.shape[2])
                    t[:r, :, :u] = old[:r, :, :u]
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
