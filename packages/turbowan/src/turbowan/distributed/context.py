"""The process group of a multi-process run: who this process is and which group of ranks
makes its video.

torchrun (or ``turbowan generate --gpus N``, which calls torchrun's own entry point) sets
WORLD_SIZE, RANK, LOCAL_RANK and LOCAL_WORLD_SIZE. The world is cut into ``world / sp``
groups of consecutive ranks; each group makes its own videos with Ulysses sequence parallel
over its ``sp`` ranks, and the first rank of a group (its leader) runs the text encoder and
the VAE, and writes the files.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from turbowan.cli.parallel_flags import DEFAULT_TIMEOUT_S
from turbowan.distributed.ulysses import SequenceParallel


@dataclass(frozen=True)
class LaunchEnv:
    """What the launcher told this process (torchrun's environment variables)."""

    world: int = 1
    rank: int = 0
    local_rank: int = 0
    local_world: int = 1

    @classmethod
    def read(cls, environ: Mapping[str, str] | None = None) -> LaunchEnv:
        env = os.environ if environ is None else environ
        world = int(env.get("WORLD_SIZE", "1"))
        return cls(world=world, rank=int(env.get("RANK", "0")),
                   local_rank=int(env.get("LOCAL_RANK", "0")),
                   local_world=int(env.get("LOCAL_WORLD_SIZE", str(world))))

    @property
    def launched(self) -> bool:
        """Started by torchrun (or another launcher) with more than one process."""
        return self.world > 1


@dataclass(frozen=True)
class ParallelContext:
    """This rank's place: the world, its sequence-parallel group and its data-parallel index."""

    env: LaunchEnv
    sp: SequenceParallel
    group_index: int  # which of the world / sp groups (data parallel rank)
    groups: int  # world / sp
    leader: int  # global rank of this group's first rank
    device: torch.device
    vae_parallel: bool = False  # decode tiles on every rank of the group (--vae-parallel)
    #: one name for the whole job (every group, every node): processes of a node holding
    #: the same expert map one home="shared" copy of it
    shared_key: str = ""

    @property
    def is_leader(self) -> bool:
        return self.sp.rank == 0


def device_for(env: LaunchEnv, device: str | torch.device | None) -> torch.device:
    """cuda:LOCAL_RANK on a CUDA machine (or when cuda is asked for), else the CPU."""
    if device is not None and torch.device(device).type != "cuda":
        return torch.device(device)
    if device is None and not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", env.local_rank)


def init_parallel(sp: int, device: torch.device, *, env: LaunchEnv | None = None,
                  timeout_s: float = DEFAULT_TIMEOUT_S, vae_parallel: bool = False
                  ) -> ParallelContext:
    """Join the launcher's process group (NCCL on CUDA, gloo on the CPU; the CPU build has no
    NCCL) and cut it into groups of ``sp`` consecutive ranks. Checks belong before this
    (:func:`turbowan.distributed.preflight.check_launch`)."""
    env = env or LaunchEnv.read()
    timeout = timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", timeout=timeout, device_id=device)
        else:
            dist.init_process_group("gloo", timeout=timeout)
    world, rank = dist.get_world_size(), dist.get_rank()
    if sp == world:
        group = None
    else:
        group, _ = dist.new_subgroups_by_enumeration(
            [list(range(g, g + sp)) for g in range(0, world, sp)], timeout=timeout)
    token = [uuid.uuid4().hex if rank == 0 else None]
    dist.broadcast_object_list(token, src=0)
    return ParallelContext(env=env, sp=SequenceParallel.of(group), group_index=rank // sp,
                           groups=world // sp, leader=rank - rank % sp, device=device,
                           vae_parallel=vae_parallel, shared_key=f"turbowan-{token[0]}")


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
