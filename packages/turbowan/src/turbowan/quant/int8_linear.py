"""Int8 block-wise linear layer in the format of the TurboWan `-quant` checkpoints.

The format (spec §2): ``int8_weight`` (N, K) int8, ``scale`` fp32 of shape
(ceil(N/128), ceil(K/128)) holding amax/128 of each 128x128 tile, ``bias`` (N) in the
compute dtype. Two compute paths:

* ``mode="reference"`` reproduces the upstream CUTLASS numerics: the activation is
  fake-quantised with the same 128x128 tiling (128 tokens x 128 channels per scale), each
  K tile is accumulated exactly (integers), then ``acc = fma(float(int_acc), sx*sw, acc)`` in
  fp32 (one rounding, as upstream's kernel), K tile after K tile. Slow; used to check the fast path and for bit-level studies.
* ``mode="fast"`` dequantises the weight to the compute dtype and calls ``F.linear``
  (W8A16, what runs when no int8 GEMM is available). It does not quantise activations, so
  it differs from the reference path by the activation rounding (see tests for the bound).
* ``mode="triton"`` runs the reference numerics as a Triton int8 GEMM (CUDA, or the
  interpreter under ``TRITON_INTERPRET=1``); opt-in, see ``turbowan.quant.int8_triton``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

TILE = 128
AMAX_FLOOR = 1e-8
Int8Mode = Literal["fast", "reference", "triton"]
MODES: tuple[str, ...] = ("fast", "reference", "triton")


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


class Int8Linear(nn.Module):
    """Linear layer whose weight is stored int8 per 128x128 tile (TurboWan `-quant` format).

    All three tensors are buffers (as upstream), so they appear in ``state_dict`` under
    ``int8_weight``, ``scale`` and ``bias``. The layer keeps no derived state: a dequantised
    weight is built per call, so offloading may swap the buffers for views at any time.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        mode: Int8Mode = "fast",
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.mode = mode
        self.register_buffer(
            "int8_weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device)
        )
        self.register_buffer(
            "scale",
            torch.empty(
                tiles(out_features), tiles(in_features), dtype=torch.float32, device=device
            ),
        )
        if bias:
            self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device))
        else:
            self.bias = None

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in MODES:
            raise ValueError(f"Int8Linear mode must be one of {MODES}, got {value!r}")
        self._mode = value

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, mode: Int8Mode = "fast") -> Int8Linear:
        """Quantise an existing ``nn.Linear`` (weights per 128x128 tile, bias kept)."""
        layer = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            mode=mode,
            dtype=linear.weight.dtype,
            device=linear.weight.device,
        )
        q, scale = quantize_blockwise(linear.weight.detach())
        layer.int8_weight.copy_(q)
        layer.scale.copy_(scale)
        if linear.bias is not None:
            layer.bias.copy_(linear.bias.detach())
        return layer

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_blockwise(self.int8_weight, self.scale, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._mode == "reference":
            return int8_linear_reference(x, self.int8_weight, self.scale, self.bias)
        if self._mode == "triton":
            from turbowan.quant.int8_triton import int8_linear_triton

            return int8_linear_triton(x, self.int8_weight, self.scale, self.bias)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, mode={self._mode}"
        )


def set_int8_mode(model: nn.Module, mode: Int8Mode) -> int:
    """Switch every Int8Linear in ``model`` to ``mode``; returns how many were switched."""
    count = 0
    for module in model.modules():
        if isinstance(module, Int8Linear):
            module.mode = mode
            count += 1
    return count
