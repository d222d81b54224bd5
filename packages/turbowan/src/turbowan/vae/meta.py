"""The Wan2.1 VAE without weights: the one place a `WanVAE` is built on ``meta``."""

from __future__ import annotations

from typing import Any

import torch

from turbowan.limits import reported
from turbowan.vae.config import PRESETS, VAEConfig, normalize_checkpoint_keys
from turbowan.vae.model import WanVAE

__all__ = ["PRESETS", "build_manifest_model", "build_meta", "normalize_checkpoint_keys"]


@reported("building the VAE on meta")
def build_meta(config: VAEConfig, *, dtype: torch.dtype | None = None) -> WanVAE:
    """``WanVAE(config)`` on ``meta``; with ``dtype``, every float tensor in that dtype, as
    ``load_vae`` leaves the model (the budget check profiles it so)."""
    with torch.device("meta"):
        model = WanVAE(config)
    return model if dtype is None else model.to(dtype)  # floating tensors only


def build_manifest_model(preset: str, **options: Any) -> torch.nn.Module:
    """Build the preset's model on ``meta`` for `turbowan manifest` / `turbowan check`."""
    unknown = {k: v for k, v in options.items() if v is not None}
    if unknown:
        raise ValueError(
            f"the VAE presets take no options, got {sorted(unknown)}; "
            "drop them (they apply to the DiT or umT5 presets)"
        )
    try:
        config = PRESETS[preset]
    except KeyError:
        raise ValueError(
            f"unknown VAE preset {preset!r}; known: {', '.join(sorted(PRESETS))}"
        ) from None
    return build_meta(config)
