"""umT5 encoder configuration: the presets, and inference of a config from checkpoint shapes.

The loader never trusts a file name: it reads the tensor shapes (header only where the format
allows) and derives the configuration from them, so the real 24-layer encoder and the tiny test
encoder go through the same code.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "PRESETS",
    "UMT5Config",
    "TextEncoderMismatchError",
    "config_from_state_dict",
]

UMT5_XXL_WIDTH = 4096


class TextEncoderMismatchError(ValueError):
    """The checkpoint is not a umT5 encoder turbowan can use (wrong family or width)."""


@dataclass(frozen=True)
class UMT5Config:
    """Shape of a umT5 encoder (encoder only; umT5 gives every layer its own position bias)."""

    vocab_size: int = 256_384
    dim: int = 4096
    dim_attn: int = 4096
    ffn_dim: int = 10_240
    num_heads: int = 64
    num_layers: int = 24
    num_buckets: int = 32
    max_distance: int = 128
    eps: float = 1e-6
    text_len: int = 512

    @property
    def head_dim(self) -> int:
        return self.dim_attn // self.num_heads

    def __post_init__(self) -> None:
        if self.dim_attn % self.num_heads:
            raise ValueError(
                f"attention width {self.dim_attn} is not divisible by {self.num_heads} heads"
            )


PRESETS: dict[str, UMT5Config] = {
    "umt5-xxl": UMT5Config(),
    # the golden fixture's configuration (tests, embedded demo)
    "umt5-tiny": UMT5Config(
        vocab_size=512, dim=64, dim_attn=64, ffn_dim=128, num_heads=4, num_layers=2
    ),
}

# Widths of encoders this package knows how to feed the DiT with. A file of another width is
# almost always the wrong text encoder (CLIP-L, T5-base, umT5-base...), and is refused up front.
KNOWN_WIDTHS = frozenset(cfg.dim for cfg in PRESETS.values())

_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.")


def _shape(shapes: Mapping[str, Sequence[int]], key: str, source: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in shapes[key])
    except KeyError:
        raise TextEncoderMismatchError(
            f"{source}: tensor {key!r} is missing; a umT5 encoder checkpoint has it "
            "(is the file complete and really a umT5-xxl text encoder?)"
        ) from None


def check_width(dim: int, source: str, found: str = "") -> None:
    """Refuse encoders whose width the pipeline cannot use, saying what was found."""
    if dim in KNOWN_WIDTHS:
        return
    where = f" ({found})" if found else ""
    raise TextEncoderMismatchError(
        f"{source}: this text encoder has width {dim}{where}, but the Wan2.2 pipeline needs "
        f"umT5-xxl, width {UMT5_XXL_WIDTH}. Use models_t5_umt5-xxl-enc-bf16.pth (Wan-AI) or a "
        "ComfyUI umt5_xxl_*.safetensors text encoder (e.g. umt5_xxl_fp8_e4m3fn_scaled.safetensors);"
        " CLIP-L, T5-base and other encoders do not work with this model."
    )


def config_from_state_dict(
    shapes: Mapping[str, Sequence[int]], *, source: str = "checkpoint"
) -> UMT5Config:
    """Derive the config from wan-named tensor shapes (values may be tensors or shape tuples)."""
    shapes = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else tuple(v) for k, v in shapes.items()}
    vocab, dim = _shape(shapes, "token_embedding.weight", source)
    check_width(dim, source, f"token_embedding.weight is {(vocab, dim)}")
    layers = sorted({int(m.group(1)) for k in shapes if (m := _BLOCK_KEY.match(k))})
    if not layers:
        raise TextEncoderMismatchError(f"{source}: no encoder blocks ('blocks.N.*') found")
    if layers != list(range(len(layers))):
        raise TextEncoderMismatchError(
            f"{source}: encoder blocks are not numbered 0..N-1 (found {layers}); "
            "the file is incomplete or corrupt, re-download it"
        )
    dim_attn = _shape(shapes, "blocks.0.attn.q.weight", source)[0]
    ffn_dim = _shape(shapes, "blocks.0.ffn.fc1.weight", source)[0]
    num_buckets, num_heads = _shape(shapes, "blocks.0.pos_embedding.embedding.weight", source)
    missing_pos = [i for i in layers if f"blocks.{i}.pos_embedding.embedding.weight" not in shapes]
    if missing_pos:
        which = (
            "only block 0 has a relative position table"
            if missing_pos == layers[1:]
            else f"blocks {missing_pos} have no relative position table"
        )
        raise TextEncoderMismatchError(
            f"{source}: {which} (vocabulary {vocab}); umT5 gives every layer its own. A file "
            "with one shared table is a T5 / T5 v1.1 encoder (e.g. the t5xxl used by Flux or "
            "SD3), not umT5-xxl: use models_t5_umt5-xxl-enc-bf16.pth or a ComfyUI "
            "umt5_xxl_*.safetensors file."
        )
    sizes = dict(
        vocab_size=vocab,
        dim=dim,
        dim_attn=dim_attn,
        ffn_dim=ffn_dim,
        num_heads=num_heads,
        num_layers=len(layers),
        num_buckets=num_buckets,
    )
    from turbowan.limits import TEXT_ENCODER_LIMITS, check_bounds

    check_bounds(sizes, TEXT_ENCODER_LIMITS, source)
    return UMT5Config(**sizes)


def preset_config(preset: str) -> UMT5Config:
    try:
        return PRESETS[preset]
    except KeyError:
        raise ValueError(
            f"unknown umT5 preset {preset!r}; known: {', '.join(sorted(PRESETS))}"
        ) from None


# option combinations `turbowan check` tries when it guesses what a file is
OPTION_VARIANTS: list[dict[str, str]] = [
    {"naming": "wan"},
    {"naming": "comfy"},
    {"naming": "comfy", "fp8": "scaled"},
]


