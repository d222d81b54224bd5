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
