"""What a multi-process run changes in the pipeline: the group leader computes what every
rank needs once (text states, the image latents) and broadcasts it; the timing table is
gathered to the leader."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from turbowan.distributed.context import ParallelContext
from turbowan.pipeline.timings import Timings


class LeaderFailedError(RuntimeError):
    """The group leader failed while computing what it shares; every rank stops."""


def from_leader(parallel: ParallelContext | None,
                compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``compute()`` on the group's leader only, its result (a CPU tensor) on every rank of
    the group. A failure on the leader is sent to the others, so none waits for a tensor that
    will never come."""
    if parallel is None:
        return compute()
    group = parallel.sp.group
    if parallel.is_leader:
        try:
            value = compute()
        except BaseException as exc:
            dist.broadcast_object_list([f"{type(exc).__name__}: {exc}", None], group_src=0,
                                       group=group)
            raise
        dist.broadcast_object_list([tuple(value.shape), value.dtype], group_src=0, group=group)
    else:
        meta = [None, None]
        dist.broadcast_object_list(meta, group_src=0, group=group)
        if isinstance(meta[0], str):
            raise LeaderFailedError(f"rank {parallel.leader} (this group's leader) failed: "
                                    f"{meta[0]}")
        value = torch.empty(meta[0], dtype=meta[1])
    wire = value.to(parallel.device)  # NCCL moves device tensors only
    dist.broadcast(wire, group_src=0, group=group)
    return wire.cpu()


def lockstep_placement(parallel: ParallelContext, budget: Any) -> dict[str, Any]:
    """offloadkit arguments that make the group's ranks run one plan: the smallest of their
    budgets (``"auto"`` resolved on each rank's device), and re-plans decided by the leader."""
    from offloadkit import agreed_budget

    group = parallel.sp.group if parallel.sp.group is not None else dist.group.WORLD
    return {"budget": agreed_budget(budget, parallel.device, group), "process_group": group}


def shared_home_options(parallel: ParallelContext | None) -> dict[str, Any]:
    """offloadkit arguments for home="shared": the job's one key, and how many processes of
    this node will map each expert (its name is removed once they all have). One process
    alone still gets a key of its own."""
    if parallel is None:
        return {"shared_key": f"turbowan-{os.getpid()}", "shared_users": 1}
    return {"shared_key": parallel.shared_key, "shared_users": parallel.env.local_world}


def stage_spread(parallel: ParallelContext, timings: Timings) -> dict[str, tuple[float, float]]:
    """Stage name -> (fastest, slowest) seconds over the group's ranks, for the stages every
    rank ran (sampling; the encoders run on the leader only). Collective: every rank calls."""
    mine = {s.name: s.seconds for s in timings.stages}
    everyone: list[dict[str, float] | None] = [None] * parallel.sp.size
    dist.all_gather_object(everyone, mine, group=parallel.sp.group)
    common = [n for n in mine if all(n in other for other in everyone)]
    return {n: (min(o[n] for o in everyone), max(o[n] for o in everyone)) for n in common}


def spread_summary(spread: dict[str, tuple[float, float]], ranks: int) -> str:
    lines = [f"per-rank seconds over the {ranks} ranks of this group (fastest .. slowest):"]
    width = max([len(n) for n in spread] + [5])
    for name, (low, high) in spread.items():
        lines.append(f"  {name:<{width}}  {low:8.2f} .. {high:8.2f} s")
    return "\n".join(lines)
