"""``chunkwise``: every block streams, ``chunk_size`` consecutive blocks per transfer.
Fewer, larger copies; two chunk slots so the next chunk loads while one computes."""

from __future__ import annotations

from offloadkit.hookspecs import hookimpl
from offloadkit.strategies._common import boolean, positive_int
from offloadkit.strategy import ModelProfile, Plan, Strategy


class ChunkwiseStrategy(Strategy):
    name = "chunkwise"
    description = "Blocks stream in groups of chunk_size (fewer, larger transfers)."
    option_defaults = {"chunk_size": 4, "prefetch": True}

    def __init__(self, **options: object) -> None:
        super().__init__(**options)
        positive_int("chunk_size", self.options["chunk_size"], self.name)
        boolean("prefetch", self.options["prefetch"], self.name)

    def _chunk(self, profile: ModelProfile) -> int:
        return max(1, min(self.options["chunk_size"], profile.num_blocks))

    def min_device_bytes(self, profile: ModelProfile) -> int:
        chunk = self._chunk(profile)
        groups = -(-profile.num_blocks // chunk)
        slots = min(2 if self.options["prefetch"] else 1, max(1, groups))
        everything = [b.index for b in profile.blocks]
        return profile.non_block_bytes + slots * profile.max_group_bytes(everything, chunk)

    def plan(self, profile: ModelProfile, budget_bytes: int) -> Plan:
        depth = 1 if self.options["prefetch"] else 0
        return Plan.build(profile, [], group_size=self._chunk(profile), prefetch_depth=depth,
                          note=f"every block streams, {self._chunk(profile)} per transfer")


@hookimpl
def offloadkit_register_strategies() -> list[type[Strategy]]:
    return [ChunkwiseStrategy]
