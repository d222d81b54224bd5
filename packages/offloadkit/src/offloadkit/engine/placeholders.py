"""Stand-ins a block's tensors point at while its bytes are not on the device.

NaN (or 0 for integer dtypes) broadcast views of one element per dtype: they cost no
memory, and a block run without its weights gives NaN rather than silently stale numbers.
"""

from __future__ import annotations

import torch

from offloadkit.engine.layout import BlockLayout, TensorEntry
from offloadkit.engine.modes import engine_mode


class Placeholders:
    """One list of stand-ins per (block, device), built once and reused."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._lists: dict[tuple[int, str], list[torch.Tensor]] = {}
        self._seeds: dict[tuple[torch.dtype, str, bool], torch.Tensor] = {}

    def for_block(self, block: BlockLayout, device: torch.device | None = None
                  ) -> list[torch.Tensor]:
        device = self.device if device is None else device
        key = (block.index, str(device))
        cached = self._lists.get(key)
        if cached is None:
            with engine_mode():
                cached = [self._one(e, device) for e in block.entries]
            self._lists[key] = cached
        return cached

    def _one(self, entry: TensorEntry, device: torch.device) -> torch.Tensor:
        key = (entry.dtype, str(device), entry.inference)
        with torch.inference_mode(entry.inference):  # the kind of tensor the model had
            seed = self._seeds.get(key)
            if seed is None:
                fill = float("nan") if entry.dtype.is_floating_point or entry.dtype.is_complex \
                    else 0
                seed = torch.full((1,), fill, dtype=entry.dtype, device=device)
                self._seeds[key] = seed
            return seed.view([1] * len(entry.shape)).expand(entry.shape)

    def clear(self) -> None:
        self._lists.clear()
