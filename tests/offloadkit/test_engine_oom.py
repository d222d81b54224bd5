"""OOM recovery on the CPU path: an allocation failure injected inside a block (as a CUDA
OOM would surface) makes the engine stream more blocks, rerun the block and carry on."""

from __future__ import annotations

import pytest
import torch
from models import make_inputs, make_model

import offloadkit
from offloadkit.engine import profile_model
from offloadkit.errors import OffloadError


def pressure_hook(handle_box: list, limit: int):
    """Raise torch's OOM error while the engine holds more than ``limit`` device bytes:
    a device with ``limit`` bytes for weights, the rest needed by activations."""

    def hook(module, args):
        if handle_box[0].stats().current_device_bytes > limit:
            raise torch.OutOfMemoryError("CUDA out of memory (injected by the test)")

    return hook


def test_oom_inside_a_block_shrinks_resident_set_and_output_stays_exact():
    model = make_model(seed=5)
    tokens, mask = make_inputs()
    with torch.no_grad():
        expected = model(tokens, mask=mask)
    profile = profile_model(model)
    handle = offloadkit.apply(model, "adaptive", device="cpu", budget=profile.total_bytes + 1,
                              replan_every=0)
    box = [handle]
    limit = profile.non_block_bytes + 5 * profile.max_block_bytes
    hook = model.blocks[5].mlp.register_forward_pre_hook(pressure_hook(box, limit))
    try:
        assert handle.stats().resident_blocks == 8
        with torch.no_grad():
            out = model(tokens, mask=mask)
            again = model(tokens, mask=mask)
        stats = handle.stats()
    finally:
        hook.remove()
        handle.remove()
    assert torch.equal(out, expected) and torch.equal(again, expected)
    assert stats.oom_recoveries >= 1
    assert stats.resident_blocks < 8 and stats.streamed_blocks > 0
    assert stats.current_device_bytes <= limit
    assert stats.peak_device_bytes <= profile.total_bytes + 1


def test_oom_with_nothing_left_to_evict_is_a_clear_error():
    model = make_model(seed=6)
    tokens, mask = make_inputs()
    profile = profile_model(model)
    handle = offloadkit.apply(model, "layerwise", device="cpu", budget=profile.total_bytes)

    def always(module, args):
        raise torch.OutOfMemoryError("CUDA out of memory (injected by the test)")

    hook = model.blocks[1].mlp.register_forward_pre_hook(always)
    try:
        with pytest.raises(OffloadError, match="no resident blocks left to evict") as info:
            with torch.no_grad():
                model(tokens, mask=mask)
        assert isinstance(info.value.__cause__, torch.OutOfMemoryError)
        assert handle.stats().oom_recoveries == 0
    finally:
        hook.remove()
        handle.remove()


@pytest.mark.parametrize("prefetch", [True, False])
def test_other_errors_inside_a_block_pass_through_untouched(prefetch):
    model = make_model(seed=7)
    tokens, mask = make_inputs()
    with torch.no_grad():
        expected = model(tokens, mask=mask)
    def fail(module, args):
        raise ValueError("user bug in block 3")

    with offloadkit.offloaded(model, "layerwise", device="cpu", budget=10**9,
                              prefetch=prefetch) as handle:
        with pytest.raises(RuntimeError, match="must match the size"):
            with torch.no_grad():
                model(tokens, mask=torch.ones(3, 5, dtype=torch.bool))
        hook = model.blocks[3].mlp.register_forward_pre_hook(fail)
        with pytest.raises(ValueError, match="user bug in block 3"):
            with torch.no_grad():
                model(tokens, mask=mask)
        hook.remove()
        assert handle.stats().oom_recoveries == 0
        with torch.no_grad():  # the model still works afterwards, exactly
            assert torch.equal(model(tokens, mask=mask), expected)
            assert torch.equal(model(tokens, mask=mask), expected)
