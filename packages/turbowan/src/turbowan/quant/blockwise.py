"""The TurboWan int8 block-wise format as functions: 128x128 tiles, quantise, dequantise,
and the W8A8 GEMM frame with its exact PyTorch tile loop.

A leaf module: the `Int8Linear` layer and the Triton GEMM both build on it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

TILE = 128
AMAX_FLOOR = 1e-8


def tiles(n: int) -> int:
    """128-wide tiles needed to cover n rows or columns (the last may be partial)."""
    return math.ceil(n / TILE)


def _pad_totiles(x: torch.Tensor) -> torch.Tensor:
    """Zero-pad a 2-D tensor to whole 128x128 tiles (zeros never raise a tile's amax)."""
    rows, cols = x.shape
    pad_r, pad_c = tiles(rows) * TILE - rows, tiles(cols) * TILE - cols
    if pad_r or pad_c:
        x = F.pad(x, (0, pad_c, 0, pad_r))
    return x


def quantize_blockwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise a 2-D tensor per 128x128 tile: q = rne(x * fp32(128/amax)) saturated, scale = amax/128.

    Returns ``(q, scale)``: q int8 with x's shape, scale fp32 (ceil(R/128), ceil(C/128)).
    The arithmetic is fp32 (x is upcast exactly from bf16/fp16), as the upstream kernel does.
    """
    if x.dim() != 2:
        raise ValueError(f"quantize_blockwise expects a 2-D tensor, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"quantize_blockwise expects a floating tensor, got {x.dtype}")
    rows, cols = x.shape
    padded = _pad_totiles(x.float())
    rb, cb = padded.shape[0] // TILE, padded.shape[1] // TILE
    tiles = padded.view(rb, TILE, cb, TILE)
    amax = tiles.abs().amax(dim=(1, 3)).clamp_min(AMAX_FLOOR)  # (rb, cb) fp32
    # upstream's order: the fp32 reciprocal 128/amax first, then one multiply per element
    # (x*128/amax rounds differently at exact .5 ties)
    inv = 128.0 / amax
    q = torch.round(tiles * inv[:, None, :, None]).clamp_(-128, 127)
    q = q.view(rb * TILE, cb * TILE)[:rows, :cols].to(torch.int8)
    return q.contiguous(), (amax / 128.0).contiguous()


def _expand_scale(scale: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    return scale.repeat_interleave(TILE, 0)[:rows].repeat_interleave(TILE, 1)[:, :cols]


def dequantize_blockwise(
    q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """w = q * scale[i//128, j//128], computed in fp32 and rounded once to ``dtype``."""
    rows, cols = q.shape
    rb, cb = tiles(rows), tiles(cols)
    if tuple(scale.shape) != (rb, cb):
        raise ValueError(
            f"scale has shape {tuple(scale.shape)} but a ({rows}, {cols}) int8 weight needs "
            f"({rb}, {cb}) (one scale per 128x128 tile)"
        )
    scale = scale.float()
    if rows % TILE == 0 and cols % TILE == 0:
        # one fused pass: int8 * fp32 is computed in fp32 and rounded into ``out`` once,
        # without an fp32 temporary the size of the weight
        out = torch.empty(rows, cols, dtype=dtype, device=q.device)
        torch.mul(
            q.view(rb, TILE, cb, TILE),
            scale[:, None, :, None],
            out=out.view(rb, TILE, cb, TILE),
        )
        return out
    return (q.float() * _expand_scale(scale, rows, cols)).to(dtype)


def w8a8_linear(
    x: torch.Tensor,
    q_weight: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    tile_gemm: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """The frame both W8A8 paths share: quantise x per 128x128 tile, run
    ``tile_gemm(q_x, s_x, q_weight, w_scale) -> (M, N) fp32``, cast to x's dtype, add the bias
    in that dtype, restore x's leading dimensions."""
    out_dtype = x.dtype
    lead = x.shape[:-1]
    q_x, s_x = quantize_blockwise(x.reshape(-1, x.shape[-1]))
    out = tile_gemm(q_x, s_x, q_weight, w_scale).to(out_dtype)
    if bias is not None:
        out = out + bias.to(out_dtype)
    return out.reshape(*lead, q_weight.shape[0])


def _tile_gemm_torch(
    q_x: torch.Tensor, s_x: torch.Tensor, q_weight: torch.Tensor, w_scale: torch.Tensor
) -> torch.Tensor:
    m_dim, k_dim = q_x.shape
    n_dim = q_weight.shape[0]
    sx_rows = s_x.repeat_interleave(TILE, 0)[:m_dim]  # (M, Kb) fp32
    sw_cols = w_scale.float().repeat_interleave(TILE, 0)[:n_dim]  # (N, Kb) fp32
    qxf, qwf = q_x.float(), q_weight.float()
    acc = torch.zeros(m_dim, n_dim, dtype=torch.float32, device=q_x.device)
    for kb in range(tiles(k_dim)):
        cols = slice(kb * TILE, min((kb + 1) * TILE, k_dim))
        int_acc = qxf[:, cols] @ qwf[:, cols].T  # exact integers, |.| <= 2**21
        scale = sx_rows[:, kb : kb + 1] * sw_cols[:, kb][None, :]  # fp32 sx*sw, as upstream
        acc = fma_fp32(int_acc, scale, acc)
    return acc


def fma_fp32(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """fp32 ``a*b + c`` rounded once, like a hardware FMA (torch has no fp32 fma op).

    The product of two fp32 values is exact in fp64; the fp64 sum is made round-to-odd with
    an error-free TwoSum, and round-to-odd at 53 bits followed by rounding to 24 bits equals
    a single correct rounding (Boldo and Melquiond), so no double-rounding case remains.
    """
    p = a.double() * b.double()
    c64 = c.double()
    s = p + c64
    bv = s - p
    err = (p - (s - bv)) + (c64 - bv)
    even = (s.view(torch.int64) & 1) == 0
    toward = torch.where(err > 0, math.inf, -math.inf).to(s.dtype)
    s = torch.where((err != 0) & even, torch.nextafter(s, toward), s)
    return s.float()


def int8_linear_reference(
    x: torch.Tensor, q_weight: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """Upstream int8 GEMM numerics (activation tiles of 128 tokens x 128 channels).

    Integer products of one K tile are summed exactly (|q| <= 128 and 128 terms keep every
    partial sum below 2**21, which fp32 represents exactly in any summation order), then
    combined in fp32 as ``acc = fma(float(int_acc), sx * sw, acc)`` for K tiles in order.
    The result is cast to x's dtype and the bias is added in that dtype.
    """
    return w8a8_linear(x, q_weight, w_scale, bias, _tile_gemm_torch)
