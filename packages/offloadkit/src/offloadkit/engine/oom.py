"""Out-of-memory recovery: give device memory back by streaming more blocks.

When a block runs out of device memory (activations did not fit beside the resident
weights), the engine evicts part of the resident set, so those bytes become free for
activations, and runs the block again. On CPU the same path is exercised by raising
``torch.OutOfMemoryError`` from inside a block (tests inject it).
"""

from __future__ import annotations

import torch

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
