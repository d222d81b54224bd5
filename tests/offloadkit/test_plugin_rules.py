"""The plugin API refuses what breaks its rules, naming the plugin and the rule.

Each rogue strategy here is a real installed distribution (the ``make_plugin`` fixture),
loaded through the ``offloadkit`` entry-point group like any pip-installed plugin. A broken
``plan()`` must fail at ``apply()``, before a weight moves, with a :class:`PluginError`; a
broken ``replan()`` must never escape from the user's forward.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable

import pytest
import torch
from models import make_inputs, make_model, snapshot

import offloadkit
from offloadkit import PluginError, registry
from offloadkit.cli import main as offloadkit_cli
from offloadkit.registry import PluginLoadWarning

pytestmark = pytest.mark.usefixtures("fresh_registry")

MakePlugin = Callable[..., str]


def rogue(plan_body: str, *, extra: str = "", name: str = "rogue") -> str:
    """Source of a plugin offering one strategy whose ``plan()`` runs ``plan_body``."""
    return f"""
import dataclasses

from offloadkit import Plan, Strategy, hookimpl


class Rogue(Strategy):
    name = {name!r}
    description = "breaks a rule of the strategy API"
{extra}
    def plan(self, profile, budget_bytes):
        {plan_body}


@hookimpl
def offloadkit_register_strategies():
    return [Rogue]
"""


def run(model: torch.nn.Module) -> torch.Tensor:
    tokens, mask = make_inputs()
    with torch.inference_mode():
        return model(tokens, mask=mask, scale=0.5)


WHO = "strategy 'rogue' (plugin 'offloadkit-rogue' from distribution 'offloadkit-rogue')"


@pytest.mark.parametrize(("plan_body", "rule"), [
    ("return None", "plan() returned NoneType None; it must return an offloadkit.Plan"),
    ("return {'resident': (), 'streamed': (0, 1)}",
     "plan() returned dict {'resident': (), 'streamed': (0, 1)}; it must return an offloadkit.Plan"),
    ("return dataclasses.replace(Plan.build(profile, []), num_slots=0)",
     "num_slots=0 must be >= prefetch_depth + 1 (2) when blocks stream"),
    ("return dataclasses.replace(Plan.build(profile, []), prefetch_depth=-1)",
     "prefetch_depth=-1 must be >= 0"),
    ("return dataclasses.replace(Plan.build(profile, []), group_size=0)",
     "group_size=0 must be >= 1"),
    ("return dataclasses.replace(Plan.build(profile, []), streamed=(0, 1))",
     "plan must place every block exactly once"),
    ("return Plan.build(profile, range(profile.num_blocks))",  # all resident: over the budget
     "returned a plan needing"),
    ("return {}['missing']", "failed in plan(): KeyError: 'missing'"),
])
def test_a_broken_plan_is_a_plugin_error_at_apply_naming_plugin_and_rule(
    make_plugin: MakePlugin, plan_body: str, rule: str
) -> None:
    make_plugin("offloadkit-rogue", rogue(plan_body))
    model = make_model(seed=3)
    before = snapshot(model)
    need = offloadkit.get_strategy("rogue")().min_device_bytes(offloadkit.profile_model(model))
    for call in (offloadkit.apply, offloadkit.stage):
        with pytest.raises(PluginError) as info:
            call(model, "rogue", device="cpu", budget=need * 2)
        assert WHO in str(info.value) and rule in str(info.value)
    # nothing moved, nothing marked: the model runs and can be offloaded normally
    assert all(torch.equal(t, before[n][0]) for n, t in model.state_dict().items())
    offloadkit.apply(model, "layerwise", device="cpu", budget="1GiB").remove()


def test_a_broken_min_device_bytes_is_a_plugin_error(make_plugin: MakePlugin) -> None:
    make_plugin("offloadkit-rogue", rogue(
        "return Plan.build(profile, [])",
        extra="    def min_device_bytes(self, profile):\n        return 12.5\n"))
    with pytest.raises(PluginError, match=r"min_device_bytes\(\) returned 12.5; it must return an int"):
        offloadkit.apply(make_model(), "rogue", device="cpu", budget="1GiB")


@pytest.mark.parametrize("name", ["adaptive", "layerwise", "chunkwise"])
def test_the_budget_is_checked_once_per_apply(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """make_plan is the one place the minimum is asked for; plan() trusts it."""
    cls = offloadkit.get_strategy(name)
    calls = []
    original = cls.min_device_bytes

    def counting(self, profile):
        calls.append(profile)
        return original(self, profile)

    monkeypatch.setattr(cls, "min_device_bytes", counting)
    offloadkit.apply(make_model(), name, device="cpu", budget="1GiB", replan_every=0).remove()
    assert len(calls) == 1


REPLANNING = """    def replan(self, plan, stats, profile):
        {body}
