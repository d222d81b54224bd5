"""Placement for models that run in lockstep on several processes (sequence parallel).

When every block ends in a collective (Ulysses' all-to-all), the slowest rank sets the pace
of all: a rank that streams a block the others keep resident stalls them. So the ranks of
a group should run one plan. :func:`agreed_budget` resolves a budget (``"auto"`` included)
to the minimum over the ranks; with the engine option ``process_group=group`` the re-plans
(scheduled, or ``handle.replan()``, then collective) are decided by the group's first rank and
put in force on every rank. Nothing else changes a plan on one rank alone: an out-of-memory
error inside a block, which one process would answer by streaming more and retrying the
block, stops such a model with an error instead (see ``offloadkit.engine.oom``).
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
    return _group_min(parse_budget(budget, device), group)


def _group_min(value: int, group: Any) -> int:
    """The smallest of every rank's ``value`` (collective)."""
    wire = torch.tensor([value], dtype=torch.int64, device=_wire_device(group))
    dist.all_reduce(wire, op=dist.ReduceOp.MIN, group=group)
    return int(wire.item())


def _first_rank(group: Any) -> bool:
    rank = dist.get_rank()
    return (dist.get_group_rank(group, rank) if group is not None else rank) == 0


def coordinated_replan(engine: Any, group: Any) -> Any:
    """A re-plan of ``engine`` decided on the group's first rank and put in force on every
    rank, scheduled (after every ``replan_every`` forwards) or asked for by hand
    (``handle.replan()``). Collective: every rank of the group calls it, between the same
    two forwards, from the thread that runs the model.

    The first rank asks its strategy from its own measurements (the others' may differ: a
    slower link, another tenant on the GPU) within the smallest of the ranks' budgets, so
    the plan fits on each; the proposal is broadcast and every rank adopts it. Returns the
    plan put in force on this rank, or None when nothing changed (the same on every rank)."""
    budget = _group_min(engine.budget_bytes, group)
    message = [engine._propose_replan(budget) if _first_rank(group) else None]
    dist.broadcast_object_list(message, group_src=0, group=group)
    return engine._adopt(message[0])
