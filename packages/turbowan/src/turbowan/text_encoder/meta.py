"""The umT5 encoder without weights: the one place a `UMT5Encoder` is built on ``meta``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

import torch
from torch import nn

from turbowan.limits import reported
from turbowan.text_encoder.config import OPTION_VARIANTS, PRESETS, UMT5Config, preset_config
from turbowan.text_encoder.fp8 import ScaledFP8Linear
from turbowan.text_encoder.model import UMT5Encoder
from turbowan.text_encoder.naming import renamed_view, strip_prefix

__all__ = ["OPTION_VARIANTS", "PRESETS", "build_manifest_model", "build_meta",
           "normalize_checkpoint_keys"]

T = TypeVar("T")


@reported("building the text encoder on meta")
def build_meta(config: UMT5Config, *, dtype: torch.dtype = torch.bfloat16) -> UMT5Encoder:
    """``UMT5Encoder(config, dtype=dtype)`` on ``meta`` (upstream names, no fp8)."""
    with torch.device("meta"):
        return UMT5Encoder(config, dtype=dtype)


def build_manifest_model(
    preset: str,
    *,
    naming: str = "wan",
    fp8: str = "none",
    dtype: torch.dtype = torch.bfloat16,
) -> nn.Module:
    """The preset built on ``meta`` with the state-dict names of ``naming`` ("wan" or "comfy").

    ``fp8="scaled"`` gives ComfyUI's fp8_scaled layout: every Linear weight float8_e4m3fn with
    a scalar fp32 ``scale_weight``, plus the empty ``scaled_fp8`` marker tensor.
    """
    if naming not in ("wan", "comfy"):
        raise ValueError(
            f"unknown naming {naming!r}; use 'wan' (upstream .pth) or 'comfy' (HF/ComfyUI)"
        )
    if fp8 not in ("none", "scaled"):
        raise ValueError(f"unknown fp8 layout {fp8!r}; use 'none' or 'scaled' (ComfyUI fp8_scaled)")
    model = build_meta(preset_config(preset), dtype=dtype)
    if fp8 == "scaled":
        with torch.device("meta"):
            for name, module in list(model.named_modules()):
                if isinstance(module, nn.Linear):
                    parent, _, child = name.rpartition(".")
                    fp8_linear = ScaledFP8Linear(module.in_features, module.out_features)
                    setattr(model.get_submodule(parent), child, fp8_linear)
    view = model if naming == "wan" else renamed_view(model)
    if fp8 == "scaled":
        view.register_buffer("scaled_fp8", torch.empty(0, dtype=torch.float8_e4m3fn, device="meta"))
    return view


def normalize_checkpoint_keys(specs: Mapping[str, T]) -> dict[str, T]:
    """Drop a wrapper prefix (e.g. ``text_encoders.umt5xxl.transformer.``) from a header.

    The naming scheme (wan or comfy) is kept: `turbowan check` compares against both.
    """
    _naming, prefix = strip_prefix(list(specs))
    if not prefix:
        return dict(specs)
    return {k[len(prefix) :]: v for k, v in specs.items() if k.startswith(prefix)}
