"""LoRA files: which ones a run uses (``FILE[:STRENGTH]``), and reading them safely.

LoRA files load under the same rules as checkpoints (``turbowan.checkpoint.io``):
safetensors, or a pickle (``.pt``/``.pth``/``.ckpt``/``.bin``) only through
``torch.load(weights_only=True)``, which refuses any file that would run code.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from turbowan.checkpoint.io import (
    PICKLE_SUFFIXES,
    SAFETENSORS_SUFFIXES,
    TensorSpec,
    load_state_dict,
    read_tensor_specs,
)
from turbowan.lora.formats import LoraError

EXPERTS = ("both", "high", "low")
LORA_SUFFIXES = SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES


def lora_name(path: str | os.PathLike[str]) -> str:
    """The name a LoRA is known by (file stem; dots would break module paths)."""
    return re.sub(r"[^0-9A-Za-z_-]", "_", Path(path).stem) or "lora"


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA of a run: its file, its strength and the expert(s) it applies to."""

    path: Path
    strength: float = 1.0
    expert: str = "both"  # "both", "high" or "low"
    name: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))
        if not self.name:
            object.__setattr__(self, "name", lora_name(self.path))
        if self.expert not in EXPERTS:
            raise LoraError(f"LoRA {self.path}: expert must be one of {', '.join(EXPERTS)}, "
                            f"got {self.expert!r}")
        strength = self.strength
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) \
                or not math.isfinite(strength):
            raise LoraError(f"LoRA {self.path}: strength must be a finite number, got {strength!r}")
        object.__setattr__(self, "strength", float(strength))

    def applies_to(self, expert: str) -> bool:
        return self.expert in ("both", expert)

    @classmethod
    def parse(cls, text: str, expert: str = "both") -> LoraSpec:
        """``FILE`` or ``FILE:STRENGTH`` (the strength is the part after the last colon when
        it is a number, so ``C:\\loras\\x.safetensors`` still names a file)."""
        path, sep, tail = text.rpartition(":")
        if sep and path:
            try:
                return cls(Path(path), float(tail), expert)
            except ValueError:
                pass
        return cls(Path(text), 1.0, expert)

    @classmethod
    def coerce(cls, value: Any, expert: str = "both") -> LoraSpec:
        """A LoraSpec from what users pass: a LoraSpec, ``"FILE[:S]"``, a path, a tuple
        ``(path, strength[, expert])``, or ``("FILE[:S]", expert)``."""
        if isinstance(value, LoraSpec):
            return value
        if isinstance(value, str):
            return cls.parse(value, expert)
        if isinstance(value, os.PathLike):
            return cls(Path(value), 1.0, expert)
        if (isinstance(value, (tuple, list)) and len(value) == 2 and isinstance(value[0], str)
                and value[1] in EXPERTS):  # ("FILE[:S]", expert), as the CLI gives them
            return cls.parse(value[0], value[1])
        if isinstance(value, (tuple, list)) and 1 <= len(value) <= 3:
            path, *rest = value
            strength = rest[0] if rest else 1.0
            return cls(Path(path), strength, rest[1] if len(rest) > 1 else expert)
        raise LoraError(f"a LoRA is a path, 'FILE:STRENGTH' or (path, strength[, expert]); "
                        f"got {value!r}")


def _check_path(path: Path) -> None:
    if not path.is_file():
        where = "is a directory" if path.is_dir() else "does not exist"
        raise LoraError(f"LoRA file {str(path)!r} {where}; pass the path of a .safetensors LoRA")
    if path.suffix.lower() not in LORA_SUFFIXES:
        raise LoraError(f"LoRA file {str(path)!r}: unknown file type {path.suffix!r}; LoRAs are "
                        f"read from {', '.join(LORA_SUFFIXES)} files")


def _read(path: str | os.PathLike[str], reader: Any) -> Any:
    p = Path(path)
    _check_path(p)
    try:
        return reader(p)
    except ValueError as exc:
        raise LoraError(f"LoRA file: {exc}") from exc


def read_lora_specs(path: str | os.PathLike[str]) -> dict[str, TensorSpec]:
    """Key -> shape/dtype of a LoRA file without reading its tensors (safetensors header;
    a pickle is opened weights-only and memory-mapped)."""
    return _read(path, read_tensor_specs)


def load_lora_tensors(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Every tensor of a LoRA file, read safely (see the module docstring)."""
    return _read(path, load_state_dict)
