"""offloadkit.apply / offloaded: the public entry points and their errors. Each bad input
fails before any weight moves, with a message that names the problem and the fix."""

from __future__ import annotations

import pytest
import torch
from models import TinyTransformer, make_inputs, make_model, snapshot

import offloadkit
from offloadkit.engine import profile_model
from offloadkit.errors import (
    AlreadyOffloadedError,
    BlockDiscoveryError,
    BudgetError,
    DeviceUnavailableError,
    OffloadError,
    UnknownStrategyError,
)


def assert_untouched(model, before) -> None:
    after = snapshot(model)
    assert all(torch.equal(before[k][0], after[k][0]) for k in before)
    for module in model.modules():
        assert "forward" not in module.__dict__


def test_default_apply_runs_adaptive_on_cpu_here():
    model = make_model()
    tokens, mask = make_inputs()
    with torch.no_grad():
        expected = model(tokens, mask=mask)
    handle = offloadkit.apply(model, budget=profile_model(model).total_bytes // 2)
    try:
        with torch.no_grad():
            assert torch.equal(model(tokens, mask=mask), expected)
        stats = handle.stats()
        assert (stats.strategy, stats.device) == ("adaptive", "cpu")
        assert stats.streamed_blocks > 0
    finally:
        handle.remove()


def test_budget_strings_are_parsed(monkeypatch):
    model = make_model()
    handle = offloadkit.apply(model, "layerwise", device="cpu", budget="2MiB")
    assert handle.stats().budget_bytes == 2 * 1024**2
    handle.remove()
    with pytest.raises(BudgetError, match="ambiguous"):
        offloadkit.apply(model, "layerwise", device="cpu", budget="12G")


def test_budget_below_minimum_names_minimum_and_leaves_model_alone():
    model = make_model()
    before = snapshot(model)
    need = offloadkit.get_strategy("layerwise")().min_device_bytes(profile_model(model))
    with pytest.raises(BudgetError) as info:
        offloadkit.apply(model, "layerwise", device="cpu", budget=need - 1)
    assert f"{need} bytes ({need / 1024**3:.3f} GiB)" in str(info.value)
    assert "Raise the budget" in str(info.value)
    assert_untouched(model, before)
    offloadkit.apply(model, "layerwise", device="cpu", budget=need).remove()  # not marked


def test_unknown_strategy_lists_known_ones():
    with pytest.raises(UnknownStrategyError, match="adaptive, chunkwise"):
        offloadkit.apply(make_model(), "layerwize", device="cpu", budget=10**9)


def test_model_without_block_list_asks_for_blocks():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    with pytest.raises(BlockDiscoveryError, match=r"blocks=model\.layers"):
        offloadkit.apply(model, "layerwise", device="cpu", budget=10**6)
    # given explicitly, the same model works: its children are the blocks
    x = torch.randn(3, 4)
    expected = model(x)
    with offloadkit.offloaded(model, "layerwise", device="cpu", budget=10**6,
                              blocks=[model[0], model[2]]) as handle, torch.no_grad():
        assert torch.equal(model(x), expected)
        assert handle.stats().streamed_blocks == 2
    with pytest.raises(BlockDiscoveryError, match="names no submodule"):
        offloadkit.apply(model, "layerwise", device="cpu", budget=10**6, blocks="layers")
    with pytest.raises(BlockDiscoveryError, match="not a submodule"):
        offloadkit.apply(model, "layerwise", device="cpu", budget=10**6,
                         blocks=[torch.nn.Linear(2, 2)])


def test_applying_twice_is_refused_until_removed():
    model = make_model()
    handle = offloadkit.apply(model, "layerwise", device="cpu", budget=10**9)
    with pytest.raises(AlreadyOffloadedError, match="already under offload"):
        offloadkit.apply(model, "adaptive", device="cpu", budget=10**9)
    with pytest.raises(AlreadyOffloadedError, match="remove"):
        offloadkit.apply(model.blocks[0], "layerwise", device="cpu", budget=10**9,
                         blocks=[model.blocks[0].qkv, model.blocks[0].proj])
    wrapper = torch.nn.Sequential(model)
    with pytest.raises(AlreadyOffloadedError):
        offloadkit.apply(wrapper, "layerwise", device="cpu", budget=10**9)
    handle.remove()
    handle.remove()  # idempotent
    offloadkit.apply(model, "adaptive", device="cpu", budget=10**9).remove()


def test_cuda_without_cuda_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model = make_model()
    before = snapshot(model)
    with pytest.raises(DeviceUnavailableError, match="CUDA is not available.*device='cpu'"):
        offloadkit.apply(model, "adaptive", device="cuda", budget=10**9)
    with pytest.raises(DeviceUnavailableError, match="not a device name"):
        offloadkit.apply(model, "adaptive", device="gpu0", budget=10**9)
    assert_untouched(model, before)
    # cpu_only does not need the device at all
    offloadkit.apply(model, "cpu_only", device="cuda").remove()


def test_unknown_option_lists_strategy_and_engine_options():
    with pytest.raises(TypeError, match="accepts: chunk_size, prefetch.*engine options"):
        offloadkit.apply(make_model(), "chunkwise", device="cpu", budget=10**9, chunks=2)
    with pytest.raises(ValueError, match="home tier"):
        offloadkit.apply(make_model(), "layerwise", device="cpu", budget=10**9, home="ssd")


def test_meta_model_can_be_planned_but_not_applied():
    with torch.device("meta"):
        model = TinyTransformer()
    assert profile_model(model).num_blocks == 8
    with pytest.raises(OffloadError, match="meta device.*load_state_dict"):
        offloadkit.apply(model, "layerwise", device="cpu", budget=10**9)
    offloadkit.apply(make_model(), "layerwise", device="cpu", budget=10**9).remove()


def test_offloaded_removes_on_error_and_accepts_a_strategy_instance():
    model = make_model()
    before = snapshot(model)
    strategy = offloadkit.get_strategy("chunkwise")(chunk_size=2)
    with pytest.raises(KeyError):
        with offloadkit.offloaded(model, strategy, device="cpu", budget=10**9) as handle:
            assert handle.plan.group_size == 2
            raise KeyError("user code failed")
    assert handle.removed
    assert_untouched(model, before)
    with pytest.raises(RuntimeError, match="removed"):
        handle.replan()
