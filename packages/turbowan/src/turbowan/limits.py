"""Bounds from the Wan2.x model family, checked before any size from a file or flag is used.

Sizes in a checkpoint header or on the command line are untrusted: ``blocks.1000000000.x`` or a
width of 2**40 would otherwise reach ``range()``, a meta build or the allocator. Each bound is
well above the family's largest real model (Wan2.2 A14B: 40 blocks, width 5120, FFN 13824;
umT5-xxl: 24 blocks, width 4096, vocabulary 256384; Wan2.1 VAE: width 96) and far below what
breaks, and every message states the limit.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

__all__ = [
    "MAX_FRAMES",
    "MAX_PIXELS",
    "MAX_SIDE",
    "OutOfBoundsError",
    "check_bounds",
    "check_frames_bound",
    "check_size_bound",
    "reported",
]

T = TypeVar("T")

# DiT (Wan2.2 A14B has 40 blocks of width 5120, FFN 13824, 36 input channels, text width 4096)
DIT_LIMITS = {
    "num_layers": 128, "dim": 16384, "ffn_dim": 65536, "in_dim": 1024, "out_dim": 1024,
    "text_dim": 16384, "freq_dim": 4096,
}  # fmt: skip
# umT5 (xxl: 24 blocks, width 4096, attention 4096, FFN 10240, 64 heads, vocabulary 256384)
TEXT_ENCODER_LIMITS = {
    "num_layers": 128, "dim": 16384, "dim_attn": 16384, "ffn_dim": 65536, "num_heads": 512,
    "vocab_size": 1 << 20, "num_buckets": 4096,
}  # fmt: skip
VAE_LIMITS = {"dim": 1024}  # Wan2.1 VAE: 96

# Frames: upstream's RoPE table holds 1024 positions per axis, so at most 1024 latent frames
# (4 video frames each after the first).
MAX_LATENT_FRAMES = 1024
MAX_FRAMES = 4 * (MAX_LATENT_FRAMES - 1) + 1
# Pixels: Wan2.2 is trained up to 720p (1280x720); four times that area, and no side above
# 4096, is where the family stops being meaningful and memory runs out long before.
MAX_SIDE = 4096
MAX_PIXELS = 4 * 1280 * 720


class OutOfBoundsError(ValueError):
    """A size is outside the model family's range: the file is corrupt or hostile, which is
    an error to report, not a sign that the file is of another family."""


def check_bounds(values: Mapping[str, Any], limits: Mapping[str, int], what: str) -> None:
    """Each ``values[name]`` is an int in 1..limit; the message names the value and limit."""
    for name, limit in limits.items():
        if name not in values:
            continue
        value = values[name]
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= limit:
            raise OutOfBoundsError(
                f"{what}: {name} = {value!r} is outside the Wan model family's range "
                f"(1..{limit}); the file is corrupt or not a Wan checkpoint"
            )


def check_frames_bound(frames: int) -> None:
    if frames > MAX_FRAMES:
        raise ValueError(
            f"frames must be at most {MAX_FRAMES} ({MAX_LATENT_FRAMES} latent frames, the "
            f"model's position table), got {frames}; Wan2.2 is made for 81"
        )


def check_size_bound(width: int, height: int) -> None:
    if width > MAX_SIDE or height > MAX_SIDE or width * height > MAX_PIXELS:
        raise ValueError(
            f"{width}x{height} is too large: each side at most {MAX_SIDE} and at most "
            f"{MAX_PIXELS} pixels per frame (4x 720p, the largest size Wan2.2 is trained at); "
            "use --resolution 720p or 480p"
        )


def reported(what: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Turn any exception from ``fn`` (a meta build: RuntimeError, OverflowError, MemoryError,
    ...) into a ValueError naming ``what``, so pre-flight reports it with the other problems."""
    import functools

    def wrap(fn: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> T:
            try:
                return fn(*args, **kwargs)
            except ValueError:
                raise
            except Exception as exc:
                raise ValueError(
                    f"{what} failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                    "a checkpoint header describes sizes this model cannot have: check the files "
                    "with `turbowan check FILE`"
                ) from exc

        return call

    return wrap
