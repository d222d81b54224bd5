"""Read checkpoints without running code and without a second copy in RAM.

`.pth` files go through ``torch.load(weights_only=True, mmap=True)``: the restricted
unpickler refuses anything but tensors and plain containers, so a malicious pickle cannot
execute; mmap keeps the tensor data on disk until it is touched. `.safetensors` files are
memory-mapped by safetensors. Both paths return CPU tensors that share the file's pages.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from turbowan.checkpoint.header import (  # noqa: F401  (SAFETENSORS_DTYPES re-exported)
    SAFETENSORS_DTYPES,
    HeaderError,
    parse_header,
    validate_header,
)

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")



# the fix for every damaged file, said where the damage is found (CLI and loaders alike)
REDOWNLOAD = (
    "re-download the file (an interrupted download looks like this) and compare its size "
    "with the source's"
)


class CheckpointReadError(ValueError):
    """The file cannot be read as a checkpoint (missing, truncated, unsafe or unknown)."""


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of one stored tensor, known without reading its data."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def _is_safetensors(path: Path) -> bool:
    return path.suffix.lower() in SAFETENSORS_SUFFIXES


def _unwrap(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """Accept a flat dict of tensors, or one nested under 'state_dict'/'model'/'module'."""
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "module", "net"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(
                isinstance(v, torch.Tensor) for v in inner.values()
            ):
                obj = inner
                break
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
    raise CheckpointReadError(f"{path}: holds no tensors (type {type(obj).__name__})")


def load_state_dict(path: str | os.PathLike[str], *, mmap: bool = True) -> dict[str, torch.Tensor]:
    """Load every tensor of a checkpoint as CPU tensors, memory-mapped where possible."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointReadError(f"{path}: no such file")
    if _is_safetensors(path):
        from safetensors.torch import load_file

        _safetensors_header(path)  # the whole header checked first, with a clear message
        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors raises several types for a bad header
            raise CheckpointReadError(
                f"{path}: not a readable safetensors file ({exc}); {REDOWNLOAD}"
            ) from exc
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:
        text = str(exc)
        if "zip archive" in text or "PytorchStreamReader" in text or "central directory" in text:
            raise CheckpointReadError(
                f"{path}: truncated or corrupt .pth archive ({text.splitlines()[0]}); "
                f"{REDOWNLOAD}"
            ) from exc
        # weights_only refuses pickles that would import or call anything: report, never run
        raise CheckpointReadError(
            f"{path}: refused or unreadable as a weights-only checkpoint ({exc}). "
            "turbowan loads .pth files with weights_only=True, so a file that needs to run "
            "code while unpickling is never opened; convert it to .safetensors if you trust it."
        ) from exc
    return _unwrap(obj, path)


def _safetensors_header(path: Path) -> dict[str, TensorSpec]:
    """Read and fully validate the header (see ``checkpoint.header``)."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise CheckpointReadError(f"{path}: truncated (no safetensors header); {REDOWNLOAD}")
        (n,) = struct.unpack("<Q", head)
        if n <= 0 or 8 + n > size:
            raise CheckpointReadError(
                f"{path}: truncated or corrupt safetensors header; {REDOWNLOAD}"
            )
        raw = fh.read(n)
    try:
        entries = validate_header(
            parse_header(raw, path), path, size - 8 - n, truncated_hint=REDOWNLOAD
        )
    except HeaderError as exc:
        raise CheckpointReadError(str(exc)) from None
    return {key: TensorSpec(shape, dtype) for key, (shape, dtype) in entries.items()}


def read_tensor_specs(path: str | os.PathLike[str]) -> dict[str, TensorSpec]:
    """Key -> shape/dtype without materialising tensor data (header or mmap only)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointReadError(f"{path}: no such file")
    if _is_safetensors(path):
        return _safetensors_header(path)
    state = load_state_dict(path, mmap=True)
    return {k: TensorSpec(tuple(v.shape), v.dtype) for k, v in state.items()}
