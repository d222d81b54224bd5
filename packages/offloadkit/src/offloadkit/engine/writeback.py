"""Keeping what a block's forward writes into its own tensors.

A forward may update block buffers in place (BatchNorm running stats in train mode, a step
counter, a cache) or assign a new tensor to one. The engine binds each block tensor to slot
memory that the next group overwrites, and restores the model from the home tier, so such a
write would be lost. Each bound tensor has its own version counter (see
:func:`offloadkit.engine.layout.view_in`): :func:`snapshot` records, before the block runs,
which object each parameter/buffer slot holds and its version; :func:`changed` lists the
positions whose object or version differs after it ran. The engine then writes those
tensors back to the home tier.

Kernels that write without bumping the version (batch_norm's running statistics) are
handled by module type. Inference tensors (a model built inside ``torch.inference_mode()``)
have no version counter:
an in-place write to one inside inference mode is not seen (a replaced tensor still is).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn.modules.batchnorm import _NormBase

from offloadkit.engine.layout import BlockLayout

Snapshot = list[tuple[Any, int]]


ALWAYS = -2  # a version that never matches: the tensor counts as written


def snapshot(block: BlockLayout) -> Snapshot:
    out = []
    for entry in block.entries:
        obj = entry.ref.get()
        if _running_stat(entry.ref.module, entry.ref.kind):
            version = ALWAYS
        else:
            version = -1 if entry.inference else obj._version
        out.append((obj, version))
    return out


def changed(block: BlockLayout, before: Snapshot) -> list[int]:
    found = []
    for position, (entry, (obj, version)) in enumerate(zip(block.entries, before, strict=True)):
        now = entry.ref.get()
        if now is not obj or version == ALWAYS or (version >= 0 and now._version != version):
            found.append(position)
    return found


def _running_stat(module: torch.nn.Module, kind: str) -> bool:
    """BatchNorm/InstanceNorm in train mode: the native kernels update the running stats
    in place without bumping their version counters, so they are written back every time."""
    return kind == "buffer" and module.training and isinstance(module, _NormBase) \
        and module.track_running_stats
