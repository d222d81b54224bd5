"""Strategy policy, tested on profiles alone: plans are pure (no device touched), so a
model built on ``meta`` (as turbowan-bench plans the real 14B) can be planned."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from models import TinyTransformer

import offloadkit
from offloadkit.engine import profile_model
from offloadkit.errors import BudgetError, OffloadError
from offloadkit.ledger import OffloadStats
from offloadkit.registry import get_strategy
from offloadkit.strategies._common import spread
from offloadkit.strategy import Plan


@pytest.fixture(scope="module")
def profile():
    with torch.device("meta"):
        model = TinyTransformer(dim=64, hidden=128, num_blocks=8)
    return profile_model(model, device="cuda:0", device_total_bytes=10**9,
                         device_free_bytes=9 * 10**8)


def test_meta_model_profiles_sizes_without_data(profile):
    # per block: 2 LayerNorms (2*2*64*4), qkv (64*192*4 + 192*4), int8 proj weight (64*64),
    # fp32 scales (64*4), bf16 bias (64*2), mlp (64*128*4 + 128*4 + 128*64*4 + 64*4), gate (64*4)
    assert profile.num_blocks == 8
    assert [b.name for b in profile.blocks] == [f"blocks.{i}" for i in range(8)]
    assert {b.nbytes for b in profile.blocks} == {profile.max_block_bytes}
    raw = 2 * 2 * 64 * 4 + 64 * 192 * 4 + 192 * 4 + 64 * 64 + 64 * 4 + 64 * 2 + (
        64 * 128 * 4 + 128 * 4 + 128 * 64 * 4 + 64 * 4) + 64 * 4
    assert raw <= profile.max_block_bytes < raw + 256 * profile.blocks[0].num_tensors
    assert set(profile.blocks[0].dtypes) == {"float32", "int8", "bfloat16"}
    # embedding 97x64, position buffer 256x64, final norm, head 64x97 + 97
    assert profile.non_block_bytes == (97 * 64 + 256 * 64 + 2 * 64 + 64 * 97 + 97) * 4
    assert profile.device == "cuda:0" and profile.device_free_bytes == 9 * 10**8


def test_tied_weights_are_kept_out_of_blocks():
    with torch.device("meta"):
        model = TinyTransformer(num_blocks=4)
    model.head.weight = model.embed.weight  # tied, as in many LMs
    model.blocks[2].mlp[0].weight = model.blocks[1].mlp[0].weight  # shared by two blocks
    profile = profile_model(model)
    assert "blocks.1.mlp.0.weight" in profile.shared_tensors
    assert "blocks.2.mlp.0.weight" in profile.shared_tensors
    assert profile.blocks[1].nbytes < profile.blocks[0].nbytes
    assert profile.blocks[1].num_tensors == profile.blocks[0].num_tensors - 1
    # the shared tensor is counted once, with the non-block bytes; the tied head weight too
    assert profile.non_block_bytes == (97 * 64 + 256 * 64 + 2 * 64 + 97) * 4 + 128 * 64 * 4


def test_spread_interleaves_streamed_blocks():
    assert spread(4, 8) == [1, 3, 5, 7]
    assert spread(2, 8) == [2, 6]
    assert spread(8, 8) == list(range(8))
    assert spread(0, 8) == []


def test_layerwise_streams_every_block_with_two_slots(profile):
    strategy = get_strategy("layerwise")()
    need = strategy.min_device_bytes(profile)
    assert need == profile.non_block_bytes + 2 * profile.max_block_bytes
    plan = strategy.plan(profile, need)
    assert plan.resident == () and plan.streamed == tuple(range(8))
    assert (plan.group_size, plan.prefetch_depth, plan.num_slots) == (1, 1, 2)
    assert plan.predicted_peak_device_bytes == need
    no_prefetch = get_strategy("layerwise")(prefetch=False)
    assert no_prefetch.plan(profile, need).num_slots == 1


def test_chunkwise_groups_blocks(profile):
    strategy = get_strategy("chunkwise")(chunk_size=3)
    need = strategy.min_device_bytes(profile)
    assert need == profile.non_block_bytes + 2 * 3 * profile.max_block_bytes
    plan = strategy.plan(profile, need)
    assert plan.groups(profile) == [(0, 1, 2), (3, 4, 5), (6, 7)]
    assert plan.predicted_peak_device_bytes == need
    with pytest.raises(ValueError, match="chunk_size=0 must be an int >= 1"):
        get_strategy("chunkwise")(chunk_size=0)


@pytest.mark.parametrize("name", ["layerwise", "chunkwise"])
def test_prefetch_option_must_be_a_bool(name):
    with pytest.raises(ValueError, match=f"'{name}': option prefetch=1 must be True or False"):
        get_strategy(name)(prefetch=1)
    assert get_strategy(name)(prefetch=False).options["prefetch"] is False


def test_adaptive_fills_budget_and_interleaves(profile):
    strategy = get_strategy("adaptive")()
    block = profile.max_block_bytes
    # room for 2 slots + 4 resident blocks
    plan = strategy.plan(profile, profile.non_block_bytes + 6 * block)
    assert len(plan.resident) == 4 and plan.streamed == (1, 3, 5, 7)
    assert plan.num_slots == 2 and plan.predicted_peak_device_bytes <= profile.non_block_bytes + 6 * block
    # everything fits: nothing streams, no slots
    full = strategy.plan(profile, profile.total_bytes)
    assert full.streamed == () and full.num_slots == 0
    assert full.predicted_peak_device_bytes == profile.total_bytes
    # tightest budget: one slot, no prefetch
    tight = strategy.plan(profile, strategy.min_device_bytes(profile))
    assert tight.resident == () and tight.num_slots == 1 and tight.prefetch_depth == 0
    # more budget never means fewer resident blocks
    counts = [len(strategy.plan(profile, profile.non_block_bytes + k * block).resident)
              for k in range(1, 11)]
    assert counts == sorted(counts) and counts[-1] == 8


def _stats(plan: Plan, **overrides) -> OffloadStats:
    base = dict(strategy="adaptive", device="cuda:0", budget_bytes=0, peak_device_bytes=0,
                current_device_bytes=0, resident_blocks=len(plan.resident),
                streamed_blocks=len(plan.streamed), group_size=1,
                prefetch_depth=plan.prefetch_depth, num_slots=plan.num_slots, home="host",
                bytes_transferred=0, transfers=10, transfer_seconds=0.0, compute_seconds=1.0,
                stall_seconds=0.0, forwards=2, oom_recoveries=0, replans=0,
                host_pinned_bytes=0, host_pageable_bytes=0, disk_bytes=0,
                block_compute_seconds={i: 0.01 for i in range(8)})
    base.update(overrides)
    return OffloadStats(**base)


def test_adaptive_replan_deepens_prefetch_when_transfers_stall(profile):
    strategy = get_strategy("adaptive")()
    budget = profile.non_block_bytes + 7 * profile.max_block_bytes
    plan = strategy.plan(profile, budget)
    assert plan.prefetch_depth == 1
    # transfers take 5x the compute between streamed blocks, and compute waits on them
    gap = profile.num_blocks / len(plan.streamed)
    slow = _stats(plan, budget_bytes=budget, transfer_seconds=10 * 0.05 * gap, stall_seconds=0.5)
    new = strategy.replan(plan, slow, profile)
    assert new is not None and new.prefetch_depth == 3 and new.num_slots == 4
    assert new.predicted_peak_device_bytes <= budget
    assert len(new.resident) < len(plan.resident)  # the extra slots cost resident blocks
    # transfers well hidden and no stall: keep the plan
    fast = _stats(plan, budget_bytes=budget, transfer_seconds=10 * 0.001)
    assert strategy.replan(plan, fast, profile) is None


def test_adaptive_replan_gives_memory_back_when_device_runs_low(profile):
    strategy = get_strategy("adaptive")()
    budget = profile.non_block_bytes + 7 * profile.max_block_bytes
    plan = strategy.plan(profile, budget)
    low = dataclasses.replace(profile, device_free_bytes=0)
    stats = _stats(plan, budget_bytes=budget, current_device_bytes=plan.predicted_peak_device_bytes,
                   transfer_seconds=10 * 0.001)
    new = strategy.replan(plan, stats, low)
    assert new is not None and len(new.resident) < len(plan.resident)
    assert new.predicted_peak_device_bytes < plan.predicted_peak_device_bytes


@pytest.mark.parametrize("name", ["layerwise", "chunkwise", "adaptive"])
def test_budget_below_minimum_states_it_in_bytes_and_gib(profile, name):
    strategy = get_strategy(name)()
    need = strategy.min_device_bytes(profile)
    with pytest.raises(BudgetError) as info:
        offloadkit.make_plan(strategy, profile, need - 1)
    message = str(info.value)
    assert f"{need} bytes" in message and f"{need / 1024**3:.3f} GiB" in message
    assert name in message and strategy.budget_hint in message
    assert offloadkit.make_plan(strategy, profile, need).predicted_peak_device_bytes <= need


def test_cpu_only_needs_no_device_memory(profile):
    strategy = get_strategy("cpu_only")()
    assert strategy.min_device_bytes(profile) == 0
    plan = strategy.plan(profile, 0)
    assert plan.predicted_peak_device_bytes == 0 and plan.num_slots == 0


def test_comfy_native_outside_comfyui_says_it_needs_comfyui():
    from models import make_model

    import offloadkit

    model = make_model()
    with pytest.raises(OffloadError, match="needs ComfyUI"):
        offloadkit.apply(model, "comfy_native", device="cpu", budget=10**9)
    offloadkit.apply(model, "layerwise", device="cpu", budget=10**9).remove()  # left unmarked


@pytest.mark.parametrize("name", ["layerwise", "chunkwise", "adaptive", "cpu_only",
                                  "comfy_native"])
def test_unknown_strategy_option_lists_accepted_ones(name):
    with pytest.raises(TypeError, match="unknown option"):
        get_strategy(name)(no_such_option=1)


def test_plans_cover_every_block_once(profile):
    for name in ("layerwise", "chunkwise", "adaptive"):
        strategy = get_strategy(name)()
        for k in range(2, 12):
            budget = profile.non_block_bytes + k * profile.max_block_bytes * 2
            if budget < strategy.min_device_bytes(profile):
                continue
            plan = strategy.plan(profile, budget)
            plan.validate(profile)
            assert plan.predicted_peak_device_bytes <= budget


def test_cpu_only_refuses_meta_weights_naming_the_tensor():
    from models import make_model

    import offloadkit

    model = make_model(seed=1)
    name, param = next(iter(model.blocks[1].named_parameters()))
    owner_name, _, attr = name.rpartition(".")
    owner = model.blocks[1].get_submodule(owner_name)
    owner._parameters[attr] = torch.nn.Parameter(torch.empty_like(param, device="meta"))
    with pytest.raises(ValueError, match=f"'blocks.1.{name}' is on the meta device; load"):
        offloadkit.apply(model, "cpu_only")
