"""``layerwise``: least device memory. Every block streams, one at a time; the next block
is prefetched while the current one computes (two slots)."""

from __future__ import annotations

from offloadkit.hookspecs import hookimpl
from offloadkit.strategies._common import boolean
from offloadkit.strategy import ModelProfile, Plan, Strategy


class LayerwiseStrategy(Strategy):
    name = "layerwise"
    description = "Minimum memory: every block streams, one at a time, prefetching the next."
    option_defaults = {"prefetch": True}

    def __init__(self, **options: object) -> None:
        super().__init__(**options)
        boolean("prefetch", self.options["prefetch"], self.name)

    def _slots(self) -> int:
        return 2 if self.options["prefetch"] else 1

    def min_device_bytes(self, profile: ModelProfile) -> int:
        slots = min(self._slots(), max(1, profile.num_blocks))
        return profile.non_block_bytes + slots * profile.max_block_bytes

    def plan(self, profile: ModelProfile, budget_bytes: int) -> Plan:
        return Plan.build(profile, [], group_size=1, prefetch_depth=self._slots() - 1,
                          note="every block streams")


@hookimpl
def offloadkit_register_strategies() -> list[type[Strategy]]:
    return [LayerwiseStrategy]
