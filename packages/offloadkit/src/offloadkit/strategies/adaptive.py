"""``adaptive`` (the default): keep as many blocks on the device as the budget allows,
stream the rest spread between them so each transfer hides behind resident compute, and
size the prefetch window from measured transfer and compute times."""

from __future__ import annotations

import math

from offloadkit.errors import BudgetError
from offloadkit.hookspecs import hookimpl
from offloadkit.ledger import OffloadStats
from offloadkit.planner import below_minimum
from offloadkit.strategies._common import fewest_streamed, positive_int
from offloadkit.strategy import ModelProfile, Plan, Strategy

#: free device memory below this share of the total makes adaptive give memory back
LOW_FREE_FRACTION = 0.03


class AdaptiveStrategy(Strategy):
    name = "adaptive"
    description = ("Default: as many blocks resident as the budget allows, the rest streamed "
                   "and interleaved; prefetch depth from measured times.")
    option_defaults = {"prefetch_depth": "auto", "max_prefetch_depth": 3}

    def __init__(self, **options: object) -> None:
        super().__init__(**options)
        positive_int("max_prefetch_depth", self.options["max_prefetch_depth"], self.name)
        depth = self.options["prefetch_depth"]
        if depth != "auto" and (isinstance(depth, bool) or not isinstance(depth, int)
                                or depth < 0):
            raise ValueError(f"adaptive: prefetch_depth must be 'auto' or an int >= 0, "
                             f"got {depth!r}")

    def min_device_bytes(self, profile: ModelProfile) -> int:
        """One slot, no prefetch: the least any streaming plan can use."""
        return profile.non_block_bytes + profile.max_block_bytes

    def _fixed_depth(self) -> int | None:
        depth = self.options["prefetch_depth"]
        return None if depth == "auto" else int(depth)

    def plan(self, profile: ModelProfile, budget_bytes: int) -> Plan:
        fixed = self._fixed_depth()
        return self._plan_for(profile, budget_bytes, 1 if fixed is None else fixed)

    def _plan_for(self, profile: ModelProfile, budget_bytes: int, depth: int) -> Plan:
        if profile.total_bytes <= budget_bytes:
            return Plan.build(profile, range(profile.num_blocks), note="everything fits")
        # a deeper window costs slots; fall back to shallower windows when the budget is tight
        for try_depth in range(depth, -1, -1):
            slots = try_depth + 1
            room = budget_bytes - profile.non_block_bytes - slots * profile.max_block_bytes
            resident = fewest_streamed(profile, room)
            if resident is None:
                continue
            candidate = Plan.build(profile, resident, group_size=1, prefetch_depth=try_depth,
                                   note=f"{len(resident)} resident, streamed interleaved")
            if candidate.predicted_peak_device_bytes <= budget_bytes:
                return candidate
        # only below the minimum (make_plan refuses that first): a direct caller's mistake
        raise BudgetError(below_minimum(self, self.min_device_bytes(profile), budget_bytes))

    def replan(self, plan: Plan, stats: OffloadStats, profile: ModelProfile) -> Plan | None:
        """Deepen the window when transfers outlast the compute between streamed blocks;
        give memory back when the device runs nearly out of free memory."""
        if not plan.streamed or stats.forwards < 1 or stats.transfers == 0:
            return None
        budget = stats.budget_bytes
        if profile.device_free_bytes is not None and profile.device_total_bytes:
            low = int(profile.device_total_bytes * LOW_FREE_FRACTION)
            if profile.device_free_bytes < low:
                budget = max(self.min_device_bytes(profile),
                             stats.current_device_bytes - (low - profile.device_free_bytes))
        depth = self._fixed_depth()
        if depth is None:
            depth = self._measured_depth(plan, stats, profile)
        proposal = self._plan_for(profile, budget, depth)
        if (proposal.resident, proposal.prefetch_depth) == (plan.resident, plan.prefetch_depth):
            return None
        return proposal

    def _measured_depth(self, plan: Plan, stats: OffloadStats, profile: ModelProfile) -> int:
        per_transfer = stats.transfer_seconds / stats.transfers
        times = stats.block_compute_seconds
        per_block = sum(times.values()) / len(times) if times else 0.0
        if per_block <= 0:
            return plan.prefetch_depth
        gap_blocks = profile.num_blocks / max(1, len(plan.streamed))  # compute between streams
        needed = math.ceil(per_transfer / (gap_blocks * per_block))
        stalling = stats.stall_seconds > 0.02 * max(stats.compute_seconds, 1e-9)
        if not stalling:
            needed = min(needed, plan.prefetch_depth)
        return max(1, min(self.options["max_prefetch_depth"], needed))


@hookimpl
def offloadkit_register_strategies() -> list[type[Strategy]]:
    return [AdaptiveStrategy]
