"""Input-size rules of the causal VAE, checked before any work starts.

The encoder takes frame 0 alone and then chunks of 4 frames, so a clip must have 4n+1 frames
(anything else crashes deep inside the temporal downsampling upstream); height and width must
be multiples of 8 or the decoded video comes back a different size than the input.
"""

from __future__ import annotations

TEMPORAL_FACTOR = 4
SPATIAL_FACTOR = 8


class FrameCountError(ValueError):
    """The pixel frame count is not of the form 4n+1."""


def nearest_valid_frame_counts(frames: int) -> tuple[int, ...]:
    """The valid counts (4n+1) just below and above ``frames``: (77, 81) for 80, (1,) ... (5,)."""
    if frames <= 1:
        return (1,)
    below = ((frames - 1) // TEMPORAL_FACTOR) * TEMPORAL_FACTOR + 1
    return (below, below + TEMPORAL_FACTOR)


def check_frame_count(frames: int) -> int:
    """Return the latent frame count for ``frames`` pixel frames, or raise naming valid counts."""
    if isinstance(frames, bool) or not isinstance(frames, int):
        raise FrameCountError(f"frame count must be an integer, got {frames!r}")
    if frames < 1:
        raise FrameCountError(
            f"got {frames} frames; the Wan VAE needs at least 1 frame and 4n+1 in total "
            "(1, 5, 9, ..., 77, 81): use 1 for a single image or 81 for the default clip"
        )
    if (frames - 1) % TEMPORAL_FACTOR:
        below, above = nearest_valid_frame_counts(frames)
        raise FrameCountError(
            f"got {frames} frames; the Wan VAE needs 4n+1 frames: use {below} or {above}"
        )
    return (frames - 1) // TEMPORAL_FACTOR + 1


def check_spatial_size(height: int, width: int) -> None:
    """Height and width must be multiples of 8 (the VAE's spatial compression)."""
    for name, size in (("height", height), ("width", width)):
        if size < SPATIAL_FACTOR or size % SPATIAL_FACTOR:
            below = max(SPATIAL_FACTOR, size // SPATIAL_FACTOR * SPATIAL_FACTOR)
            above = below + SPATIAL_FACTOR if size > below else below
            fix = f"use {below}" if below == above else f"use {below} or {above}"
            raise ValueError(
                f"video {name} {size} is not a multiple of {SPATIAL_FACTOR}; the Wan VAE "
                f"compresses {SPATIAL_FACTOR}x in space: resize or crop it ({fix})"
            )
