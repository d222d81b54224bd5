"""The pre-flight budget check profiles each meta model once, and says the same as offloadkit."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

import offloadkit
import offloadkit.engine.profile as engine_profile
from turbowan.pipeline import demo
from turbowan.pipeline.budget_fit import (
    MODEL_LABELS,
    check_budget_fits,
    demo_placed_models,
    placed_dit,
)
from turbowan.pipeline.problems import PreflightError

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def demo_models():
    return demo_placed_models(dtype=torch.float32, attention="sla", sla_topk=0.5, home="host")


@pytest.fixture
def profiled(monkeypatch) -> Counter:
    """id(model) -> how many times offloadkit walked it to profile it (every profile of a
    model, from check_fits or profile_model, lays the model out once)."""
    counts: Counter = Counter()
    layout_model = engine_profile.layout_model

    def counting(model, blocks=None):
        counts[id(model)] += 1
        return layout_model(model, blocks)

    monkeypatch.setattr(engine_profile, "layout_model", counting)
    return counts


def _need(placed, strategy):
    return offloadkit.check_fits(placed.model, strategy, 0, CPU, blocks=placed.blocks,
                                 home=placed.home).minimum_bytes


def _short_message(models, budget, strategy="adaptive"):
    """The message check_budget_fits gives, built here from offloadkit's own answers."""
    describe = offloadkit.describe_bytes
    short: dict[int, list[str]] = {}
    for role, placed in models.items():
        need = _need(placed, strategy)
        if need > budget:
            short.setdefault(need, []).append(MODEL_LABELS[role])
    most = max(short)
    layerwise = max(_need(placed, "layerwise") for placed in models.values())
    what = "; ".join(f"the {' and the '.join(labels)} {'needs' if len(labels) == 1 else 'each need'} "
                     f"{describe(need)}" for need, labels in short.items())
    alternative = (f"--offload layerwise (needs {describe(layerwise)})" if layerwise < most
                   else "--offload cpu_only (no device memory, slow)")
    return (f"--budget {budget!r} is {describe(budget)}, below the minimum of strategy "
            f"{strategy!r}: {what}. Pass --budget {-(-most // 2**20)}MiB or more, or use "
            f"{alternative}")


def _check(models, budget, strategy="adaptive"):
    check_budget_fits(models, strategy=strategy, budget=budget, device=CPU)


def test_a_short_budget_profiles_each_demo_model_once(demo_models, profiled):
    """The short path asks adaptive and then layerwise of every model, and the demo's two
    experts are one model: three models, three profiles (it was eight)."""
    expected = _short_message(demo_models, 1000)
    profiled.clear()
    with pytest.raises(PreflightError) as info:
        _check(demo_models, 1000)
    assert str(info.value).count(expected) == 1
    assert demo_models["high"].model is demo_models["low"].model
    assert profiled == {id(p.model): 1 for p in demo_models.values()}
    assert len(profiled) == 3


def test_a_budget_that_holds_every_model_profiles_each_once(demo_models, profiled):
    budget = max(_need(placed, "adaptive") for placed in demo_models.values())
    profiled.clear()
    _check(demo_models, budget)  # no problem: it fits exactly
    assert profiled == {id(p.model): 1 for p in demo_models.values()}
    with pytest.raises(PreflightError, match=r"high-noise expert and the low-noise expert"):
        _check(demo_models, budget - 1)


def test_two_expert_models_are_each_profiled_once(demo_models, profiled):
    """From files, the experts are two meta models (a LoRA may be attached to one only):
    each is profiled, once, however many strategies are asked about it."""
    def expert():
        return placed_dit(demo.demo_dit_config(), quant=demo.DEMO_DIT_QUANT, attention="sla",
                          sla_topk=0.5, dtype=torch.float32)

    models = {"vae": demo_models["vae"], "high": expert(), "low": expert()}
    assert models["high"].model is not models["low"].model
    expected = _short_message(models, 4096)
    profiled.clear()
    with pytest.raises(PreflightError) as info:
        _check(models, 4096)
    assert str(info.value).count(expected) == 1
    assert profiled == {id(p.model): 1 for p in models.values()}


def test_cpu_only_needs_no_device_and_no_budget(demo_models, profiled):
    _check(demo_models, 0, strategy="cpu_only")
    assert sorted(profiled.values()) == [1, 1, 1]
