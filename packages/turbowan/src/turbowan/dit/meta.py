"""The DiT without weights: the one place a `WanDiT` is built on ``meta``.

The loader assigns a checkpoint's tensors into this model, pre-flight profiles it for the
budget check, `turbowan manifest`/`check` read its keys, and the benchmark materialises it.
"""

from __future__ import annotations

import torch

from turbowan.dit.config import (
    OPTION_VARIANTS,
    PRESETS,
    QUANT_CHOICES,
    DiTConfig,
    check_choice,
    get_preset,
)
from turbowan.dit.model import WanDiT
from turbowan.limits import reported

__all__ = ["OPTION_VARIANTS", "PRESETS", "build_manifest_model", "build_meta"]


@reported("building the DiT on meta")
def build_meta(config: DiTConfig, *, quant: str = "none", attention: str = "original",
               sla_topk: float = 0.1, dtype: torch.dtype = torch.float32) -> WanDiT:
    """``WanDiT(config, ...)`` on ``meta``: the shapes and dtypes of the loaded expert (fp32
    norms, int8 weights with ``quant="int8"``), no memory."""
    with torch.device("meta"):
        return WanDiT(config, quant=quant, attention=attention, sla_topk=sla_topk, dtype=dtype)


def build_manifest_model(
    preset: str | DiTConfig, *, quant: str = "int8", attention: str = "sla"
) -> torch.nn.Module:
    """The DiT of ``preset`` on ``meta`` with the checkpoint's dtypes (bf16, fp32 norms, int8)."""
    config = preset if isinstance(preset, DiTConfig) else get_preset(preset)
    check_choice("quant", quant, QUANT_CHOICES)
    return build_meta(config, quant=quant, attention=attention, dtype=torch.bfloat16)
