"""Policy side of offloadkit: the :class:`Strategy` base class plugins subclass.

A strategy never touches a device and never builds the mechanism. It reads a
:class:`ModelProfile` (shapes and byte counts only, so it works on a model built on
``meta``) and a budget, and returns a :class:`Plan`; ``offloadkit.make_plan`` checks the
budget and the plan, and the engine (or the strategy's declared :class:`Placement`) carries
it out. Keeping the two apart lets plugin authors write placement policy without writing
CUDA stream code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

# re-exported: plugins written against earlier releases import these from here
from offloadkit.plans import HOME_TIERS, BlockProfile, ModelProfile, Plan
from offloadkit.units import describe_bytes

if TYPE_CHECKING:
    from offloadkit.ledger import OffloadStats
    from offloadkit.placement import Placement

__all__ = ["HOME_TIERS", "BlockProfile", "ModelProfile", "Plan", "Strategy", "describe_bytes"]


class Strategy:
    """Base class for placement policies. Subclass, set ``name``/``description``, and
    override :meth:`plan` (and :meth:`min_device_bytes` if it differs, :meth:`replan` to
    adapt from measurements).

    Declared attributes (class level; the planner and ``apply`` read them, nothing is
    guessed):

    - ``option_defaults``: the options it accepts; anything else passed to the constructor is
      rejected with the list of accepted names.
    - ``budget_hint``: the fix, in one sentence, that a "budget below the minimum" error
      ends with.
    - ``uses_budget``: False when the budget means nothing to it (``cpu_only``): it is then
      neither parsed nor checked.
    - ``uses_device``: False when it computes on the CPU whatever device is named.
    - ``placement``: None to use offloadkit's engine; a :class:`~offloadkit.Placement`
      subclass for a strategy that brings its own mechanism.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    option_defaults: ClassVar[dict[str, Any]] = {}
    budget_hint: ClassVar[str] = "Raise the budget, or choose strategy='layerwise' or 'cpu_only'."
    uses_budget: ClassVar[bool] = True
    uses_device: ClassVar[bool] = True
    placement: ClassVar[type[Placement] | None] = None

    def __init__(self, **options: Any) -> None:
        unknown = sorted(set(options) - set(self.option_defaults))
        if unknown:
            accepted = ", ".join(sorted(self.option_defaults)) or "none"
            raise TypeError(
                f"strategy {self.name!r} got unknown option(s) {unknown}; "
                f"it accepts: {accepted}"
            )
        self.options: dict[str, Any] = {**self.option_defaults, **options}

    def min_device_bytes(self, profile: ModelProfile) -> int:
        """Least budget this strategy can run in: non-block weights and one slot."""
        return profile.non_block_bytes + profile.max_block_bytes

    def plan(self, profile: ModelProfile, budget_bytes: int) -> Plan:
        """Return the placement for this budget. Must not touch any device.

        Called only with ``budget_bytes >= min_device_bytes(profile)``: the planner checks
        the budget once, before this runs, with the strategy's ``budget_hint``."""
        raise NotImplementedError(f"strategy {self.name!r} does not implement plan()")

    def replan(self, plan: Plan, stats: OffloadStats, profile: ModelProfile) -> Plan | None:
        """Return a better plan from measured stats, or None to keep the current one. A plan
        that breaks the rules, or an exception here, keeps the current plan (with a warning)."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.options.items())})"
