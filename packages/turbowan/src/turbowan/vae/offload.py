"""offloadkit hook that tells its block search where the VAE's blocks are.

Register it by adding to packages/turbowan/pyproject.toml:
``[project.entry-points.offloadkit] turbowan-vae = "turbowan.vae.offload"``; until then pass
``blocks=vae.offload_blocks()`` to ``offloadkit.apply``.
"""

from __future__ import annotations

import torch

from offloadkit import hookimpl


@hookimpl
def offloadkit_find_blocks(model: torch.nn.Module) -> torch.nn.ModuleList | None:
    from turbowan.vae.model import WanVAE

    if isinstance(model, WanVAE):
        return torch.nn.ModuleList(model.offload_blocks())
    return None
