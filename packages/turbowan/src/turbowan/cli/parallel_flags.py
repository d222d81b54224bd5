"""The flags of `turbowan generate` across processes. Apart from the rest of
:mod:`turbowan.distributed` (which needs torch), so building the parser stays light:
`turbowan --help` or a mistyped flag answers without importing torch."""

from __future__ import annotations

import argparse

#: seconds a process waits for the others in a collective before the run stops
DEFAULT_TIMEOUT_S = 600.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group(
        "several processes (torch.distributed; start with torchrun or --gpus)")
    g.add_argument("--sp", type=int,
                   help="sequence-parallel size: processes that share one video (must divide "
                   "the 40 heads: 1, 2, 4, 5, 8, 10, 20, 40); default: all of them")
    g.add_argument("--gpus", type=int,
                   help="start N processes on this machine through torchrun's launcher "
                   "(like torchrun --standalone --nproc-per-node N -m turbowan generate ...)")
    g.add_argument("--vae-parallel", dest="vae_parallel", action="store_true",
                   help="decode on every process of the group, a share of the VAE tiles each "
                   "(--vae-tile/--vae-overlap; the same video as one process decoding tiled)")
    g.add_argument("--dist-timeout", dest="dist_timeout", type=float, default=DEFAULT_TIMEOUT_S,
                   help="seconds a process waits for the others before the run stops with an "
                   "error (a rank that died or hangs)")
