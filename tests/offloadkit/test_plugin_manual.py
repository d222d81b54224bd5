"""The example plugin `offloadkit-manual`: exactly the listed blocks stay resident.

It is imported the way offloadkit imports it, through the registry (the plugin is
pip-installed by `nox -s tests`), never from the source tree.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from models import make_inputs, make_model, snapshot

import offloadkit
from offloadkit import BlockProfile, BudgetError, ModelProfile, Strategy, profile_model

pytestmark = pytest.mark.usefixtures("fresh_registry")


@pytest.fixture
def manual() -> type[Strategy]:
    return offloadkit.get_strategy("manual")


def profile_of(num_blocks: int, block_bytes: int = 100, non_block_bytes: int = 50) -> ModelProfile:
    blocks = tuple(BlockProfile(i, f"blocks.{i}", block_bytes, 4) for i in range(num_blocks))
    return ModelProfile(blocks=blocks, non_block_bytes=non_block_bytes, device="cpu")


def test_plan_keeps_exactly_the_listed_blocks(manual: type[Strategy]) -> None:
    strategy = manual(resident=[7, 0, 3])
    profile = profile_of(10)
    plan = strategy.plan(profile, budget_bytes=10_000)
    assert plan.resident == (0, 3, 7)
    assert plan.streamed == (1, 2, 4, 5, 6, 8, 9)
    plan.validate(profile)
    # non-block 50 + three resident blocks 300 + two slots of one block (prefetch 1) 200
    assert plan.predicted_peak_device_bytes == 550
    assert strategy.min_device_bytes(profile) == 550


def test_all_or_nothing_resident(manual: type[Strategy]) -> None:
    profile = profile_of(4)
    everything = manual(resident=[0, 1, 2, 3]).plan(profile, 10_000)
    assert (everything.streamed, everything.predicted_peak_device_bytes) == ((), 450)
    nothing = manual(resident=[]).plan(profile, 10_000)
    assert nothing.resident == () and nothing.streamed == (0, 1, 2, 3)


def test_resident_file_accepts_a_list_or_an_object(manual: type[Strategy], tmp_path: Path) -> None:
    as_list = tmp_path / "list.json"
    as_list.write_text(json.dumps([5, 1]))
    as_object = tmp_path / "object.json"
    as_object.write_text(json.dumps({"resident": [2]}))
    profile = profile_of(6)
    assert manual(resident_file=str(as_list)).plan(profile, 10_000).resident == (1, 5)
    assert manual(resident_file=as_object).plan(profile, 10_000).resident == (2,)


def test_budget_too_small_for_the_listed_blocks_states_the_need(manual: type[Strategy]) -> None:
    with pytest.raises(BudgetError) as info:
        offloadkit.make_plan(manual(resident=[0, 3, 7]), profile_of(10), 549)
    message = str(info.value)
    assert "budget 549 bytes" in message and "strategy 'manual' needs" in message
    assert ": 550 bytes" in message and "list fewer blocks or raise the budget" in message
    assert offloadkit.make_plan(manual(resident=[0, 3, 7]), profile_of(10), 550).resident == (
        0, 3, 7)


@pytest.mark.parametrize("index", [10, -1])
def test_out_of_range_index_names_the_valid_range(manual: type[Strategy], index: int) -> None:
    with pytest.raises(ValueError, match=rf"\[{index}\] out of range.*10 blocks, numbered 0 to 9"):
        manual(resident=[0, index]).plan(profile_of(10), budget_bytes=10_000)


@pytest.mark.parametrize(
    ("options", "error", "hint"),
    [
        ({}, ValueError, "exactly one of resident="),
        ({"resident": [1], "resident_file": "x.json"}, ValueError, "exactly one of"),
        ({"resident": [1, 1]}, ValueError, "lists a block twice"),
        ({"resident": "0,3"}, TypeError, "list of block indices"),
        ({"resident": [0, True]}, TypeError, "list of block indices"),
        ({"resident_file": "/nonexistent/blocks.json"}, FileNotFoundError, "does not exist"),
        ({"resident": [1], "chunk_size": 2}, TypeError, "unknown option"),
    ],
)
def test_bad_options_fail_before_planning(
    manual: type[Strategy], options: dict, error: type[Exception], hint: str
) -> None:
    with pytest.raises(error, match=hint):
        manual(**options)


def test_malformed_resident_file(manual: type[Strategy], tmp_path: Path) -> None:
    path = tmp_path / "blocks.json"
    path.write_text("[0, 3,")
    with pytest.raises(ValueError, match=r"not valid JSON.*\[0, 3, 7\]"):
        manual(resident_file=path)


def run(model: torch.nn.Module) -> torch.Tensor:
    tokens, mask = make_inputs()
    with torch.inference_mode():
        return model(tokens, mask=mask, scale=0.5)


@pytest.mark.parametrize("home", ["host", "disk"])
def test_end_to_end_bitwise_equal_with_exactly_the_listed_blocks_resident(
    manual: type[Strategy], home: str, tmp_path: Path
) -> None:
    model = make_model()
    reference, before = run(model), snapshot(model)
    need = manual(resident=[0, 3, 7]).min_device_bytes(profile_model(model, device="cpu"))
    options = {"disk_path": str(tmp_path / "w.safetensors")} if home == "disk" else {}
    handle = offloadkit.apply(
        model, "manual", device="cpu", budget=need, home=home, resident=[0, 3, 7], **options
    )
    try:
        assert (handle.plan.resident, handle.plan.streamed) == ((0, 3, 7), (1, 2, 4, 5, 6))
        for _ in range(2):
            assert torch.equal(run(model), reference)
        stats = handle.stats()
        assert (stats.strategy, stats.resident_blocks, stats.streamed_blocks) == ("manual", 3, 5)
        assert 0 < stats.peak_device_bytes <= need == stats.budget_bytes
        assert stats.bytes_transferred > 0  # the five other blocks really streamed
    finally:
        handle.remove()
    after = snapshot(model)
    assert after.keys() == before.keys()
    for name, (value, device, dtype, grad) in before.items():
        assert torch.equal(after[name][0], value) and after[name][1:] == (device, dtype, grad)


def test_end_to_end_from_a_resident_file(tmp_path: Path) -> None:
    path = tmp_path / "blocks.json"
    path.write_text('{"resident": [1, 6]}')
    model = make_model()
    reference = run(model)
    with offloadkit.offloaded(
        model, "manual", device="cpu", budget="1GiB", resident_file=path
    ) as h:
        assert h.plan.resident == (1, 6)
        assert torch.equal(run(model), reference)


def test_end_to_end_errors_come_before_any_weight_moves(manual: type[Strategy]) -> None:
    model = make_model()
    before = snapshot(model)
    need = manual(resident=[0, 3, 7]).min_device_bytes(profile_model(model, device="cpu"))
    with pytest.raises(BudgetError, match=f"needs for this model: {need} bytes"):
        offloadkit.apply(model, "manual", device="cpu", budget=need - 1, resident=[0, 3, 7])
    with pytest.raises(ValueError, match=r"\[8\] out of range.*8 blocks, numbered 0 to 7"):
        offloadkit.apply(model, "manual", device="cpu", budget="1GiB", resident=[0, 8])
    # the model was never touched, so it can still be offloaded normally
    assert all(torch.equal(t, before[n][0]) for n, t in model.state_dict().items())
    offloadkit.apply(model, "manual", device="cpu", budget="1GiB", resident=[2]).remove()
