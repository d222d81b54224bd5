"""Where each named preset is defined, for `turbowan manifest` / `turbowan check`.

Every family module named here provides
``build_manifest_model(preset: str, **options) -> torch.nn.Module`` that builds the model on
the ``meta`` device (no memory, no weights), and ``PRESETS`` (the names it knows).
Options are family specific: ``quant`` and ``attention`` for the DiT, ``naming`` for umT5.
"""

from __future__ import annotations

import importlib
from types import ModuleType

PRESET_FAMILIES: dict[str, str] = {
    # Wan2.2 I2V DiT (one expert)
    "wan2.2-i2v-a14b": "turbowan.dit.meta",
    "small": "turbowan.dit.meta",
    "tiny": "turbowan.dit.meta",
    # Wan2.1 causal video VAE
    "wan2.1-vae": "turbowan.vae.meta",
    "wan2.1-vae-tiny": "turbowan.vae.meta",
    # umT5-xxl text encoder
    "umt5-xxl": "turbowan.text_encoder.meta",
    "umt5-tiny": "turbowan.text_encoder.meta",
}


def family_module(preset: str) -> ModuleType:
    """Import the module that defines ``preset``; unknown names list the known ones."""
    try:
        module_name = PRESET_FAMILIES[preset]
    except KeyError:
        known = ", ".join(sorted(PRESET_FAMILIES))
        raise ValueError(f"unknown preset {preset!r}; known presets: {known}") from None
    return importlib.import_module(module_name)
