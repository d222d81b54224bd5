"""Spawned gloo worlds on this machine for the distributed tests.

A world costs seconds to start (each process imports torch), so each test runs several
checks in one world. Every world has a deadline: a hang fails the test instead of stalling
the suite, and the processes are killed.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

COLLECTIVE_TIMEOUT_S = 60


def _entry(rank: int, fn: Callable[..., Any], world: int, where: str, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{where}/store", rank=rank,
                            world_size=world, timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    try:
        result = fn(rank, world, *args)
        torch.save(result, os.path.join(where, f"result{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_world(fn: Callable[..., Any], world: int, where: Path, *args: Any,
              timeout: float = 180) -> list[Any]:
    """Run ``fn(rank, world, *args)`` in ``world`` spawned gloo processes; their return
    values (tensors, numbers, dicts of them), in rank order."""
    where.mkdir(parents=True, exist_ok=True)
    ctx = mp.start_processes(_entry, args=(fn, world, str(where), args), nprocs=world,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                raise TimeoutError(f"a {world}-process world ran past {timeout} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return [torch.load(where / f"result{r}.pt", weights_only=True) for r in range(world)]
