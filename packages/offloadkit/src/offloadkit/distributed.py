"""Placement for models that run in lockstep on several processes (sequence parallel).

When every block ends in a collective (Ulysses' all-to-all), the slowest rank sets the pace
of all: a rank that streams a block the others keep resident stalls them. So the ranks of
a group should run one plan. :func:`agreed_budget` resolves a budget (``"auto"`` included)
to the minimum over the ranks; with the engine option ``process_group=group`` the re-plans
are decided by the group's first rank and put in force on every rank.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from offloadkit.budget import parse_budget


def _wire_device(group: Any) -> torch.device:
    """NCCL moves device tensors only; gloo host tensors."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def agreed_budget(budget: int | str | None, device: str | torch.device, group: Any = None
                  ) -> int:
    """``budget`` resolved on this rank's ``device``, then the minimum over ``group``'s
    ranks, so every rank plans the same placement. Collective: every rank of the group
    calls it (from the thread that runs the group's other collectives)."""
    mine = torch.tensor([parse_budget(budget, device)], dtype=torch.int64,
                        device=_wire_device(group))
    dist.all_reduce(mine, op=dist.ReduceOp.MIN, group=group)
    return int(mine.item())


def coordinated_replan(engine: Any, group: Any) -> Any:
    """The engine's scheduled re-plan, decided on the group's first rank: it re-plans from
    its own measurements and the plan in force afterwards is broadcast to the others, which
    put it in force too. Returns the new plan, or None when it did not change."""
    first = dist.get_group_rank(group, dist.get_rank()) == 0 if group is not None \
        else dist.get_rank() == 0
    if first:
        changed = engine.replan()
        message = [changed]
    else:
        message = [None]
    dist.broadcast_object_list(message, group_src=0, group=group)
    plan = message[0]
    if not first and plan is not None:
        import dataclasses

        engine._configure(dataclasses.replace(plan, home=engine.plan.home))
        engine.ledger.replans += 1
    return plan
