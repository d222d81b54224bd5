"""``offloadkit.check_fits``: does a model fit a budget under a strategy? Asked before loading.

Pipelines, benchmarks and UI nodes ask this instead of re-implementing the budget rule: the
answer comes from the same planner ``apply`` uses, on a profile (a model built on ``meta``
will do), without moving a byte.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from offloadkit.budget import Budget
from offloadkit.engine.profile import BlocksArg, profile_model, with_device_memory
from offloadkit.errors import BudgetError
from offloadkit.planner import below_minimum, build_strategy, make_plan, minimum_bytes
from offloadkit.plans import ModelProfile, Plan
from offloadkit.probe import resolve_device
from offloadkit.strategy import Strategy
from offloadkit.units import describe_bytes

__all__ = ["FitReport", "check_fits"]


@dataclass(frozen=True)
class FitReport:
    """The answer of :func:`check_fits`.

    ``budget_bytes`` is what was compared with ``minimum_bytes``: the fixed budget, or for
    ``"auto"`` its ceiling (the device's total less the activation reserve; free memory is
    read only when the model is placed). ``plan`` is the plan at that budget when it fits.
    ``message`` is one line for the user: the model, the strategy, both sizes in bytes and
    GiB, and (when it does not fit) the fix.
    """

    fits: bool
    model: str
    strategy: str
    minimum_bytes: int
    budget: Budget
    plan: Plan | None
    message: str

    @property
    def budget_bytes(self) -> int:
        return self.budget.bytes

    def raise_if_short(self) -> FitReport:
        """Raise :class:`BudgetError` with :attr:`message` when it does not fit; else self."""
        if not self.fits:
            raise BudgetError(self.message)
        return self


def check_fits(
    model_or_profile: torch.nn.Module | ModelProfile,
    strategy: str | Strategy = "adaptive",
    budget: Budget | int | str | None = "auto",
    device: str | torch.device | None = None,
    *,
    blocks: BlocksArg = None,
    home: str = "host",
    name: str | None = None,
    **options: Any,
) -> FitReport:
    """Whether ``budget`` holds the least ``strategy`` needs for the model, as a report.

    ``model_or_profile`` is a model (``meta`` is fine; ``blocks`` and ``home`` as for
    ``apply``) profiled for ``device`` (default: CUDA if present), or a ready
    :class:`ModelProfile`: then ``device`` defaults to the profile's, and a profile carrying
    ``device_total_bytes`` (a card planned for, not probed) resolves ``"80%"`` and
    ``"auto"`` against that figure without touching a device. ``options`` are those of
    ``apply`` (strategy and engine options); ``name`` labels the model in the message.

    Does not raise for a budget that is too small (see :meth:`FitReport.raise_if_short`);
    raises for what ``apply`` would refuse anyway: an unknown strategy or option, a
    malformed budget, a missing device, a strategy's refusal of its options.
    """
    chosen, _ = build_strategy(strategy, options)
    if isinstance(model_or_profile, ModelProfile):
        profile = model_or_profile
        target: str | torch.device = profile.device if device is None else device
        label = name or "this model"
    elif isinstance(model_or_profile, torch.nn.Module):
        target = resolve_device(device) if chosen.uses_device else torch.device("cpu")
        profile = with_device_memory(
            profile_model(model_or_profile, blocks, device=target, home=home), target)
        label = name or type(model_or_profile).__name__
    else:
        raise TypeError(f"check_fits() needs a torch.nn.Module or an offloadkit.ModelProfile, "
                        f"not {type(model_or_profile).__name__}")
    if not chosen.uses_budget:
        unused = Budget(0, device=str(target), text="unused")
        return FitReport(True, label, chosen.name, 0, unused, make_plan(chosen, profile, 0),
                         f"{label}: strategy {chosen.name!r} places nothing on the device; "
                         "any budget will do.")
    parsed = Budget.parse(budget, target, total_bytes=profile.device_total_bytes)
    need = minimum_bytes(chosen, profile)
    if parsed.bytes < need:
        return FitReport(False, label, chosen.name, need, parsed, None,
                         below_minimum(chosen, need, parsed, model=label))
    plan = make_plan(chosen, profile, parsed)
    return FitReport(True, label, chosen.name, need, parsed, plan,
                     f"{label} fits: strategy {chosen.name!r} needs at least "
                     f"{describe_bytes(need)}, the budget is {parsed.describe()}.")
