"""Predict how long one DiT step takes under a plan, from a bandwidth and per-block compute
times, by playing the engine's pipeline forward in time.

Why a simulation and not a formula: whether a transfer hides depends on *where* streamed
blocks sit between resident ones, how many slots exist and how far ahead prefetch reaches;
a single max(compute, transfer) ratio gets interleaved plans wrong.

Model (one step, no cross-step prefetch, so it errs on the slow side):
- blocks compute one after another in index order;
- streamed blocks travel in transfer units of ``group_size`` consecutive streamed blocks;
  one copy engine moves units one at a time, at ``bandwidth`` bytes/s;
- a unit needs a free slot; a slot frees when the last block of the unit that held it
  finished computing;
- unit ``u`` may be issued once the unit ``u - prefetch_depth`` is being computed (units
  below ``prefetch_depth`` are issued at the start of the step);
- a streamed block cannot start computing before its unit has arrived;
- when every unit has a slot of its own (units <= slots) they stay in their slots after the
  first step, as the engine keeps them: the steady-state step moves nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class StepPrediction:
    seconds: float
    compute_seconds: float
    stall_seconds: float
    bytes_moved: int

    @property
    def slowdown(self) -> float:
        """Predicted time per step over all-resident time per step."""
        return self.seconds / self.compute_seconds if self.compute_seconds > 0 else 1.0


def transfer_units(streamed: Sequence[int], group_size: int) -> list[list[int]]:
    """Split the streamed blocks, in execution order, into transfer units."""
    ordered = sorted(streamed)
    size = max(1, group_size)
    return [ordered[i : i + size] for i in range(0, len(ordered), size)]


def simulate_step(
    *,
    block_bytes: Sequence[int],
    block_seconds: Sequence[float],
    streamed: Sequence[int],
    bandwidth: float,
    group_size: int = 1,
    slots: int = 2,
    prefetch_depth: int = 1,
) -> StepPrediction:
    """Time of one pass over all blocks under the pipeline model in the module docstring."""
    if bandwidth <= 0:
        raise ValueError(f"bandwidth must be positive, got {bandwidth}")
    if len(block_bytes) != len(block_seconds):
        raise ValueError("block_bytes and block_seconds must have one entry per block")
    units = transfer_units(streamed, group_size)
    slots = max(1, slots)
    if len(units) <= slots:
        total = float(sum(block_seconds))
        return StepPrediction(seconds=total, compute_seconds=total, stall_seconds=0.0, bytes_moved=0)
    unit_of = {block: u for u, unit in enumerate(units) for block in unit}
    depth = max(1, prefetch_depth)

    arrival = [0.0] * len(units)  # when each unit is on the device
    released = [0.0] * len(units)  # when each unit's slot is free again
    unit_compute_start: dict[int, float] = {}
    copy_engine_free = 0.0
    issued = 0

    def issue_ready(now_gate: dict[int, float]) -> None:
        """Issue, in order, every unit whose prefetch gate is known."""
        nonlocal issued, copy_engine_free
        while issued < len(units):
            u = issued
            if u < depth:
                gate = 0.0
            elif (u - depth) in now_gate:
                gate = now_gate[u - depth]
            else:
                return
            if u >= slots:
                if (u - slots) not in finished_units:
                    return
                gate = max(gate, released[u - slots])
            start = max(gate, copy_engine_free)
            nbytes = sum(block_bytes[b] for b in units[u])
            arrival[u] = start + nbytes / bandwidth
            copy_engine_free = arrival[u]
            issued += 1

    finished_units: set[int] = set()
    clock = 0.0
    stall = 0.0
    issue_ready(unit_compute_start)
    for block, seconds in enumerate(block_seconds):
        unit = unit_of.get(block)
        if unit is not None:
            # Everything up to this unit must be issued before we can wait for it.
            while issued <= unit:
                before = issued
                issue_ready(unit_compute_start)
                if issued == before:  # blocked on a slot held by an unfinished unit: impossible order
                    raise ValueError(
                        f"plan deadlocks: unit {issued} needs a slot but only {slots} slots exist"
                    )
            if arrival[unit] > clock:
                stall += arrival[unit] - clock
                clock = arrival[unit]
            unit_compute_start.setdefault(unit, clock)
        clock += seconds
        if unit is not None and block == units[unit][-1]:
            released[unit] = clock
            finished_units.add(unit)
        issue_ready(unit_compute_start)
    return StepPrediction(
        seconds=clock,
        compute_seconds=float(sum(block_seconds)),
        stall_seconds=stall,
        bytes_moved=int(sum(block_bytes[b] for b in streamed)),
    )
