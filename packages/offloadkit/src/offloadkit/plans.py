"""What a strategy sees (:class:`ModelProfile`) and what it returns (:class:`Plan`).

Plain data, shapes and byte counts only, so a model built on ``meta`` can be profiled and
planned. A leaf module: the engine, the strategies and the planner all build on it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

#: where a model's weights live between uses: pinned host RAM, pageable host RAM, a file
HOME_TIERS = ("pinned", "host", "disk", "shared")


@dataclass(frozen=True)
class BlockProfile:
    """One streamable block: its place in execution order and its weight bytes."""

    index: int
    name: str  # qualified module name inside the model, e.g. "blocks.3"
    nbytes: int  # packed bytes (parameters + buffers owned by this block alone)
    num_tensors: int
    dtypes: tuple[str, ...] = ()


@dataclass(frozen=True)
class ModelProfile:
    """What a strategy may know about a model: sizes only, never values or device memory."""

    blocks: tuple[BlockProfile, ...]
    non_block_bytes: int  # weights outside the blocks (embeddings, head, shared tensors)
    device: str  # the compute device, e.g. "cuda:0" or "cpu"
    device_total_bytes: int | None = None
    device_free_bytes: int | None = None
    shared_tensors: tuple[str, ...] = ()  # tied/shared tensors, kept with the non-block bytes
    dtype_bytes: Mapping[str, int] = field(default_factory=dict)  # bytes per dtype, whole model
    home: str = "host"  # home tier the user asked for (one of HOME_TIERS)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def block_bytes(self) -> int:
        return sum(b.nbytes for b in self.blocks)

    @property
    def total_bytes(self) -> int:
        return self.block_bytes + self.non_block_bytes

    @property
    def max_block_bytes(self) -> int:
        return max((b.nbytes for b in self.blocks), default=0)

    def bytes_of(self, indices: Iterable[int]) -> int:
        """Total bytes of the blocks with these indices."""
        return sum(self.blocks[i].nbytes for i in indices)

    def groups(self, streamed: Iterable[int], group_size: int) -> list[tuple[int, ...]]:
        """Streamed blocks in execution order, cut into consecutive transfer groups."""
        ordered = sorted(streamed)
        return [tuple(ordered[i : i + group_size]) for i in range(0, len(ordered), group_size)]

    def max_group_bytes(self, streamed: Iterable[int], group_size: int) -> int:
        """The slot size a plan needs: the largest transfer group."""
        return max((self.bytes_of(g) for g in self.groups(streamed, group_size)), default=0)


@dataclass(frozen=True)
class Plan:
    """A placement: which blocks stay on the device, which stream, and how.

    Streamed blocks are cut (in execution order) into groups of ``group_size``; each group
    moves into one of ``num_slots`` pre-allocated device slots. ``prefetch_depth`` groups
    may be in flight ahead of the one computing, so ``num_slots >= prefetch_depth + 1``.
    """

    resident: tuple[int, ...]
    streamed: tuple[int, ...]
    group_size: int = 1
    prefetch_depth: int = 1
    num_slots: int = 2
    home: str = "host"
    predicted_peak_device_bytes: int = 0
    note: str = ""  # one line on why, shown in stats and traces

    @staticmethod
    def build(
        profile: ModelProfile,
        resident: Iterable[int],
        *,
        group_size: int = 1,
        prefetch_depth: int = 1,
        home: str | None = None,
        note: str = "",
    ) -> Plan:
        """Make a consistent plan: the rest of the blocks stream, slots and peak derived."""
        resident_set = sorted(set(resident))
        streamed = tuple(b.index for b in profile.blocks if b.index not in set(resident_set))
        if not streamed:
            group_size, prefetch_depth, num_slots = 1, 0, 0
        else:
            group_size = max(1, min(group_size, len(streamed)))
            num_groups = -(-len(streamed) // group_size)
            prefetch_depth = max(0, min(prefetch_depth, num_groups - 1))
            num_slots = prefetch_depth + 1
        peak = _peak(profile, resident_set, streamed, group_size, num_slots)
        return Plan(
            resident=tuple(resident_set),
            streamed=streamed,
            group_size=group_size,
            prefetch_depth=prefetch_depth,
            num_slots=num_slots,
            home=home or profile.home,
            predicted_peak_device_bytes=peak,
            note=note,
        )

    def groups(self, profile: ModelProfile) -> list[tuple[int, ...]]:
        return profile.groups(self.streamed, self.group_size)

    def peak_bytes(self, profile: ModelProfile) -> int:
        """Device bytes this plan really needs: non-block weights, resident blocks and the
        slots (what :meth:`build` predicts; recomputed to check a hand-made plan)."""
        slots = self.num_slots if self.streamed else 0
        return _peak(profile, self.resident, self.streamed, self.group_size, slots)

    def validate(self, profile: ModelProfile) -> None:
        """Raise ValueError naming the rule a plan breaks: every block placed exactly once,
        whole-number group size, prefetch depth and slots that the engine can run."""
        for name in ("group_size", "prefetch_depth", "num_slots", "predicted_peak_device_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name}={value!r} must be an int")
        for name in ("resident", "streamed"):
            indices = getattr(self, name)
            if not isinstance(indices, tuple) or not all(
                    isinstance(i, int) and not isinstance(i, bool) for i in indices):
                raise ValueError(f"{name}={indices!r} must be a tuple of block indices (ints)")
        every = set(self.resident) | set(self.streamed)
        if set(self.resident) & set(self.streamed):
            raise ValueError(f"plan lists blocks as both resident and streamed: "
                             f"{sorted(set(self.resident) & set(self.streamed))}")
        if len(every) != len(self.resident) + len(self.streamed) or every != {
                b.index for b in profile.blocks}:
            raise ValueError("plan must place every block exactly once "
                             f"(got {sorted(every)}, model has {profile.num_blocks} blocks)")
        if self.prefetch_depth < 0:
            raise ValueError(f"prefetch_depth={self.prefetch_depth} must be >= 0")
        if self.streamed:
            if self.group_size < 1:
                raise ValueError(f"group_size={self.group_size} must be >= 1")
            if self.num_slots < self.prefetch_depth + 1:
                raise ValueError(f"num_slots={self.num_slots} must be >= prefetch_depth + 1 "
                                 f"({self.prefetch_depth + 1}) when blocks stream")
        if self.home not in HOME_TIERS:
            raise ValueError(f"home tier {self.home!r} is not one of {HOME_TIERS}")


def _peak(profile: ModelProfile, resident: Iterable[int], streamed: tuple[int, ...],
          group_size: int, num_slots: int) -> int:
    """Device bytes of a placement: non-block weights, resident blocks, the slots."""
    return (profile.non_block_bytes + profile.bytes_of(resident)
            + num_slots * profile.max_group_bytes(streamed, group_size))
