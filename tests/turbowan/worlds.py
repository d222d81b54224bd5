"""Gloo worlds on this machine for the distributed tests.

Every rank is its own process (own globals, signal handlers, exit status), forked from the
tests' one forkserver (tests/forkserver_context.py), which imported torch and turbowan once: a
spawned process pays about 3 s of imports, which a 4-rank world paid four times on the test
machine's 2 cores.

Every world has a deadline: a hang fails the test instead of stalling the suite, and the
processes are killed. A rank that fails ends its world at once (the others are killed)
unless the test expects ranks to end early (``exits_ok``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from forkserver_context import forkserver

COLLECTIVE_TIMEOUT_S = 60


@dataclass(frozen=True)
class RankExit:
    """A rank that ended without returning a result: its exit code (-N: killed by signal N)."""

    code: int | None


def _entry(rank: int, fn: Callable[..., Any], world: int, where: str, args: tuple,
           init: bool) -> None:
    torch.set_num_threads(1)
    if init:
        dist.init_process_group("gloo", init_method=f"file://{where}/store", rank=rank,
                                world_size=world,
                                timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    try:
        result = fn(rank, world, *args)
        torch.save(result, os.path.join(where, f"result{rank}.pt"))
        if init:
            dist.barrier()
    finally:
        if init:
            dist.destroy_process_group()


def run_world(fn: Callable[..., Any], world: int, where: Path, *args: Any,
              timeout: float = 180, init: bool = True, exits_ok: bool = False) -> list[Any]:
    """Run ``fn(rank, world, *args)`` in ``world`` processes; their return values (tensors,
    numbers, strings, containers of them) in rank order, a :class:`RankExit` for a rank that
    returned none (only with ``exits_ok``; otherwise its failure fails the world).

    ``init``: join a gloo group of the world first (a file store in ``where``); without it
    ``fn`` sets up its own (the CLI reading torchrun's variables)."""
    where.mkdir(parents=True, exist_ok=True)
    ctx = forkserver()
    procs = [ctx.Process(target=_entry, args=(rank, fn, world, str(where), args, init),
                         name=f"rank{rank}", daemon=True) for rank in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    try:
        running = list(procs)
        while running:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"a {world}-process world ran past {timeout} s")
            for sentinel in wait([p.sentinel for p in running], timeout=left):
                done = next(p for p in running if p.sentinel == sentinel)
                done.join()
                running.remove(done)
                if done.exitcode != 0 and not exits_ok:
                    raise RuntimeError(f"{done.name} of a {world}-process world failed (exit "
                                       f"{done.exitcode}; its error is in the output above)")
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    results: list[Any] = []
    for rank, p in enumerate(procs):
        path = where / f"result{rank}.pt"
        results.append(torch.load(path, weights_only=True) if path.exists()
                       else RankExit(p.exitcode))
    return results
