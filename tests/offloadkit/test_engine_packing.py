"""Packing: one aligned byte buffer per block, mixed dtypes viewed back exactly, and the
pinned-memory cap with its pageable fallback."""

from __future__ import annotations

import torch
from models import make_model

from offloadkit.engine import layout_model
from offloadkit.engine.layout import ALIGN, view_in
from offloadkit.engine.packing import HostStore, fill_block_buffer
from offloadkit.ledger import Ledger


def test_mixed_dtypes_pack_on_aligned_offsets_and_view_back_exactly():
    model = make_model(seed=4)
    block = layout_model(model).blocks[0]
    dtypes = {e.dtype for e in block.entries}
    assert {torch.float32, torch.int8, torch.bfloat16} <= dtypes
    assert all(e.offset % ALIGN == 0 for e in block.entries)
    assert block.nbytes % ALIGN == 0
    ends = [e.offset + e.nbytes for e in block.entries]
    assert all(end <= nxt for end, nxt in zip(ends, [e.offset for e in block.entries[1:]]))
    buffer = torch.empty(block.nbytes, dtype=torch.uint8)
    fill_block_buffer(buffer, block)
    for entry in block.entries:
        view = view_in(buffer, entry)
        original = entry.ref.get()
        assert view.dtype == original.dtype and view.shape == original.shape
        assert torch.equal(view, original)
        assert view.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()


def test_pinning_falls_back_to_pageable_memory_and_respects_the_cap():
    model = make_model(seed=4)
    blocks = layout_model(model).blocks
    ledger = Ledger()
    capped = HostStore(ledger, pin=True, pin_limit_bytes=0)  # cap of 0: nothing may be pinned
    capped.add(blocks[0])
    assert not capped.source(0).pinned and ledger.host_pageable_bytes == blocks[0].nbytes
    store = HostStore(ledger, pin=True, pin_limit_bytes=10**9)
    store.add(blocks[1])  # on a machine without CUDA, pinning fails: pageable, no error
    pinned = store.source(1).pinned
    assert pinned == torch.cuda.is_available()
    assert ledger.host_pinned_bytes + ledger.host_pageable_bytes == blocks[0].nbytes + blocks[1].nbytes
    store.close()
    capped.close()
    assert ledger.host_pinned_bytes == ledger.host_pageable_bytes == 0


def test_pin_cap_counts_the_allocators_power_of_two_rounding(monkeypatch):
    """torch's caching host allocator locks a power of two per pinned request: a cap equal
    to the blocks' own sizes would let real locked RAM reach almost twice the cap."""
    from offloadkit.engine import packing

    assert [packing.pinned_footprint(n) for n in (0, 1, 4096, 4097, 700 * 10**6)] == [
        0, 1, 4096, 8192, 2**30]
    pin_requests: list[int] = []
    real_empty = torch.empty

    def empty(*size, pin_memory=False, **kwargs):  # pinning "works" without a GPU
        if pin_memory:
            pin_requests.append(size[0])
        return real_empty(*size, **kwargs)

    monkeypatch.setattr(torch, "empty", empty)
    blocks = layout_model(make_model(seed=4)).blocks
    footprint = packing.pinned_footprint(blocks[0].nbytes)
    assert footprint > blocks[0].nbytes  # the test model's blocks are not powers of two
    ledger = Ledger()
    store = HostStore(ledger, pin=True, pin_limit_bytes=blocks[0].nbytes + blocks[1].nbytes)
    store.add(blocks[0])
    store.add(blocks[1])
    assert pin_requests == [blocks[0].nbytes]  # the second would lock past the cap
    assert store.source(0).pinned and not store.source(1).pinned
    assert store.pinned_bytes == footprint and ledger.host_pinned_bytes == blocks[0].nbytes
    store.close()
    assert store.pinned_bytes == 0 and ledger.host_pinned_bytes == 0
