"""Out-of-memory recovery: give device memory back by streaming more blocks.

When a block runs out of device memory (activations did not fit beside the resident
weights), the engine evicts part of the resident set, so those bytes become free for
activations, and runs the block again. On CPU the same path is exercised by raising
``torch.OutOfMemoryError`` from inside a block (tests inject it). A model run in lockstep
with other processes (engine option ``process_group``) is not retried: see
:func:`lockstep_oom_error`.
"""

from __future__ import annotations

import torch

from offloadkit.errors import OffloadError
from offloadkit.plans import ModelProfile, Plan


def is_oom(exc: BaseException) -> bool:
    """True for torch's OOM error (CUDA or CPU) and backends that raise a bare RuntimeError."""
    oom_type = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    if isinstance(exc, oom_type):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def shrink_plan(plan: Plan, profile: ModelProfile, budget_bytes: int) -> Plan | None:
    """The plan with about half the resident blocks streamed instead, or None if none are
    resident. Evicts the blocks farthest apart first so streaming stays interleaved."""
    resident = list(plan.resident)
    if not resident:
        return None
    keep_count = len(resident) // 2
    # keep every other resident block: evicted ones are spread across the model
    keep = resident[1::2][:keep_count] if keep_count else []
    depth = max(plan.prefetch_depth, 1)
    while True:
        candidate = Plan.build(profile, keep, group_size=plan.group_size, prefetch_depth=depth,
                               home=plan.home, note=f"shrunk after OOM (was {len(resident)} "
                               "resident)")
        if candidate.predicted_peak_device_bytes <= budget_bytes:
            return candidate
        if depth > 0:
            depth -= 1
        elif keep:
            keep = keep[:-1]
        else:
            return candidate if candidate.predicted_peak_device_bytes <= budget_bytes else None


def lockstep_oom_error(index: int, group: object) -> OffloadError:
    """The error for an OOM inside a block of a model run in lockstep (``process_group``).

    Recovery reruns the block, and a block of such a model holds collectives (Ulysses'
    all-to-all): run twice on this rank alone, they would pair with the other ranks' next
    ones and mix up their data. Nor can the ranks agree on a smaller plan first: the others
    are not in this block's failure, they wait in its collective. So this rank stops with
    this error, and the others with a lost-peer error at their collective timeout."""
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    return OffloadError(
        f"out of memory in block {index} on rank {rank}, whose model runs in lockstep with "
        "other processes (engine option process_group): the block cannot be retried on one "
        "rank alone, as it would repeat the block's collectives. Lower the budget on every "
        "rank to leave more device memory for activations, or lower the activation size "
        "(resolution, frames, batch).")
