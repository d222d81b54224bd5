"""Feature cache that lets the causal VAE process a video a few frames at a time.

Every causal convolution with a temporal kernel keeps the last frames of its input from the
previous chunk; the next chunk uses them as left context instead of zero padding. Modules are
visited in the same order for every chunk, so a slot is addressed by visit order.
"""

from __future__ import annotations

import torch

# How many trailing input frames a temporal-kernel-3 causal conv needs from the last chunk.
CACHE_FRAMES = 2


class _FirstChunkMark:
    """Slot marker of an upsampling time conv that has seen only the first latent frame.

    It reproduces the upstream decoder: the second latent frame is then convolved with zero
    padding, not with the first frame's features (spec §6.4, trap 12).
    """

    def __repr__(self) -> str:
        return "FIRST_CHUNK"


FIRST_CHUNK = _FirstChunkMark()

SlotValue = torch.Tensor | _FirstChunkMark | None


class CausalCache:
    """Slots for one encode or decode pass (or one spatial tile of a tiled decode)."""

    def __init__(self) -> None:
        self._slots: list[SlotValue] = []
        self._cursor = 0

    def start_chunk(self) -> None:
        """Rewind to the first slot before each chunk of frames."""
        self._cursor = 0

    def next_slot(self) -> int:
        """Claim the slot of the next cached module in visit order."""
        slot = self._cursor
        if slot == len(self._slots):
            self._slots.append(None)
        self._cursor += 1
        return slot

    def __getitem__(self, slot: int) -> SlotValue:
        return self._slots[slot]

    def __setitem__(self, slot: int, value: SlotValue) -> None:
        self._slots[slot] = value

    def __len__(self) -> int:
        return len(self._slots)

    def nbytes(self) -> int:
        """Bytes held by cached frames (what streaming decode keeps between chunks)."""
        return sum(s.numel() * s.element_size() for s in self._slots if isinstance(s, torch.Tensor))


def tail_frames(x: torch.Tensor, previous: SlotValue) -> torch.Tensor:
    """The last CACHE_FRAMES input frames, topped up from the previous chunk's tail if short."""
    tail = x[:, :, -CACHE_FRAMES:].clone()
    if tail.shape[2] < CACHE_FRAMES and isinstance(previous, torch.Tensor):
        tail = torch.cat([previous[:, :, -1:].to(tail.device), tail], dim=2)
    return tail
