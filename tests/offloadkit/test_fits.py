"""``offloadkit.Budget`` (parsed once) and ``offloadkit.check_fits`` (the one budget rule).

Pipelines and benchmarks ask check_fits before loading anything; the answer must be the one
``apply`` would give, for a model on ``meta`` or a bare profile of a card this machine lacks.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from models import TinyTransformer, make_inputs, make_model

import offloadkit
import offloadkit.budget as budget_module
from offloadkit import Budget, BudgetError, DeviceMemory, check_fits

GiB = 1024**3


def meta_model() -> torch.nn.Module:
    with torch.device("meta"):
        return TinyTransformer(dim=64, hidden=128, num_blocks=8)


def test_budget_parses_once_into_bytes_or_auto_with_its_ceiling(monkeypatch) -> None:
    assert Budget.parse("12GiB", "cuda:3").bytes == 12 * GiB  # a size never probes
    assert Budget.parse(1000).describe() == "1000 bytes (0.000 GiB)"
    assert Budget.parse("1.5 GB").describe() == "'1.5 GB' = 1500000000 bytes (1.397 GiB)"
    assert Budget.parse("50%", total_bytes=8 * GiB).bytes == 4 * GiB  # a card, not probed
    probed = []

    def fake_probe(device):
        probed.append(device)
        return DeviceMemory("cuda:0", "test GPU", 80 * GiB, 30 * GiB, "nvml")

    monkeypatch.setattr(budget_module, "probe", fake_probe)
    auto = Budget.parse("auto", "cuda:0")
    assert (auto.auto, auto.bytes, auto.reserve_bytes, auto.total_bytes) == (
        True, 72 * GiB, 8 * GiB, 80 * GiB)  # ceiling: total less 10 %
    assert auto.resolve() == 22 * GiB  # free now less the reserve, read when asked
    assert "at most 77309411328 bytes (72.000 GiB)" in auto.describe()
    assert Budget.parse(auto) is auto
    assert offloadkit.parse_budget(auto) == 22 * GiB
    with pytest.raises(BudgetError, match="ambiguous"):
        Budget.parse("12G")


@pytest.mark.parametrize("name", ["adaptive", "layerwise", "chunkwise", "comfy_native"])
def test_check_fits_answers_as_apply_would(name: str) -> None:
    model = make_model()
    need = offloadkit.get_strategy(name)().min_device_bytes(offloadkit.profile_model(model))
    short = check_fits(model, name, need - 1, "cpu", name="the test model")
    assert not short.fits and short.plan is None
    assert (short.minimum_bytes, short.budget_bytes, short.strategy) == (need, need - 1, name)
    message = short.message
    assert f"{need} bytes ({need / GiB:.3f} GiB)" in message and f"{need - 1} bytes" in message
    assert "the test model" in message and repr(name) in message
    assert offloadkit.get_strategy(name).budget_hint in message
    with pytest.raises(BudgetError) as info:
        short.raise_if_short()
    assert str(info.value) == message
    if name != "comfy_native":  # needs ComfyUI to apply; the rule is the same
        with pytest.raises(BudgetError) as applied:
            offloadkit.apply(model, name, device="cpu", budget=need - 1)
        assert f"{need} bytes" in str(applied.value)
    fits = check_fits(model, name, need, "cpu").raise_if_short()
    assert fits.fits and fits.plan is not None
    assert fits.plan.predicted_peak_device_bytes <= need
    assert "fits" in fits.message and f"{need} bytes" in fits.message


def test_check_fits_on_meta_and_the_same_plan_as_apply() -> None:
    model = make_model(seed=2)
    budget = offloadkit.profile_model(model).total_bytes // 2
    report = check_fits(meta_model(), "adaptive", budget, "cpu")
    with offloadkit.offloaded(model, "adaptive", device="cpu", budget=budget,
                              replan_every=0) as handle:
        assert handle.plan == report.plan
        tokens, mask = make_inputs()
        with torch.no_grad():
            model(tokens, mask=mask)
        assert handle.stats().peak_device_bytes <= budget


def test_check_fits_plans_for_a_card_this_machine_lacks() -> None:
    """The bench's case: a profile on cuda:0 with the card's size given, no GPU probed."""
    card = 24 * GiB
    profile = dataclasses.replace(offloadkit.profile_model(meta_model(), device="cuda:0"),
                                  device_total_bytes=card, device_free_bytes=card)
    auto = check_fits(profile, "adaptive", "auto")
    assert auto.fits and auto.budget_bytes == card - card // 10  # "auto": its ceiling
    assert auto.plan is not None and auto.plan.streamed == ()
    tiny = check_fits(profile, "layerwise", 1000, name="the DiT")
    assert not tiny.fits and "the DiT" in tiny.message
    assert tiny.minimum_bytes == profile.non_block_bytes + 2 * profile.max_block_bytes


def test_check_fits_for_cpu_only_needs_nothing_and_ignores_the_budget() -> None:
    report = check_fits(meta_model(), "cpu_only", "not even a budget", "cuda")
    assert report.fits and report.minimum_bytes == 0 and report.plan.num_slots == 0
    assert "places nothing on the device" in report.message


def test_check_fits_refuses_what_apply_refuses() -> None:
    with pytest.raises(TypeError, match="unknown option.*engine options"):
        check_fits(meta_model(), "layerwise", "1GiB", "cpu", chunk_size=2)
    with pytest.raises(offloadkit.UnknownStrategyError):
        check_fits(meta_model(), "no_such", "1GiB", "cpu")
    with pytest.raises(BudgetError, match="not a budget"):
        check_fits(meta_model(), "layerwise", "lots", "cpu")
    with pytest.raises(TypeError, match="Module or an offloadkit.ModelProfile"):
        check_fits("model.pth", "layerwise", "1GiB", "cpu")
    # engine options are accepted (the same **options as apply), and ignored
    assert check_fits(meta_model(), "layerwise", "1GiB", "cpu", replan_every=0).fits


def test_a_budget_object_goes_through_stage_and_place() -> None:
    model = make_model(seed=6)
    need = offloadkit.get_strategy("layerwise")().min_device_bytes(offloadkit.profile_model(model))
    fixed = Budget.parse(need)
    with offloadkit.offloaded(model, "layerwise", device="cpu", budget=fixed) as handle:
        assert handle.stats().budget_bytes == need
    staged = offloadkit.stage(model, "adaptive", device="cpu", budget=Budget.parse("auto"))
    assert staged.budget.auto and staged.budget_bytes == staged.budget.bytes  # the ceiling
    staged.discard()
