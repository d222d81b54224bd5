"""Checks of a multi-process launch, before any process group forms or weight is read."""

from __future__ import annotations

from turbowan.distributed.context import LaunchEnv
from turbowan.distributed.dit import valid_sp_sizes


def launch_problems(*, sp: int | None, gpus: int | None, env: LaunchEnv, num_heads: int,
                    device_type: str, device_count: int, batch: bool = False) -> list[str]:
    """Everything wrong with running ``sp``-way sequence parallel in this launch; empty when
    it can run. ``gpus`` is ``--gpus`` (this process would launch the others); ``batch``:
    a --batch file gives the world's groups their own videos."""
    problems = []
    if gpus is not None:
        if env.launched:
            problems.append(
                f"--gpus {gpus} launches its own processes, but this one already runs under a "
                f"launcher (WORLD_SIZE={env.world}): drop --gpus and use torchrun's "
                "--nproc-per-node, or run turbowan generate --gpus without torchrun")
        if gpus < 1:
            problems.append(f"--gpus must be at least 1, got {gpus}")
        if device_type == "cuda" and gpus > device_count:
            problems.append(f"--gpus {gpus} but this machine has {device_count} CUDA "
                            f"device(s): use --gpus {max(1, device_count)} or fewer")
    world = gpus if gpus is not None and not env.launched else env.world
    sp = world if sp is None else sp
    if sp < 1:
        problems.append(f"--sp must be at least 1, got {sp}")
        return problems
    if world % sp:
        problems.append(f"{world} processes cannot form groups of --sp {sp}: the number of "
                        f"processes must be a multiple of --sp (e.g. --sp {_largest_divisor(world, num_heads)})")
    elif world // sp > 1 and not batch:
        problems.append(f"{world} processes with --sp {sp} form {world // sp} groups, each "
                        "making its own videos: pass --batch FILE.jsonl (a line per video), "
                        f"or --sp {world} for one video")
    if num_heads % sp:
        problems.append(f"--sp {sp} does not divide the model's {num_heads} attention heads; "
                        f"valid sizes: {', '.join(map(str, valid_sp_sizes(num_heads)))}")
    if env.launched and device_type == "cuda" and env.local_rank >= device_count:
        problems.append(
            f"LOCAL_RANK {env.local_rank} but this machine has {device_count} CUDA device(s): "
            f"start at most {device_count} processes per node (torchrun --nproc-per-node)")
    return problems


def _largest_divisor(world: int, heads: int) -> int:
    return max(n for n in valid_sp_sizes(heads) if world % n == 0)
