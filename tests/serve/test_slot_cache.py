"""SlotCache on its own: columns grow and shrink in chunks keeping the live rows' data, moves copy one slot, writes
land at each row's own column, and a decode's rows are one contiguous block."""
from __future__ import annotations

import pytest
import torch

from serve.backends.slot_cache import SlotCache


def filled(cache: SlotCache, rows: int, used: int) -> list[torch.Tensor]:
    """Write distinct random values into rows [0, rows) x columns [0, used); return them per layer (key then value)."""
    out = []
    for k, v in cache.layers:
        for t in (k, v):
            t[:rows, :, :used] = torch.randn(rows, cache.kv_heads, used, cache.head_dim)
            out.append(t[:rows, :, :used].clone())
    return out


def test_fit_grows_and_shrinks_in_chunks_keeping_live_rows():
    cache = SlotCache(2, 6, 3, 5, 40, chunk=8, slot_group=2)
    cache.shrink_after = 2
    assert cache.capacity == 0 and cache.nbytes == 0
    cache.fit(5, 1, 0)
    assert cache.capacity == 8 and cache.allocated_slots == 2
    want = filled(cache, 2, 7)
    cache.fit(9, 3, 7)  # past the chunk and the slot group (a third request joins in slot 2): copies rows 0-1
    assert cache.capacity == 16 and cache.allocated_slots == 4
    assert cache.nbytes == 2 * 2 * 4 * 3 * 16 * 5 * 4
    got = [t[:2, :, :7] for pair in cache.layers for t in pair]
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert all(torch.count_nonzero(t[:, :, 7:]) == 0 for pair in cache.layers for t in pair)
    cache.fit(40, 2, 7)
    assert cache.capacity == 40  # rounded up, but never past max_len
    cache.fit(30, 2, 7)
    assert cache.capacity == 40  # one chunk below: kept (no reallocation at a boundary)
    cache.fit(9, 2, 7)
    assert cache.capacity == 16  # two chunks or more below: shrunk, data kept
    got = [t[:2, :, :7] for pair in cache.layers for t in pair]
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    cache.fit(9, 1, 7)
    assert cache.allocated_slots == 4  # slots are kept while requests run
    cache.fit(0, 0, 0)
    assert cache.capacity == 0 and cache.allocated_slots == 0 and cache.nbytes == 0
    with pytest.raises(ValueError, match="exceed"):
        cache.fit(41, 0, 0)


def test_move_write_and_rows():
    cache = SlotCache(1, 4, 2, 3, 16, chunk=16)
    cache.fit(16, 4, 0)
    want = filled(cache, 4, 10)
    cache.move(3, 1, 10)
    k, v = cache.layers[0]
    assert torch.equal(k[1, :, :10], want[0][3]) and torch.equal(v[1, :, :10], want[1][3])
    assert torch.equal(k[0, :, :10], want[0][0])  # other slots untouched
    # present (n, H, P, D) from a concatenating forward: the new token sits in column P - 1 for every row
    present = [(torch.randn(2, 2, 17, 3), torch.randn(2, 2, 17, 3))]
    cache.write(1, torch.tensor([4, 9]), present, 16)
    assert torch.equal(k[1, :, 4], present[0][0][0, :, 16]) and torch.equal(v[2, :, 9], present[0][1][1, :, 16])
    assert torch.equal(k[1, :, 5:10], want[0][3][:, 5:10])  # nothing else in the row changed
    block = cache.rows(1, 2)
    assert block[0][0].shape == (2, 2, 16, 3) and block[0][0].is_contiguous()
    assert block[0][0].data_ptr() == k[1].data_ptr()  # a view: a runtime reads it in place
    one = [(torch.randn(1, 2, 7, 3), torch.randn(1, 2, 7, 3))]
    cache.write_span(0, 4, one)
    assert torch.equal(k[0, :, 4:7], one[0][0][0, :, 4:7]) and torch.equal(k[0, :, :4], want[0][0][:, :4])


def test_pinned_allocates_once_at_full_size():
    cache = SlotCache(2, 3, 2, 4, 24, pinned=True)
    cache.fit(5, 1, 0)
    assert (cache.allocated_slots, cache.capacity) == (3, 24)
    ptrs = [k.data_ptr() for k, _ in cache.layers]
    cache.fit(0, 0, 0)
    cache.fit(24, 3, 20)
    assert [k.data_ptr() for k, _ in cache.layers] == ptrs  # bound buffers stay valid
    assert cache.layers[0][0].numpy().shape == (3, 2, 24, 4)
