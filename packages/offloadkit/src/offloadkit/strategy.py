"""Policy side of offloadkit: what a strategy sees (profile), what it returns (plan).

A strategy never touches a device. It reads a :class:`ModelProfile` (shapes and byte counts
only, so it works on a model built on ``meta``) and a budget, and returns a :class:`Plan`.
The engine carries the plan out. Keeping the two apart lets plugin authors write placement
policy without writing CUDA stream code.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from offloadkit.errors import BudgetError

if TYPE_CHECKING:
    import torch

    from offloadkit.engine.core import Engine
    from offloadkit.handle import OffloadHandle
    from offloadkit.ledger import OffloadStats

HOME_TIERS = ("pinned", "host", "disk")
GIB = 1024**3


def describe_bytes(n: int) -> str:
    """``'1234567 bytes (0.001 GiB)'``: errors state budgets in both units."""
    return f"{n} bytes ({n / GIB:.3f} GiB)"


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
    home: str = "host"  # home tier the user asked for ("pinned", "host" or "disk")

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
        peak = (
            profile.non_block_bytes
            + profile.bytes_of(resident_set)
            + num_slots * profile.max_group_bytes(streamed, group_size)
        )
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

    def validate(self, profile: ModelProfile) -> None:
        """Raise ValueError if the plan does not cover every block exactly once."""
        every = set(self.resident) | set(self.streamed)
        if set(self.resident) & set(self.streamed):
            raise ValueError(f"plan lists blocks as both resident and streamed: "
                             f"{sorted(set(self.resident) & set(self.streamed))}")
        if every != {b.index for b in profile.blocks}:
            raise ValueError("plan must place every block exactly once "
                             f"(got {sorted(every)}, model has {profile.num_blocks} blocks)")
        if self.streamed and self.num_slots < self.prefetch_depth + 1:
            raise ValueError("plan needs num_slots >= prefetch_depth + 1")
        if self.home not in HOME_TIERS:
            raise ValueError(f"home tier {self.home!r} is not one of {HOME_TIERS}")


class Strategy:
    """Base class for placement policies. Subclass, set ``name``/``description``, and
    override :meth:`plan` (and :meth:`min_device_bytes` if it differs).

    Options a strategy accepts are declared in ``option_defaults``; anything else passed to
    the constructor is rejected with the list of accepted names.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    option_defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, **options: Any) -> None:
        unknown = sorted(set(options) - set(self.option_defaults))
        if unknown:
            accepted = ", ".join(sorted(self.option_defaults)) or "none"
            raise TypeError(
                f"strategy {self.name!r} got unknown option(s) {unknown}; "
                f"it accepts: {accepted}"
            )
        self.options: dict[str, Any] = {**self.option_defaults, **options}

    # -- policy ---------------------------------------------------------------------------
    def min_device_bytes(self, profile: ModelProfile) -> int:
        """Least budget this strategy can run in: non-block weights and one slot."""
        return profile.non_block_bytes + profile.max_block_bytes

    def plan(self, profile: ModelProfile, budget_bytes: int) -> Plan:
        """Return the placement for this budget. Must not touch any device."""
        raise NotImplementedError(f"strategy {self.name!r} does not implement plan()")

    def replan(self, plan: Plan, stats: OffloadStats, profile: ModelProfile) -> Plan | None:
        """Return a better plan from measured stats, or None to keep the current one."""
        return None

    def require_budget(self, profile: ModelProfile, budget_bytes: int) -> None:
        """Raise BudgetError naming the minimum when the budget cannot hold this strategy."""
        need = self.min_device_bytes(profile)
        if budget_bytes < need:
            raise BudgetError(
                f"budget {describe_bytes(budget_bytes)} is below the minimum strategy "
                f"{self.name!r} needs for this model: {describe_bytes(need)}. "
                "Raise the budget, or choose strategy='layerwise' or 'cpu_only'."
            )

    def make_plan(self, profile: ModelProfile, budget_bytes: int) -> Plan:
        """:meth:`plan`, checked: the budget holds the minimum, the plan covers every block,
        and its predicted peak is within the budget. Raises before anything moves."""
        self.require_budget(profile, budget_bytes)
        plan = self.plan(profile, budget_bytes)
        plan.validate(profile)
        if plan.predicted_peak_device_bytes > budget_bytes:
            raise BudgetError(
                f"strategy {self.name!r} planned {describe_bytes(plan.predicted_peak_device_bytes)}"
                f" for a budget of {describe_bytes(budget_bytes)}; this is a bug in the strategy"
            )
        return plan

    # -- mechanism ------------------------------------------------------------------------
    def stage(
        self,
        model: torch.nn.Module,
        *,
        device: torch.device,
        budget_bytes: int,
        profile: ModelProfile,
        **engine_options: Any,
    ) -> Engine:
        """Plan, then pack ``model`` into its home tier without touching the device (safe on
        a background thread). ``Engine.place()`` finishes the job later."""
        from offloadkit.engine import Engine

        plan = self.make_plan(profile, budget_bytes)
        return Engine(
            model,
            profile=profile,
            plan=plan,
            strategy=self,
            device=device,
            budget_bytes=budget_bytes,
            **engine_options,
        )

    def apply(
        self,
        model: torch.nn.Module,
        *,
        device: torch.device,
        budget_bytes: int,
        profile: ModelProfile,
        **engine_options: Any,
    ) -> OffloadHandle:
        """Place ``model`` by this strategy's plan using the shared engine: stage, then
        place at once. A strategy with its own mechanism overrides this (and then
        ``offloadkit.stage`` only checks the budget and defers the whole of it to place())."""
        from offloadkit.handle import OffloadHandle

        engine = self.stage(model, device=device, budget_bytes=budget_bytes, profile=profile,
                            **engine_options)
        engine.place()
        return OffloadHandle(engine)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.options.items())})"


def replace_plan(plan: Plan, **changes: Any) -> Plan:
    """dataclasses.replace for plans (kept here so plugins need one import)."""
    return dataclasses.replace(plan, **changes)
