"""`turbowan generate` across processes: its flags, the checks before anything loads, the
relaunch of ``--gpus N`` through torchrun's own entry point, and joining the group."""

from __future__ import annotations

import argparse
from typing import Any

import torch

from turbowan.cli.parallel_flags import add_arguments
from turbowan.distributed.context import (
    LaunchEnv,
    ParallelContext,
    device_for,
    init_parallel,
    shutdown,
)
from turbowan.distributed.pipeline import LeaderFailedError, spread_summary, stage_spread
from turbowan.distributed.preflight import launch_problems

__all__ = ["add_arguments", "adjust_args", "check", "join", "relaunch", "shutdown",
           "spread_summary", "stage_spread"]

#: what a collective raises when another rank died, hung past the timeout, or failed first
DIST_ERRORS = (torch.distributed.DistError, LeaderFailedError)


def is_lost_peer(exc: BaseException) -> bool:
    """A failed collective: torch's distributed errors, the leader's failure, or what gloo
    raises on a timeout or a closed connection (a plain RuntimeError from inside
    torch.distributed)."""
    if isinstance(exc, DIST_ERRORS):
        return True
    if not isinstance(exc, RuntimeError):
        return False
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = tb.tb_frame.f_code.co_filename.replace("\\", "/") if tb is not None else ""
    return "/torch/distributed/" in where


def lost_peer_message(exc: BaseException) -> str:
    env = LaunchEnv.read()
    if isinstance(exc, LeaderFailedError):
        return f"error on rank {env.rank}: {exc}"
    return (f"error on rank {env.rank}: lost contact with another process of the run "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); a rank "
            "died or stopped answering (see its own error above), so this one stops too")


def _device_count(device_type: str) -> int:
    return torch.cuda.device_count() if device_type == "cuda" else 0


def heads_of(args: argparse.Namespace, demo: bool) -> int | None:
    """Attention heads of the DiT this run would load, from its header (None: unreadable,
    which the pipeline's own checks report)."""
    if demo:
        from turbowan.pipeline.demo import demo_dit_config

        return demo_dit_config().num_heads
    from turbowan.dit.loading import detect_layout

    try:
        return detect_layout(args.high).config.num_heads
    except (OSError, ValueError):
        return None


def check(args: argparse.Namespace, demo: bool, *, gpus: int | None = None) -> list[str]:
    """Problems of this launch (empty when none); reads only the DiT header."""
    env = LaunchEnv.read()
    device_type = device_for(env, args.device).type
    if not env.launched and gpus is None and args.sp in (None, 1):
        return []
    heads = heads_of(args, demo)
    problems = launch_problems(sp=args.sp, gpus=gpus, env=env, num_heads=heads or 1,
                               device_type=device_type, device_count=_device_count(device_type),
                               batch=getattr(args, "batch", None) is not None)
    if not env.launched and gpus is None and args.sp not in (None, 1):
        problems.append(f"--sp {args.sp} needs {args.sp} processes: start them with "
                        f"torchrun --nproc-per-node {args.sp} -m turbowan generate ..., or "
                        f"turbowan generate --gpus {args.sp} ...")
    return problems


def adjust_args(args: argparse.Namespace) -> None:
    """This rank's settings: --device cuda:LOCAL_RANK under a launcher on a CUDA machine;
    --vae-parallel decodes tiled (it shares the tiles), so the run records a tiled decode."""
    env = LaunchEnv.read()
    if env.launched:
        args.device = str(device_for(env, args.device))
    if args.vae_parallel:
        args.vae_tiling = True


def join(args: argparse.Namespace, device: torch.device) -> ParallelContext | None:
    """Join the launcher's process group (None in a one-process run)."""
    env = LaunchEnv.read()
    if not env.launched:
        return None
    return init_parallel(args.sp or env.world, device, env=env, timeout_s=args.dist_timeout,
                         vae_parallel=args.vae_parallel)


def without_gpus_flag(argv: list[str]) -> list[str]:
    out: list[str] = []
    skip = False
    for token in argv:
        if skip:
            skip = False
        elif token == "--gpus":
            skip = True
        elif not token.startswith("--gpus="):
            out.append(token)
    return out


def relaunch(gpus: int, argv: list[str]) -> int:
    """Run `turbowan <argv without --gpus>` in ``gpus`` processes on this machine through
    torch.distributed.run (torchrun's entry point: rendezvous, environment, and the teardown
    of every process when one fails). Returns the exit status."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    launch = get_args_parser().parse_args(
        ["--standalone", f"--nproc-per-node={gpus}", "--module", "turbowan",
         *without_gpus_flag(argv)])
    try:
        run(launch)
    except ChildFailedError as exc:
        failures = exc.failures
        first = failures[min(failures)]
        return first.exitcode if first.exitcode and first.exitcode > 0 else 1
    return 0


def is_leader(parallel: Any) -> bool:
    return parallel is None or parallel.is_leader
