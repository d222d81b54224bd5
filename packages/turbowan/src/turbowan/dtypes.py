"""The compute-dtype names users may type (CLI flags, loader arguments), in one place."""

from __future__ import annotations

import torch

FLOAT_DTYPE_NAMES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
}


def parse_float_dtype(dtype: torch.dtype | str | None, *, what: str = "the model") -> torch.dtype | None:
    """A torch float dtype from a dtype or its name; None stays None (the caller's default).

    Models compute in floats only: int8 weights are a storage format, never a compute dtype.
    """
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        resolved = dtype
    else:
        resolved = FLOAT_DTYPE_NAMES.get(str(dtype).lower())
        if resolved is None:
            raise ValueError(
                f"unknown dtype {dtype!r}; use one of fp32, bf16, fp16 "
                "(or float32, bfloat16, float16, half, float) or a torch.dtype"
            )
    if not resolved.is_floating_point:
        raise ValueError(f"{what} computes in a float dtype (bf16, fp16 or fp32); got {resolved}")
    return resolved
