"""Spatially tiled decoding for cards that cannot hold a full 720p decoder activation.

The latent grid is cut into overlapping tiles; each tile is decoded with its own causal cache
(so time still streams one latent frame at a time) and the pixel tiles are blended across the
overlaps: the outer quarter of each overlap is dropped, the middle half is a linear ramp.
The decoder's middle attention sees one tile instead of the whole frame and convolutions near
a seam see a different border, so the result is close to, not equal to, the untiled decode;
wider overlaps and larger tiles make it closer.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
from torch import nn

from turbowan.vae.cache import CausalCache
from turbowan.vae.frames import SPATIAL_FACTOR


def check_tiling(tile: int, overlap: int) -> tuple[int, int]:
    """Pixel tile/overlap -> latent units, with errors that name a valid setting."""
    if tile % SPATIAL_FACTOR or overlap % SPATIAL_FACTOR or tile < 2 * SPATIAL_FACTOR:
        raise ValueError(
            f"tile ({tile}) and overlap ({overlap}) must be multiples of {SPATIAL_FACTOR} pixels "
            f"and tile at least {2 * SPATIAL_FACTOR}; e.g. tile=256, overlap=64"
        )
    if not 0 <= overlap < tile:
        raise ValueError(
            f"overlap ({overlap}) must be at least 0 and smaller than tile ({tile}); "
            "e.g. tile=256, overlap=64"
        )
    return tile // SPATIAL_FACTOR, overlap // SPATIAL_FACTOR


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of size ``tile`` covering ``length`` with at least ``overlap``."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)  # the last tile ends exactly at the border
    return starts


def _ramp_weights(size: int, start: int, length: int, tile: int, overlap_px: int) -> torch.Tensor:
    """1-D blend weight of one tile along one axis.

    At each interior edge the outer quarter of the overlap gets weight 0 (pixels there saw the
    tile's zero padding), the middle half ramps linearly, the inner quarter gets 1. The two
    tiles of an overlap have mirror-image ramps, so their weights sum to 1 everywhere.
    """
    weight = torch.ones(size, dtype=torch.float32)
    if overlap_px <= 0:
        return weight
    margin = overlap_px // 4
    inner = overlap_px - 2 * margin
    rise = torch.cat(
        [
            torch.zeros(margin),
            (torch.arange(inner, dtype=torch.float32) + 0.5) / inner,
            torch.ones(margin),
        ]
    )
    if start > 0:
        weight[:overlap_px] = rise
    if start + tile < length:
        weight[-overlap_px:] = torch.minimum(weight[-overlap_px:], rise.flip(0))
    return weight


@dataclass(frozen=True)
class Tile:
    """One spatial tile: latent rows/cols (r, c, height, width) and its pixel blend weight."""

    r: int
    c: int
    th: int
    tw: int
    weight: torch.Tensor


def tile_layout(height: int, width: int, *, tile: int, overlap: int
                ) -> tuple[list[Tile], torch.Tensor]:
    """The tiles of a (height, width) latent grid, in blend order, and the pixel weight sum."""
    tile_lat, overlap_lat = check_tiling(tile, overlap)
    rows = tile_starts(height, tile_lat, overlap_lat)
    cols = tile_starts(width, tile_lat, overlap_lat)
    ramp = overlap_lat * SPATIAL_FACTOR
    tiles: list[Tile] = []
    weight_sum = torch.zeros(height * SPATIAL_FACTOR, width * SPATIAL_FACTOR)
    for r in rows:
        th = min(tile_lat, height)
        wy = _ramp_weights(th * SPATIAL_FACTOR, r, height, tile_lat, ramp)
        for c in cols:
            tw = min(tile_lat, width)
            wx = _ramp_weights(tw * SPATIAL_FACTOR, c, width, tile_lat, ramp)
            weight = wy[:, None] * wx[None, :]
            y0, x0 = r * SPATIAL_FACTOR, c * SPATIAL_FACTOR
            weight_sum[y0 : y0 + weight.shape[0], x0 : x0 + weight.shape[1]] += weight
            tiles.append(Tile(r, c, th, tw, weight))
    return tiles, weight_sum


def decode_tile(decoder: nn.Module, z: torch.Tensor, t: Tile, cache: CausalCache,
                frame: int) -> torch.Tensor:
    """Latent frame ``frame`` of tile ``t`` in pixels (float32); the tile's own causal cache
    carries its earlier frames."""
    cache.start_chunk()
    return decoder(z[:, :, frame : frame + 1, t.r : t.r + t.th, t.c : t.c + t.tw], cache).float()


def blend(pieces: list[torch.Tensor], tiles: list[Tile], weight_sum: torch.Tensor
          ) -> torch.Tensor:
    """One frame chunk from its tiles' pieces (in tile order): the weighted sum over the
    overlaps divided by the weight sum, in one fixed order (so any producer gives the same)."""
    device = weight_sum.device
    out: torch.Tensor | None = None
    for t, piece in zip(tiles, pieces, strict=True):
        if out is None:
            b, ch, f = piece.shape[:3]
            out = piece.new_zeros(b, ch, f, weight_sum.shape[0], weight_sum.shape[1])
        y0, x0 = t.r * SPATIAL_FACTOR, t.c * SPATIAL_FACTOR
        region = out[..., y0 : y0 + piece.shape[-2], x0 : x0 + piece.shape[-1]]
        region += piece * t.weight.to(device)
    assert out is not None
    return out / weight_sum


def decode_tiles_stream(
    decoder: nn.Module, z: torch.Tensor, *, tile: int, overlap: int
) -> Iterator[torch.Tensor]:
    """Decode ``z`` (after ``conv2``) tile by tile, yielding blended float32 frame chunks."""
    _, _, frames, height, width = z.shape
    tiles, weight_sum = tile_layout(height, width, tile=tile, overlap=overlap)
    # the blend weights go to the device once, not once per tile and frame
    tiles = [replace(t, weight=t.weight.to(z.device)) for t in tiles]
    weight_sum = weight_sum.to(z.device)
    caches = [CausalCache() for _ in tiles]
    for f in range(frames):
        pieces = [decode_tile(decoder, z, t, cache, f) for t, cache in zip(tiles, caches)]
        yield blend(pieces, tiles, weight_sum)
