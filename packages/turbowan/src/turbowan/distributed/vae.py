"""`--vae-parallel`: the tiled VAE decode with its tiles shared among the group's ranks.

Each tile has its own causal cache, so a tile's frames depend on nothing but its own
latents: rank r decodes tiles r, r+N, ... for every frame, the pieces travel to the leader,
and the leader blends them in the one-process order (:func:`turbowan.vae.tiling.blend`),
so the video is bitwise the one-process tiled decode.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from turbowan.distributed.context import ParallelContext
from turbowan.vae.cache import CausalCache
from turbowan.vae.tiling import blend, decode_tile, tile_layout


@torch.no_grad()
def decode_tiles_parallel(vae: torch.nn.Module, latents: torch.Tensor, *, tile: int,
                          overlap: int, parallel: ParallelContext) -> torch.Tensor | None:
    """Video (B, 3, F, H, W) float32 on the CPU at the leader; None on the other ranks.
    Collective over the group: every rank calls it with the same latents."""
    z = vae._prepare_latents(latents)
    _, _, frames, height, width = z.shape
    tiles, weight_sum = tile_layout(height, width, tile=tile, overlap=overlap)
    sp = parallel.sp
    mine: dict[int, list[torch.Tensor]] = {}
    for index in range(sp.rank, len(tiles), sp.size):
        cache = CausalCache()
        mine[index] = [decode_tile(vae.decoder, z, tiles[index], cache, f).cpu()
                       for f in range(frames)]
    gathered: list[dict[int, list[torch.Tensor]] | None] | None = (
        [None] * sp.size if parallel.is_leader else None)
    dist.gather_object(mine, gathered, group_dst=0, group=sp.group)
    if not parallel.is_leader:
        return None
    pieces = {i: p for part in gathered for i, p in part.items()}
    chunks = [blend([pieces[i][f] for i in range(len(tiles))], tiles, weight_sum)
              for f in range(frames)]
    return torch.cat(chunks, dim=2)
