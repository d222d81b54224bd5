"""DiT configurations: the named presets and inference of a configuration from a checkpoint.

Everything that defines the architecture lives in ``DiTConfig``. Presets are what users and
the CLI name; ``config_from_state_dict`` recovers a config from tensor shapes alone, so any
Wan-architecture I2V checkpoint loads without naming a preset.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

from turbowan.limits import DIT_LIMITS, check_bounds

HEAD_DIM = 128  # every Wan model; heads = dim / 128
QUANT_CHOICES = ("int8", "none")
ATTENTION_CHOICES = ("sla", "original", "sagesla")

# the 10 linears of a block that the quant format stores as int8 (proj_l never is)
BLOCK_LINEARS: tuple[str, ...] = (
    "self_attn.q",
    "self_attn.k",
    "self_attn.v",
    "self_attn.o",
    "cross_attn.q",
    "cross_attn.k",
    "cross_attn.v",
    "cross_attn.o",
    "ffn.0",
    "ffn.2",
)
PROJ_L = "self_attn.attn_op.local_attn.proj_l"


@dataclass(frozen=True)
class DiTConfig:
    """Architecture of one Wan2.2 I2V expert (spec §1.1)."""

    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    in_dim: int = 36
    out_dim: int = 16
    text_dim: int = 4096
    text_len: int = 512
    freq_dim: int = 256
    eps: float = 1e-6
    patch_size: tuple[int, int, int] = (1, 2, 2)

    def __post_init__(self) -> None:
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.dim // self.num_heads != HEAD_DIM:
            raise ValueError(
                f"head_dim must be {HEAD_DIM} (RoPE split 44/42/42 and SLA proj_l assume it); "
                f"dim {self.dim} / {self.num_heads} heads = {self.dim // self.num_heads}"
            )
        if self.patch_size != (1, 2, 2):
            raise ValueError(f"only patch_size (1, 2, 2) is supported, got {self.patch_size}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def patch_volume(self) -> int:
        pt, ph, pw = self.patch_size
        return pt * ph * pw

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


PRESETS: dict[str, DiTConfig] = {
    # the real expert (TurboWan2.2-I2V-A14B-{high,low}-720P[-quant].pth)
    "wan2.2-i2v-a14b": DiTConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
    # CPU benchmarks: a block costs like a real one per token-width, 8 of them
    "small": DiTConfig(dim=1536, ffn_dim=6144, num_heads=12, num_layers=8),
    # tests and the embedded demo; identical to the golden dit_tiny_i2v configuration
    "tiny": DiTConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=3),
}


def get_preset(name: str) -> DiTConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(
            f"unknown DiT preset {name!r}; known DiT presets: {', '.join(sorted(PRESETS))}"
        ) from None


def attention_problems(attention: str, sla_topk: float) -> list[str]:
    """What is wrong with an attention backend and SLA top-k (empty: nothing). Checked where a
    run or a model starts (pre-flight, ``load_dit``, ``WanDiT``), never in a forward."""
    problems = []
    if attention not in ATTENTION_CHOICES:
        problems.append(f"unknown attention {attention!r}; choose one of {', '.join(ATTENTION_CHOICES)} "
                        "(default sla)")
    if not (isinstance(sla_topk, (int, float)) and not isinstance(sla_topk, bool)
            and 0 < sla_topk <= 1 and math.isfinite(sla_topk)):
        problems.append(f"sla_topk is the kept share of key blocks, in (0, 1] (default 0.1), got {sla_topk!r}")
    return problems


def check_attention(attention: str, sla_topk: float) -> None:
    """:func:`attention_problems` as one ValueError."""
    problems = attention_problems(attention, sla_topk)
    if problems:
        raise ValueError("; ".join(problems))


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    """Refuse an option value outside ``choices``, listing them."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


# every option combination a DiT file can come in, used by `turbowan check` to auto-detect
OPTION_VARIANTS: list[dict[str, str]] = [
    {"quant": q, "attention": a} for q in QUANT_CHOICES for a in ("sla", "original")
]


