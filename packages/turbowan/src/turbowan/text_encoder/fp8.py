"""ComfyUI "fp8_scaled" text-encoder weights: float8_e4m3fn tensors with a `scale_weight` each.

The stored weight times its scale is the real weight. Two ways to use such a file:
``dequantize_scaled`` turns every weight into a normal float tensor at load time (simple, twice
the memory of the file in bf16); ``ScaledFP8Linear`` keeps the fp8 bytes and dequantises one
layer at a time in ``forward`` (half the memory, and half the bytes offloadkit has to stream).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FP8_DTYPES", "ScaledFP8Linear", "dequantize_scaled", "is_fp8", "use_scaled_fp8_linears"]

FP8_DTYPES = frozenset(
    dt for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
    if (dt := getattr(torch, name, None)) is not None
)

SCALE_SUFFIX = ".scale_weight"


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in FP8_DTYPES


def _scale_for(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """A scale that broadcasts against ``weight``: scalar, per output row, or full."""
    scale = scale.float()
    if scale.numel() == 1:
        return scale.reshape(())
    if scale.numel() == weight.shape[0]:
        return scale.reshape(weight.shape[0], *([1] * (weight.dim() - 1)))
    if scale.shape == weight.shape:
        return scale
    raise ValueError(
        f"scale_weight of shape {tuple(scale.shape)} does not fit a weight of shape "
        f"{tuple(weight.shape)} (expected a scalar or one value per output row)"
    )


def dequantize(weight: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """fp8 (or any) weight times its scale, as ``dtype``; computed in fp32 to avoid double rounding."""
    if scale is None:
        return weight.to(dtype)
    return (weight.float() * _scale_for(weight, scale)).to(dtype)


def dequantize_scaled(
    state: dict[str, torch.Tensor], dtype: torch.dtype, *, consume: bool = False
) -> dict[str, torch.Tensor]:
    """Fold every `<m>.scale_weight` into `<m>.weight`; cast all floating tensors to ``dtype``.

    With ``consume`` the entries are popped from ``state`` as they are converted, so the file's
    tensor and its converted copy never both stay alive for the whole model.
    """
    out: dict[str, torch.Tensor] = {}
    scales = {k: v for k, v in state.items() if k.endswith(SCALE_SUFFIX)}
    for key in list(state):
        if key.endswith(SCALE_SUFFIX):
            continue
        value = state.pop(key) if consume else state[key]
        scale = scales.get(key[: -len(".weight")] + SCALE_SUFFIX) if key.endswith(".weight") else None
        if scale is not None or (value.is_floating_point() and value.dtype != dtype):
            value = dequantize(value, scale, dtype)
        out[key] = value
    return out


class ScaledFP8Linear(nn.Module):
    """A bias-free Linear whose weight stays fp8 until the moment it is used."""

    def __init__(
        self, in_features: int, out_features: int, *, fp8_dtype: torch.dtype = torch.float8_e4m3fn,
        scale_shape: tuple[int, ...] = (),
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, dtype=fp8_dtype), requires_grad=False
        )
        self.scale_weight = nn.Parameter(torch.ones(scale_shape), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, dequantize(self.weight, self.scale_weight, x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8"


def use_scaled_fp8_linears(model: nn.Module, state: Mapping[str, torch.Tensor]) -> int:
    """Swap each Linear whose weight is fp8 in ``state`` for a ScaledFP8Linear (on meta).

    Must run before the assign-load, while the model is still on ``meta``. Returns the count.
    """
    swapped = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        weight = state.get(f"{name}.weight")
        if weight is None or not is_fp8(weight.dtype):
            continue
        scale = state.get(f"{name}{SCALE_SUFFIX}")
        with torch.device("meta"):
            replacement = ScaledFP8Linear(
                module.in_features, module.out_features, fp8_dtype=weight.dtype,
                scale_shape=tuple(scale.shape) if scale is not None else (),
            )
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, replacement)
        swapped += 1
    return swapped
