"""NaN/Inf checks between stages: a non-finite tensor is an error naming the stage, not a
black video with exit status 0."""

from __future__ import annotations

import os

import torch

__all__ = ["NonFiniteError", "count_non_finite", "ensure_finite", "non_finite_tensors"]


class NonFiniteError(FloatingPointError):
    """A stage produced NaN or Inf values."""


def count_non_finite(tensor: torch.Tensor, *, chunk: int = 1 << 24) -> int:
    """How many elements are NaN or +-Inf (0 for integer tensors); reads ``chunk`` at a time,
    so a memory-mapped checkpoint tensor is never copied whole."""
    if not tensor.is_floating_point():
        return 0
    flat = tensor.reshape(-1)
    bad = 0
    for start in range(0, flat.numel(), chunk):
        part = flat[start : start + chunk]
        if part.dtype.itemsize == 1:  # fp8: isfinite is not implemented for it
            part = part.float()
        bad += int((~torch.isfinite(part)).sum())
    return bad


def ensure_finite(tensor: torch.Tensor, stage: str, hint: str = "") -> None:
    """Raise :class:`NonFiniteError` naming ``stage`` if ``tensor`` holds NaN or Inf."""
    bad = count_non_finite(tensor)
    if bad:
        raise NonFiniteError(
            f"{stage} produced {bad} NaN/Inf values of {tensor.numel()}; "
            "check the checkpoints for NaN/Inf weights with `turbowan check --full FILE`, or "
            "run in a wider dtype (--dtype bf16 or fp32 instead of fp16)" + (f"; {hint}" if hint else "")
        )


def non_finite_tensors(path: str | os.PathLike[str]) -> dict[str, int]:
    """key -> NaN/Inf count for every tensor of a checkpoint that holds any (reads every byte,
    memory-mapped, a chunk at a time)."""
    from turbowan.checkpoint.io import load_state_dict

    found = {}
    for key, tensor in load_state_dict(path, mmap=True).items():
        bad = count_non_finite(tensor)
        if bad:
            found[key] = bad
    return found
