"""The one planner: a strategy's policy, checked once, before anything moves.

``make_plan`` checks the budget against the strategy's minimum (the only place that rule is
applied), asks the strategy for its plan, and checks what came back: a plugin's bug becomes
a :class:`PluginError` naming the plugin and the rule it broke, at apply time, instead of a
crash inside the user's forward. ``checked_replan`` does the same for re-plans while the
model runs, where a broken proposal keeps the current plan with a warning.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

from offloadkit.budget import Budget
from offloadkit.engine.options import ENGINE_OPTIONS
from offloadkit.errors import BudgetError, OffloadError, PluginError
from offloadkit.plans import ModelProfile, Plan
from offloadkit.registry import get_strategy, strategy_origin
from offloadkit.strategy import Strategy
from offloadkit.units import describe_bytes

if TYPE_CHECKING:
    from offloadkit.ledger import OffloadStats

__all__ = ["below_minimum", "build_strategy", "checked_replan", "make_plan", "minimum_bytes"]


def build_strategy(strategy: str | Strategy, options: dict[str, Any]
                   ) -> tuple[Strategy, dict[str, Any]]:
    """The strategy object, and the options left for the engine. Unknown options name both
    the strategy's and the engine's accepted ones; a strategy with its own placement takes
    only the engine options it declares."""
    engine_options = {k: v for k, v in options.items() if k in ENGINE_OPTIONS}
    strategy_options = {k: v for k, v in options.items() if k not in ENGINE_OPTIONS}
    if isinstance(strategy, Strategy):
        if strategy_options:
            raise TypeError(
                f"options {sorted(strategy_options)} are neither engine options "
                f"({', '.join(sorted(ENGINE_OPTIONS))}) nor accepted here: pass strategy "
                "options to the strategy's constructor when giving a Strategy instance."
            )
    else:
        cls = get_strategy(strategy)
        try:
            strategy = cls(**strategy_options)
        except TypeError as exc:
            raise TypeError(f"{exc}; engine options: {', '.join(sorted(ENGINE_OPTIONS))}"
                            ) from None
    placement = strategy.placement
    refused = sorted(set(engine_options) - placement.accepts_options) if placement else []
    if refused:
        raise TypeError(f"unknown option(s) for strategy {strategy.name!r}: {', '.join(refused)}; "
                        f"it places the model with its own mechanism ({placement.__name__}), "
                        "so these engine options do not apply")
    return strategy, engine_options


def minimum_bytes(strategy: Strategy, profile: ModelProfile) -> int:
    """``strategy.min_device_bytes(profile)``, 0 for a strategy that ignores budgets;
    anything but a whole number of bytes is the plugin's bug."""
    if not strategy.uses_budget:
        return 0
    need = strategy.min_device_bytes(profile)
    if isinstance(need, bool) or not isinstance(need, int) or need < 0:
        raise PluginError(f"{_who(strategy)} broke a rule of the strategy API: "
                          f"min_device_bytes() returned {need!r}; it must return an int >= 0 "
                          "(bytes).")
    return need


def below_minimum(strategy: Strategy, need: int, budget: Budget | int,
                  model: str = "this model") -> str:
    """The "budget below the minimum" message: model, strategy, both sizes, the fix."""
    shown = budget.describe() if isinstance(budget, Budget) else describe_bytes(budget)
    return (f"budget {shown} is below the minimum strategy {strategy.name!r} needs for "
            f"{model}: {describe_bytes(need)}. {strategy.budget_hint}")


def make_plan(strategy: Strategy, profile: ModelProfile, budget: Budget | int) -> Plan:
    """Plan ``profile`` within ``budget`` (bytes, or a :class:`Budget`: its ``bytes``), all
    checked: the budget holds the strategy's minimum (:class:`BudgetError` otherwise), and
    the plan is a :class:`Plan` that places every block once within the budget
    (:class:`PluginError` otherwise). Touches no device; raises before anything moves."""
    budget_bytes = budget.bytes if isinstance(budget, Budget) else budget
    if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int):
        raise TypeError(f"make_plan() needs the budget as an int of bytes or an "
                        f"offloadkit.Budget, not {type(budget).__name__}")
    if not strategy.uses_budget:
        budget_bytes = 0
    need = minimum_bytes(strategy, profile)
    if budget_bytes < need:
        raise BudgetError(below_minimum(strategy, need, budget))
    try:
        plan = strategy.plan(profile, budget_bytes)
    except (OffloadError, ValueError, TypeError):  # the strategy refusing, with its message
        raise
    except Exception as exc:  # a bug in the plugin: say whose, keep the traceback
        raise PluginError(f"{_who(strategy)} failed in plan(): "
                          f"{type(exc).__name__}: {exc}") from exc
    problem = plan_problem(plan, profile, budget_bytes if strategy.uses_budget else None)
    if problem is not None:
        raise PluginError(f"{_who(strategy)} broke a rule of the strategy API: plan() {problem}")
    return plan


def plan_problem(plan: object, profile: ModelProfile, budget_bytes: int | None) -> str | None:
    """What is wrong with a strategy's plan, or None: the rules every plan follows."""
    if not isinstance(plan, Plan):
        return (f"returned {type(plan).__name__} {_short(plan)}; it must return an "
                "offloadkit.Plan (build one with Plan.build(profile, resident_blocks)).")
    try:
        plan.validate(profile)
    except ValueError as exc:
        return f"returned a plan that breaks a rule: {exc}."
    if budget_bytes is not None:
        peak = max(plan.peak_bytes(profile), plan.predicted_peak_device_bytes)
        if peak > budget_bytes:
            return (f"returned a plan needing {describe_bytes(peak)} on the device, over the "
                    f"budget of {describe_bytes(budget_bytes)}.")
    return None


def checked_replan(strategy: Strategy, plan: Plan, stats: OffloadStats, profile: ModelProfile,
                   budget_bytes: int) -> Plan | None:
    """``strategy.replan(...)``, or None to keep ``plan``: a replan that raises or proposes
    a plan breaking the rules is reported as a warning, never raised into the forward."""
    try:
        proposal = strategy.replan(plan, stats, profile)
    except Exception as exc:  # noqa: BLE001 - the model keeps running on its current plan
        warnings.warn(f"{_who(strategy)} failed in replan() ({type(exc).__name__}: {exc}); "
                      "keeping the current plan", RuntimeWarning, stacklevel=3)
        return None
    if proposal is None:
        return None
    problem = plan_problem(proposal, profile, budget_bytes)
    if problem is not None:
        warnings.warn(f"{_who(strategy)}: replan() {problem} Keeping the current plan.",
                      RuntimeWarning, stacklevel=3)
        return None
    return proposal


def _who(strategy: Strategy) -> str:
    return strategy_origin(type(strategy))


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