@dataclass(frozen=True)
class DetectedLayout:
    """What a DiT checkpoint holds, read from its key names and shapes."""

    config: DiTConfig
    quant: str  # "int8" | "none"
    attention: str  # "sla" (proj_l present) | "original"

    def preset_name(self) -> str | None:
        for name, cfg in PRESETS.items():
            if replace(cfg, text_len=self.config.text_len) == self.config:
                return name
        return None

    def describe(self) -> str:
        c = self.config
        name = self.preset_name()
        shape = (
            f"dim {c.dim}, ffn {c.ffn_dim}, {c.num_layers} layers, {c.num_heads} heads, "
            f"in {c.in_dim}, out {c.out_dim}, text {c.text_dim}"
        )
        what = f"preset {name!r}" if name else "a Wan DiT matching no preset"
        return f"{what} ({shape}), quant={self.quant}, attention={self.attention}"


_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.")
REQUIRED_KEYS = (
    "patch_embedding.weight",
    "head.head.weight",
    "text_embedding.0.weight",
    "time_embedding.0.weight",
)


def _shape(spec: Any) -> tuple[int, ...]:
    return tuple(spec.shape)


def config_from_state_dict(specs: Mapping[str, Any]) -> DetectedLayout:
    """Infer the architecture, quantisation and attention kind from key names and shapes.

    ``specs`` maps key -> anything with ``.shape`` (tensors or ``TensorSpec``). Width, FFN
    width, layer count, in/out channels, text width and frequency width come from shapes;
    heads = width / 128; int8 if block linears are stored as ``int8_weight``; SLA if
    ``proj_l`` keys are present.
    """
    missing = [k for k in REQUIRED_KEYS if k not in specs]
    if missing:
        raise ValueError(
            "this does not look like a Wan DiT checkpoint: missing "
            + ", ".join(missing)
            + " (is it a VAE or text-encoder file, or does it carry a key prefix?)"
        )
    dim, patch_in = _shape(specs["patch_embedding.weight"])
    if patch_in % 4:
        raise ValueError(
            f"patch_embedding.weight has shape ({dim}, {patch_in}); expected (dim, in_dim*4) "
            "for a Linear patch embedding (an official Wan Conv3d weight is 5-D: convert it)"
        )
    layers = sorted({int(m.group(1)) for k in specs if (m := _BLOCK_KEY.match(k))})
    if not layers:
        raise ValueError("no blocks.N.* keys found: not a Wan DiT checkpoint")
    check_bounds({"num_layers": layers[-1] + 1}, DIT_LIMITS, f"block index {layers[-1]}")
    if layers != list(range(len(layers))):
        gaps = sorted(set(range(layers[-1] + 1)) - set(layers))
        raise ValueError(f"block indices are not contiguous: blocks {gaps[:10]} are missing")
    if "blocks.0.ffn.0.int8_weight" in specs:
        quant = "int8"
        ffn_dim = _shape(specs["blocks.0.ffn.0.int8_weight"])[0]
    elif "blocks.0.ffn.0.weight" in specs:
        quant = "none"
        ffn_dim = _shape(specs["blocks.0.ffn.0.weight"])[0]
    else:
        raise ValueError("blocks.0.ffn.0 has neither .weight nor .int8_weight: not a Wan DiT")
    if dim % HEAD_DIM:
        raise ValueError(f"width {dim} is not a multiple of the head size {HEAD_DIM}")
    attention = "sla" if any(k.endswith(PROJ_L + ".weight") for k in specs) else "original"
    sizes = dict(
        dim=dim,
        ffn_dim=ffn_dim,
        num_layers=len(layers),
        in_dim=patch_in // 4,
        out_dim=_shape(specs["head.head.weight"])[0] // 4,
        text_dim=_shape(specs["text_embedding.0.weight"])[1],
        freq_dim=_shape(specs["time_embedding.0.weight"])[1],
    )
    check_bounds(sizes, DIT_LIMITS, "DiT checkpoint")
    config = DiTConfig(num_heads=dim // HEAD_DIM, **sizes)
    return DetectedLayout(config=config, quant=quant, attention=attention)
