"""Turn what a user says about a video (resolution, aspect, frames) or a bare token count into
the latent shape the DiT sees, because the cost of a step, and so whether streaming can hide
behind compute, depends only on that shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from turbowan.pipeline.resolution import ASPECT_RATIOS, VIDEO_RES_SIZE_INFO, check_frames

VAE_TIME_STRIDE = 4
VAE_SPACE_STRIDE = 8
PATCH = (1, 2, 2)
LATENT_CHANNELS = 16
CONDITION_CHANNELS = 20  # 4 mask channels + 16 latent channels of the start image


@dataclass(frozen=True)
class Workload:
    """One DiT call's input geometry; ``tokens`` is what drives compute."""

    latent_frames: int
    latent_height: int
    latent_width: int
    description: str
    batch: int = 1

    @property
    def tokens(self) -> int:
        return (
            (self.latent_frames // PATCH[0])
            * (self.latent_height // PATCH[1])
            * (self.latent_width // PATCH[2])
        )

    @property
    def latent_shape(self) -> tuple[int, int, int, int, int]:
        """Shape of ``x``: (B, 16, T, H, W)."""
        return (self.batch, LATENT_CHANNELS, self.latent_frames, self.latent_height, self.latent_width)

    @property
    def condition_shape(self) -> tuple[int, int, int, int, int]:
        """Shape of ``y`` (I2V mask + start-image latent): (B, 20, T, H, W)."""
        return (self.batch, CONDITION_CHANNELS, self.latent_frames, self.latent_height, self.latent_width)

    def as_dict(self) -> dict:
        return {
            "description": self.description,
            "tokens": self.tokens,
            "latent_shape": list(self.latent_shape),
            "condition_shape": list(self.condition_shape),
        }


def from_video(resolution: str, aspect_ratio: str, frames: int) -> Workload:
    """Latent geometry of a ``frames``-frame video at a named resolution and W:H aspect."""
    # the pipeline's table and frame rule, with the bench's flag names in the messages
    if resolution not in VIDEO_RES_SIZE_INFO:
        known = ", ".join(VIDEO_RES_SIZE_INFO)
        raise ValueError(f"unknown --resolution {resolution!r}; use one of: {known}")
    if aspect_ratio not in ASPECT_RATIOS:
        known = ", ".join(ASPECT_RATIOS)
        raise ValueError(f"unknown --aspect-ratio {aspect_ratio!r}; use one of: {known} (W:H)")
    try:
        check_frames(frames)
    except ValueError as exc:
        raise ValueError(f"--frames: {exc} (the causal VAE needs it)") from None
    sizes = VIDEO_RES_SIZE_INFO[resolution]
    width, height = sizes[aspect_ratio]
    latent_frames = 1 + (frames - 1) // VAE_TIME_STRIDE
    return Workload(
        latent_frames=latent_frames,
        latent_height=height // VAE_SPACE_STRIDE,
        latent_width=width // VAE_SPACE_STRIDE,
        description=f"{resolution} {aspect_ratio} ({width}x{height}), {frames} frames",
    )


def from_tokens(tokens: int) -> Workload:
    """A single-latent-frame grid with exactly ``tokens`` tokens, as square as it factors.

    Only the token count matters for cost, so the grid shape is chosen, not asked for.
    """
    if tokens < 1:
        raise ValueError(f"--tokens must be a positive integer, got {tokens}")
    rows = max(d for d in range(1, math.isqrt(tokens) + 1) if tokens % d == 0)
    cols = tokens // rows
    return Workload(
        latent_frames=1,
        latent_height=rows * PATCH[1],
        latent_width=cols * PATCH[2],
        description=f"{tokens} tokens (1x{rows}x{cols} grid)",
    )
