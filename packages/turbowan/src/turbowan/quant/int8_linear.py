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

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from turbowan.quant.blockwise import (  # noqa: F401  (the format's functions, re-exported)
    AMAX_FLOOR,
    TILE,
    dequantize_blockwise,
    int8_linear_reference,
    quantize_blockwise,
    tiles,
    w8a8_linear,
)

Int8Mode = Literal["fast", "reference", "triton"]
MODES: tuple[str, ...] = ("fast", "reference", "triton")


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
