"""The CUDA path (side stream, events, pinned buffers). Runs only where CUDA exists: CI has
no GPU, so these are the checks a GPU session runs (``pytest tests/offloadkit/test_engine_cuda.py``).
The CPU tests cover the same bookkeeping through the CPU transport."""

from __future__ import annotations

import os

import pytest
import torch
from models import make_inputs, make_model

import offloadkit
from offloadkit.engine import profile_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CASES = [("layerwise", {}), ("chunkwise", {"chunk_size": 3}), ("adaptive", {}),
         ("adaptive", {"prefetch_depth": 2})]


@pytest.fixture(scope="module")
def cuda_reference():
    model = make_model(seed=11, dim=256, hidden=1024, heads=4)
    tokens, mask = make_inputs(batch=2, length=64)
    tokens, mask = tokens.cuda(), mask.cuda()
    resident = make_model(seed=11, dim=256, hidden=1024, heads=4).cuda()
    with torch.no_grad():
        expected = resident(tokens, mask=mask).cpu()
    del resident
    return model, tokens, mask, expected


@pytest.mark.parametrize("home", ["host", "disk", "shared"])
@pytest.mark.parametrize(("name", "options"), CASES)
def test_cuda_streaming_is_exact_within_budget_and_never_syncs(cuda_reference, name, options,
                                                               home):
    model, tokens, mask, expected = cuda_reference
    profile = profile_model(model)
    budget = max(offloadkit.get_strategy(name)(**options).min_device_bytes(profile),
                 profile.total_bytes // 2)
    torch.cuda.synchronize()
    base_allocated = torch.cuda.memory_allocated()
    shared = {"shared_key": f"cuda-test-{os.getpid()}"} if home == "shared" else {}
    handle = offloadkit.apply(model, name, device="cuda", budget=budget, home=home,
                              replan_every=0, **shared, **options)
    try:
        placed = torch.cuda.memory_allocated() - base_allocated
        stats = handle.stats()
        # the ledger's device bytes are what the engine really allocated
        assert stats.current_device_bytes <= placed <= stats.current_device_bytes + 2 * 2**20
        with torch.no_grad():
            model(tokens, mask=mask)  # warm-up: the first forward may initialise kernels
            torch.cuda.synchronize()
            if home in ("host", "shared"):
                # hot path: no host-device synchronisation at all (pinned or registered
                # copies, events)
                torch.cuda.set_sync_debug_mode("error")
            try:
                outs = [model(tokens, mask=mask) for _ in range(3)]
            finally:
                torch.cuda.set_sync_debug_mode(0)
        for out in outs:
            assert torch.equal(out.cpu(), expected)
        torch.cuda.synchronize()
        stats = handle.stats()
        assert 0 < stats.peak_device_bytes <= budget
        if stats.streamed_blocks:
            assert stats.transfers > 0 and stats.transfer_seconds > 0
            if home == "host":
                assert stats.host_pinned_bytes > 0
            if home == "shared":  # the mapping is page-locked with cudaHostRegister
                store = handle._placement.store
                assert store.registered and store.sources[0].buffer.is_pinned()
                assert stats.host_shared_bytes == profile.block_bytes
    finally:
        handle.remove()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() <= base_allocated


def test_cuda_oom_recovery_on_a_real_allocation_failure(cuda_reference):
    """A block that allocates more than is free triggers a real CUDA OOM; the engine evicts
    resident blocks and the retried block succeeds once enough was given back."""
    model, tokens, mask, expected = cuda_reference
    profile = profile_model(model)
    handle = offloadkit.apply(model, "adaptive", device="cuda", budget=profile.total_bytes + 1,
                              replan_every=0)
    block_bytes = profile.max_block_bytes
    free, _ = torch.cuda.mem_get_info()
    hog = torch.empty(max(0, free - 64 * block_bytes), dtype=torch.uint8, device="cuda")
    need: list[int] = []

    def allocate(module, args):
        if not need:  # first call, all blocks resident: ask for one block more than is free
            spare = torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
            need.append(torch.cuda.mem_get_info()[0] + spare + block_bytes)
        torch.empty(need[0], dtype=torch.uint8, device="cuda")

    hook = model.blocks[6].mlp.register_forward_pre_hook(allocate)
    try:
        with torch.no_grad():
            out = model(tokens, mask=mask)
        stats = handle.stats()
    finally:
        hook.remove()
        handle.remove()
        del hog
    assert torch.equal(out.cpu(), expected)
    assert stats.oom_recoveries >= 1 and stats.resident_blocks < len(model.blocks)