"""


@pytest.mark.parametrize(("body", "warning"), [
    ("raise RuntimeError('boom')", "failed in replan() (RuntimeError: boom); keeping the current plan"),
    ("return {'resident': ()}", "replan() returned dict"),
    ("return dataclasses.replace(plan, group_size=0)", "group_size=0 must be >= 1"),
])
def test_a_failing_replan_keeps_the_plan_with_a_warning_and_the_forward_runs(
    make_plugin: MakePlugin, body: str, warning: str
) -> None:
    make_plugin("offloadkit-rogue", rogue(
        "return Plan.build(profile, [0, 2], prefetch_depth=1)",
        extra=REPLANNING.format(body=body)))
    model = make_model(seed=4)
    reference = run(model)
    handle = offloadkit.apply(model, "rogue", device="cpu", budget="1GiB", replan_every=1)
    try:
        plan = handle.plan
        with pytest.warns(RuntimeWarning) as caught:
            outputs = [run(model) for _ in range(3)]  # replans after forwards 2 and 3
            assert handle.replan() is None
        assert all(torch.equal(out, reference) for out in outputs)
        assert handle.plan == plan and handle.stats().replans == 0
        messages = [str(w.message) for w in caught]
        assert len(messages) == 3 and all(WHO in m and warning in m for m in messages)
    finally:
        handle.remove()


def test_find_blocks_hook_returning_an_int_is_a_plugin_error(make_plugin: MakePlugin) -> None:
    make_plugin("offloadkit-intblocks", """
        from offloadkit import hookimpl

        @hookimpl
        def offloadkit_find_blocks(model):
            return 3
    """)
    model = make_model()
    with pytest.raises(PluginError, match=r"offloadkit_find_blocks\(\) of plugin "
                                          r"'offloadkit-intblocks' returned int 3; it must return"):
        offloadkit.apply(model, "layerwise", device="cpu", budget="1GiB")
    with pytest.raises(PluginError, match="'offloadkit-intblocks'"):
        offloadkit.profile_model(model)


@pytest.mark.parametrize("switch", [registry.DISABLE_ENV, registry.STRICT_ENV,
                                    registry.TRACE_ENV])
def test_a_junk_switch_value_is_an_error_naming_the_accepted_ones(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], switch: str
) -> None:
    monkeypatch.setenv(switch, "junk")
    registry.reset_registry()
    with pytest.raises(PluginError) as info:
        offloadkit.list_strategies()
    assert f"{switch}='junk' is not a switch value" in str(info.value)
    assert "1, true, yes, on" in str(info.value) and "0, false, no, off" in str(info.value)
    assert offloadkit_cli(["list"]) == 1
    assert f"offloadkit: error: {switch}='junk'" in capsys.readouterr().err
    monkeypatch.setenv(switch, " Off ")  # the accepted words, any case and spacing
    registry.reset_registry()
    assert "adaptive" in offloadkit.list_strategies()


@pytest.mark.parametrize(("declaration", "problem"), [
    ("uses_budget = 'no'", "uses_budget = 'no' must be True or False"),
    ("budget_hint = None", "budget_hint = None must be a str"),
    ("placement = object", "must be None (offloadkit's engine) or a subclass of offloadkit.Placement"),
])
def test_a_wrongly_typed_declaration_skips_the_plugin_with_a_warning(
    make_plugin: MakePlugin, declaration: str, problem: str
) -> None:
    make_plugin("offloadkit-rogue", rogue("return Plan.build(profile, [])",
                                          extra=f"    {declaration}\n"))
    with pytest.warns(PluginLoadWarning, match="offloadkit-rogue") as caught:
        names = offloadkit.list_strategies()
    assert "rogue" not in names and "adaptive" in names
    assert any(problem in str(w.message) for w in caught)


OWN_MECHANISM = """
from offloadkit import OffloadStats, Placement, Plan, Strategy, hookimpl

RECORD = []


class Recorder(Placement):
    accepts_options = frozenset({"trace"})

    def __init__(self, model, *, plan, strategy, device, budget_bytes, **options):
        self.plan = plan
        RECORD.append(("placed", type(model).__name__, strategy.name, str(device),
                       budget_bytes, options))

    def stats(self):
        counters = dict(peak_device_bytes=0, current_device_bytes=0, bytes_transferred=0,
                        transfers=0, transfer_seconds=0.0, compute_seconds=0.0,
                        stall_seconds=0.0, forwards=0, oom_recoveries=0, replans=0,
                        host_pinned_bytes=0, host_pageable_bytes=0, disk_bytes=0)
        return OffloadStats.of(self.plan, strategy="recorder", device="cpu", budget_bytes=0,
                               counters=counters)

    def remove(self, *, restore=True):
        RECORD.append(("removed", restore))


class RecorderStrategy(Strategy):
    name = "recorder"
    description = "its own mechanism, through the Placement interface"
    placement = Recorder

    def plan(self, profile, budget_bytes):
        return Plan.build(profile, range(profile.num_blocks))


@hookimpl
def offloadkit_register_strategies():
    return [RecorderStrategy]
"""


def test_a_strategy_brings_its_own_mechanism_through_placement(make_plugin: MakePlugin) -> None:
    module = make_plugin("offloadkit-recorder", OWN_MECHANISM)
    assert "recorder" in offloadkit.list_strategies()  # loads the plugin
    record = sys.modules[module].RECORD
    model = make_model()
    with pytest.raises(TypeError, match="unknown option.*'recorder': pin_limit_bytes.*Recorder"):
        offloadkit.apply(model, "recorder", device="cpu", budget="1GiB", pin_limit_bytes=1)
    staged = offloadkit.stage(model, "recorder", device="cpu", budget="1GiB", trace=False)
    assert record == []  # nothing can be packed ahead: the mechanism runs at place()
    handle = staged.place()
    assert record == [("placed", "TinyTransformer", "recorder", "cpu", 2**30, {"trace": False})]
    assert handle.plan.streamed == () and handle.stats().strategy == "recorder"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        handle.remove(restore=False)
    assert record[-1] == ("removed", False)
