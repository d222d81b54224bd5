"""offloadkit hook naming the DiT's blocks: its ``blocks`` list of WanBlocks.

offloadkit's generic search would find them too, but in the small presets the text and time
embedding MLPs (nn.Sequential of Linear) hold enough of the weights that it streams them as
well; the pipeline, the bench and pre-flight all mean the WanBlocks. Registered under
``[project.entry-points.offloadkit] turbowan-dit``.
"""

from __future__ import annotations

import torch

from offloadkit import hookimpl


@hookimpl
def offloadkit_find_blocks(model: torch.nn.Module) -> torch.nn.ModuleList | None:
    from turbowan.dit.model import WanDiT

    return model.blocks if isinstance(model, WanDiT) else None
