"""Write a safetensors file one tensor at a time, so converting a 28 GB checkpoint never
holds the converted result in RAM (``safetensors.torch.save_file`` needs every tensor at once).

The header (names, dtypes, shapes, byte offsets) is written first from the planned specs;
then each tensor is produced, checked against its plan, written and dropped.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterable

import torch

from turbowan.checkpoint.io import SAFETENSORS_DTYPES

_DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
_ALIGN = 8


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def write_safetensors_streaming(
    path: str | os.PathLike[str],
    plan: Iterable[tuple[str, tuple[int, ...], torch.dtype]],
    produce: Callable[[str], torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> int:
    """Write ``plan`` (name, shape, dtype in file order); ``produce(name)`` makes each tensor.

    Returns the number of bytes written. A produced tensor whose shape or dtype differs
    from its plan is an error (the header would lie about it).
    """
    entries = list(plan)
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, shape, dtype in entries:
        if dtype not in _DTYPE_NAMES:
            raise ValueError(f"{name}: dtype {dtype} cannot be stored in safetensors here")
        size = _nbytes(shape, dtype)
        header[name] = {
            "dtype": _DTYPE_NAMES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % _ALIGN)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        for name, shape, dtype in entries:
            tensor = produce(name)
            if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
                raise RuntimeError(
                    f"{name}: produced {tensor.dtype} {tuple(tensor.shape)}, "
                    f"planned {dtype} {tuple(shape)}"
                )
            raw = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
            fh.write(raw.numpy())  # buffer protocol: no extra copy
        written = fh.tell()
    return written
